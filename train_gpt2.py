"""
Train GPT-2 from scratch: one readable file with the model, the data loader, DDP, the learning-rate
schedule, evaluation (val loss, HellaSwag), checkpoints and sampling.

Launch:
    python train_gpt2.py --data input.txt --n_layer 4 --n_head 4 --n_embd 256 ...   # laptop CPU
    python train_gpt2.py --data edu_fineweb10B                                       # one GPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --data edu_fineweb10B     # 8 GPUs
    python train_gpt2.py sample --checkpoint log/model_19073.pt --prompt "Hello"     # play with it
    python train_gpt2.py export --checkpoint log/model_19073.pt --out gpt2-mine       # to Hugging Face
    python train_gpt2.py plot --log_dir log                                          # loss curves
See README.md for every flag.
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import glob
import json
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------
# config


class UserError(Exception):
    """Bad input from the user: main() prints the message as one line and exits with code 2."""


@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum sequence length (context)
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    @property
    def padded_vocab_size(self):
        # Why: 50257 is an awkward number for matmul kernels; rounding the embedding table up to a
        # multiple of 128 (50304 for GPT-2) makes lm_head measurably faster. The extra rows are never
        # targets, and their logits are masked to -inf (head(), ChunkedCrossEntropy), so they never win.
        return (self.vocab_size + 127) // 128 * 128


# GPT-2 shapes of the OpenAI checkpoints (Radford et al. 2019, "Language Models are Unsupervised Multitask
# Learners", table 2, and the released checkpoints' configs).
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def arg(default, help):
    """A config field with the one-line help that --help shows."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    data: str = arg("input.txt", "a text file (last 10%% is val) or a directory of uint16 .npy shards from fineweb.py")
    log_dir: str = arg("log", "where log.txt and the model_<step>.pt checkpoints go")
    model: str = arg("gpt2", "model shape preset: " + ", ".join(PRESETS))
    n_layer: int = arg(None, "number of layers (overrides the preset)")
    n_head: int = arg(None, "number of attention heads (overrides the preset)")
    n_embd: int = arg(None, "embedding width (overrides the preset)")
    init_from: str = arg(None, "start from these weights: a Hugging Face GPT-2 name/directory or a checkpoint")
    resume: str = arg(None, "'auto': continue from the newest valid checkpoint in --log_dir; or a checkpoint path")
    # batch: the GPT-3 paper's 124M ("Small") recipe uses 0.5M tokens per optimizer step
    total_batch_size: int = arg(524288, "tokens per optimizer step, over all ranks and accumulation steps (2**19)")
    batch_size: str = arg("16", "sequences per micro-step on each rank, or 'auto': the largest that fits in memory "
                          "(gradient accumulation makes up the rest)")
    seq_len: int = arg(1024, "tokens per sequence, at most the model's block size (1024)")
    # optimizer and schedule: GPT-3 paper, appendix B; step counts from the 10B-token reproduction
    max_lr: float = arg(6e-4, "peak learning rate, reached after warmup")
    min_lr_ratio: float = arg(0.1, "the cosine decays to max_lr * min_lr_ratio at max_steps")
    warmup_steps: int = arg(715, "linear warmup steps (375M tokens / 2**19)")
    max_steps: int = arg(19073, "optimizer steps in all (10B tokens / 2**19: one epoch of sample-10BT)")
    weight_decay: float = arg(0.1, "AdamW weight decay on 2-D tensors")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0 = no clipping)")
    grad_checkpoint: int = arg(0, "1: recompute each block's activations in backward (less memory, ~30%% slower)")
    dropout: float = arg(0.0, "dropout on the embeddings, attention weights and residual branches (GPT-2's own "
                         "config used 0.1; 0 for pretraining on plenty of data)")
    # machine
    device: str = arg("auto", "auto, cpu, cuda or mps")
    dtype: str = arg("auto", "auto (bf16 where supported, fp16 on older GPUs, else fp32), bf16, fp16 or fp32")
    compile: str = arg("auto", "torch.compile the model: on, off, or auto (on for CUDA and CPU, falling back to "
                       "eager if compilation fails)")
    seed: int = arg(1337, "random seed (model init, data order, sampling)")
    dist_timeout: int = arg(60, "minutes a rank waits in a collective (e.g. while rank 0 writes a checkpoint) "
                            "before NCCL/gloo abort the job")
    # periodic work, in optimizer steps; 0 = off
    eval_every: int = arg(250, "val loss every this many steps (0 = off)")
    val_tokens: int = arg(20 * 65536, "val tokens per evaluation: always the same first ones of the val split")
    sample_every: int = arg(250, "print samples every this many steps (0 = off)")
    prompt: str = arg("Hello, I'm a language model,", "prompt for the samples printed during training")
    hellaswag_every: int = arg(0, "HellaSwag accuracy every this many steps (0 = off)")
    hellaswag_data: str = arg(None, "local hellaswag_val.jsonl (default: download it once)")
    hellaswag_limit: int = arg(0, "score only the first N HellaSwag examples (0 = all 10,042)")
    checkpoint_every: int = arg(5000, "write model_<step>.pt every this many steps, and at the end (0 = off)")
    keep_checkpoints: int = arg(0, "keep only the newest K model_*.pt (and the newest one known to give a finite "
                                "loss); older ones are deleted once a newer one is written (0 = keep all)")
    shuffle: int = arg(None, "1: a new seeded order of the shards, and of T-token blocks within them, every epoch; "
                       "0: file order (default: 1 for a shard directory, 0 for a text file; a resumed run keeps "
                       "its checkpoint's)")
    wandb_project: str = arg(None, "also log to this Weights & Biases project, from rank 0 (needs pip install wandb; "
                             "WANDB_MODE=offline logs without network); a resumed run continues its W&B run")
    fsdp: int = arg(0, "1: shard weights, gradients and AdamW state over the torchrun ranks (FSDP2) instead of "
                    "a full copy on each (DDP); checkpoints move freely between the two and one process")


# -----------------------------------------------------------------------------
# model


def maybe_dropout(x, p):
    # Why not F.dropout(x, 0): skipping it keeps dropout-0 runs exactly what they were without dropout
    return F.dropout(x, p) if p > 0 else x


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJ = True  # scaled at init, see GPT._init_weights

    def forward(self, x, cache=None, dropout=0.0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nh, T_past + T, hs)
        # A query attends to itself and the past. With a cache and one new token the whole past is
        # visible, so no mask is needed; with no cache the usual causal mask applies.
        assert cache is None or T == 1 or k.size(2) == T, "a cached forward takes one token at a time"
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout,
                                           is_causal=(k.size(2) == T and T > 1))  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return maybe_dropout(self.c_proj(y), dropout)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 used the tanh approximation of GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJ = True

    def forward(self, x, dropout=0.0):
        return maybe_dropout(self.c_proj(self.gelu(self.c_fc(x))), dropout)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)  # eps 1e-5, as in GPT-2
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, dropout=0.0):
        # pre-LayerNorm: the residual stream x itself is never normalized, only what branches off it
        x = x + self.attn(self.ln_1(x), cache, dropout)
        return x + self.mlp(self.ln_2(x), dropout)


class KVCache:
    """Keys and values of every token seen so far, per layer, so sampling feeds one new token per step."""

    def __init__(self, n_layer):
        self.kv = [None] * n_layer
        self.layer = 0  # which layer the next update() belongs to

    def __len__(self):
        return 0 if self.kv[0] is None else self.kv[0][0].size(2)

    def update(self, k, v):
        if self.kv[self.layer] is not None:
            k = torch.cat([self.kv[self.layer][0], k], dim=2)
            v = torch.cat([self.kv[self.layer][1], v], dim=2)
        self.kv[self.layer] = (k, v)
        self.layer = (self.layer + 1) % len(self.kv)
        return k, v


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T against targets, over the first vocab_size columns:
    F.cross_entropy((x @ weight.T)[:, :vocab_size].float(), targets), never holding all the logits.

    Why: the (N, 50304) logits are the largest tensors of training: the plain way keeps them, in 16 and
    32 bits, until backward, and then writes their gradient too. Here forward takes `rows` rows at a
    time and computes the block's loss and, at once, its share of the gradients of x and weight; so no
    logits outlive their block, and backward only scales the gradients by the incoming one
    (1/grad_accum, the fp16 loss scale). The same matmuls and casts as the plain way, no recomputation.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, rows):  # x (N, C), weight (V, C), targets (N,)
        cols = torch.arange(weight.size(0), device=x.device)  # (V,)
        loss = torch.zeros((), device=x.device)
        grad_x, grad_w = torch.empty_like(x), torch.zeros_like(weight)  # (N, C), (V, C)
        for i in range(0, x.size(0), rows):
            xi, yi = x[i: i + rows], targets[i: i + rows, None]  # (n, C), (n, 1)
            logits = xi @ weight.t()  # (n, V), bf16 under autocast, as the plain head
            z = logits.float().masked_fill(cols >= vocab_size, float("-inf"))  # padding rows never count
            lse = z.logsumexp(dim=1, keepdim=True)  # (n, 1)
            loss = loss + (lse - z.gather(1, yi)).sum()
            # d(loss of a row)/d(its logits) = softmax - one_hot(target): masking, exp and one-hot fuse
            # into one pass when compiled. Not yet divided by N: in fp16, p / N would underflow to 0
            # where the plain way multiplies by the loss scale first.
            p = (z - lse).exp()  # (n, V)
            g = torch.where(cols == yi, p - 1, p).to(logits.dtype)  # (n, V)
            grad_x[i: i + rows] = g @ weight  # (n, C)
            grad_w += g.t() @ xi  # (V, C)
        ctx.save_for_backward(grad_x, grad_w)
        return loss / x.size(0)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss / grad_x.size(0)  # the mean's 1/N times 1/grad_accum (and the fp16 loss scale)
        return grad_x * scale, grad_w * scale, None, None, None


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying (as in GPT-2): the input embedding and the output projection are one matrix.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        self.grad_checkpoint = False  # set by training to trade compute for memory
        self.dropout = 0.0  # set by training; only in train() mode
        self.loss_rows = 2048  # rows per block of the loss (ChunkedCrossEntropy); see bench/bench_train.py

    def _init_weights(self, module):
        # GPT-2 init: N(0, 0.02), biases zero; each residual projection scaled by 1/sqrt(2 * n_layer)
        # because every block adds two of them to the residual stream (GPT-2 paper, section 2.3).
        if isinstance(module, nn.Linear):
            std = 0.02 * (2 * self.config.n_layer) ** -0.5 if hasattr(module, "RESIDUAL_PROJ") else 0.02
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None):
        """(logits (B, T, padded_vocab), None) without targets; (None, mean loss) with targets: the loss
        never builds the whole logits (see ChunkedCrossEntropy)."""
        x = self.features(idx, cache)  # (B, T, C)
        if targets is None:
            return self.head(x), None
        loss = ChunkedCrossEntropy.apply(x.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                         self.config.vocab_size, self.loss_rows)
        return None, loss

    def features(self, idx, cache=None):
        """The final hidden states (B, T, C): everything but the output projection."""
        B, T = idx.shape
        start = len(cache) if cache is not None else 0
        assert start + T <= self.config.block_size, f"sequence of {start + T} > block_size {self.config.block_size}"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        p = self.dropout if self.training else 0.0
        x = maybe_dropout(self.transformer.wte(idx) + self.transformer.wpe(pos), p)  # (B, T, C)
        for block in self.transformer.h:
            if self.grad_checkpoint and self.training and cache is None:
                # keep only the block's input; backward runs the block again (same dropout masks: the
                # checkpoint restores the random state) to get what it needs
                x = torch.utils.checkpoint.checkpoint(block, x, None, p, use_reentrant=False)
            else:
                x = block(x, cache, p)
        return self.transformer.ln_f(x)

    def head(self, x):
        """Hidden states (..., C) -> logits (..., padded_vocab). Scoring only some positions (HellaSwag's
        ending tokens) can call it on just those, saving most of the largest matmul."""
        logits = self.lm_head(x)  # (..., padded_vocab)
        if self.config.padded_vocab_size > self.config.vocab_size:
            logits[..., self.config.vocab_size:] = float("-inf")  # padding rows are never a token
        return logits

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied wte/lm_head counted once

    @classmethod
    def from_pretrained(cls, path_or_name):
        """A GPT-2 from a Hugging Face checkpoint: a local directory (config.json + model.safetensors or
        pytorch_model.bin) or a hub name such as "gpt2" (downloaded through huggingface_hub)."""
        path = path_or_name
        if not os.path.isdir(path):
            if path not in PRESETS:
                raise UserError(f"model {path!r} is neither a checkpoint file, a directory, nor one of "
                                f"{', '.join(PRESETS)}; give a model_*.pt, a Hugging Face GPT-2 directory or name")
            try:
                from huggingface_hub import snapshot_download
                path = snapshot_download(path, allow_patterns=["config.json", "model.safetensors"])
            except Exception as e:
                raise UserError(f"could not download {path_or_name!r} from the Hugging Face hub ({type(e).__name__}); "
                                "check the network, or pass a local directory") from None
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise UserError(f"{path} has no config.json; give a Hugging Face GPT-2 directory")
        try:
            with open(cfg_file) as f:
                hf = json.load(f)
            config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                               n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{cfg_file} is not a GPT-2 config ({type(e).__name__}: {e}); give a GPT-2 directory") \
                from None
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            from safetensors.torch import load_file
            sd_hf = load_file(os.path.join(path, "model.safetensors"))
        elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
            sd_hf = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        else:
            raise UserError(f"{path} has neither model.safetensors nor pytorch_model.bin")
        model = cls(config)
        try:
            model.load_state_dict(hf_to_ours(sd_hf, config))
        except (KeyError, RuntimeError) as e:
            raise UserError(f"the weights in {path} are not GPT-2's ({str(e).splitlines()[0][:200]})") from None
        return model


# Hugging Face stores these four as Conv1D, (in, out): the transpose of nn.Linear's (out, in).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_to_ours(sd_hf, config):
    """Hugging Face GPT-2 state dict (any real layout) -> our state dict."""
    sd = {}
    for k, v in sd_hf.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers, and the output head that is tied to wte anyway
        sd["transformer." + k] = v.t() if k.endswith(CONV1D) else v
    wte = sd["transformer.wte.weight"]  # (vocab, C) -> padded (padded_vocab, C) with zero rows
    sd["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(config.padded_vocab_size - wte.size(0), wte.size(1))])
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def ours_to_hf(sd, config):
    """Our state dict -> Hugging Face GPT-2 layout (transformer. prefix, Conv1D weights, real vocab only)."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("_orig_mod.")
        if k == "lm_head.weight":
            continue
        if k == "transformer.wte.weight":
            v = v[: config.vocab_size]  # drop the padding rows
        out[k] = (v.t() if k.endswith(CONV1D) else v).contiguous()
    return out


def load_optimizer_state(optimizer, state, device_type):
    """AdamW's saved state, with this device's options: load_state_dict restores the saved param groups' own
    `fused` flag, so a CPU checkpoint would resume unfused on CUDA (and a CUDA one ask for fused on CPU)."""
    # before loading: load_state_dict also moves AdamW's step counters by the saved groups' flag
    groups = [{**saved, "fused": group["fused"]} for saved, group in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})


def configure_optimizer(model, lr, weight_decay, device_type):
    """AdamW as in the GPT-3 paper: betas (0.9, 0.95), eps 1e-8, weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Why: decaying 2-D tensors (matmul weights, embeddings) regularizes; decaying biases and LayerNorm
    # gains only pulls them towards zero for no benefit.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates each parameter in one pass instead of one pass per operation: one launch
    # on CUDA; on the 2-core CPU a 124M step took 0.29 s instead of 2.96 s, same results. MPS: the default.
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


# -----------------------------------------------------------------------------
# data


def load_tokens(path):
    """A uint16 token shard (.npy), memory-mapped: it is read from disk only as batches need it."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable .npy token shard ({e}); re-create it with fineweb.py") from None
    if arr.dtype != np.uint16 or arr.ndim != 1:
        raise UserError(f"{path} holds {arr.dtype} of shape {arr.shape}, expected a 1-D uint16 token array; "
                        "re-create it with fineweb.py")
    return arr


def shard_paths(data_dir, split):
    """The shards of one split ("train"/"val") in a directory: the .npy files with that word in their name
    (edufineweb_val_000000.npy), ordered by the number in their name."""
    paths = [p for p in glob.glob(os.path.join(data_dir, "*.npy"))
             if split in re.split(r"[^a-z]+", os.path.basename(p).lower())]
    return sorted(paths, key=lambda p: [int(n) for n in re.findall(r"\d+", os.path.basename(p))] or [0])


def load_split(data, split):
    """Token arrays of one split. data is a directory of .npy shards, or a text file of which the last
    10% is the val split."""
    if os.path.isdir(data):
        paths = shard_paths(data, split)
        if not paths:
            raise UserError(f"{data} has no {split} shards (*{split}*.npy); create them with fineweb.py")
        return [load_tokens(p) for p in paths]
    if not os.path.isfile(data):
        raise UserError(f"--data {data} does not exist; give a text file or a directory of .npy shards")
    try:
        with open(data, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{data} is not UTF-8 text (byte {e.start}); convert it to UTF-8 first") from None
    if not text.strip():
        raise UserError(f"{data} is empty; give a text file with some text in it")
    tokens = np.array(get_encoding().encode_ordinary(text), dtype=np.uint16)
    n_val = len(tokens) // 10
    return [tokens[: len(tokens) - n_val]] if split == "train" else [tokens[len(tokens) - n_val:]]


def get_encoding():
    import tiktoken  # imported here so that importing this file stays free of side effects
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise UserError(f"could not load the GPT-2 tokenizer ({type(e).__name__}); tiktoken downloads it once, so "
                        "connect to the network or point TIKTOKEN_CACHE_DIR at a folder holding its files") from None


class DataLoader:
    """Micro-batches of B sequences of T tokens, read through the shards epoch after epoch.

    Each shard is cut into blocks of T tokens (plus the next one, for the targets). An epoch goes through
    the shards in some order, and through each shard's blocks in some order, B blocks per micro-batch; the
    leftover blocks of a shard (fewer than B) are skipped. Unshuffled, both orders are the file order, and a
    micro-batch is B*T+1 consecutive tokens. With shuffle, epoch e permutes the shards and the blocks of each
    shard with a generator seeded by (seed, e) alone, so the order never depends on the world size, and
    blocks keep the reads local (one shard at a time, as memory-mapped shards want) while mixing documents.
    Micro-batch j of the resulting sequence goes to rank j % world_size, so N ranks with A accumulation
    steps see exactly the micro-batches one process with N*A accumulation steps sees. The position
    (epoch, shard, pos) is the same on every rank, so a checkpoint resumes on any number of ranks.
    """

    def __init__(self, shards, B, T, rank=0, world_size=1, shuffle=False, seed=0):
        # A shard shorter than one micro-batch (fineweb.py's last one may be) is skipped, with a warning.
        short = [s for s in shards if len(s) < B * T + 1]
        names = ", ".join(f"{getattr(s, 'filename', None) or 'the text'} ({len(s)} tokens)" for s in short)
        if len(short) == len(shards):
            raise UserError(f"no train data fills one micro-batch of batch_size*seq_len+1 = {B * T + 1} tokens: "
                            f"{names}; lower --batch_size or --seq_len, or use more data")
        if short and rank == 0:
            print(f"warning: skipping train shards shorter than one micro-batch ({B * T + 1} tokens): {names}",
                  file=sys.stderr)
        self.shards = [s for s in shards if len(s) >= B * T + 1]
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.shard, self.pos = 0, 0, 0  # pos: tokens of the shard read, T per block
        self._cached = (None, None)  # ((epoch, shard), block order): the blocks of the current shard

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "pos": self.pos, "shuffle": int(self.shuffle),
                "seed": self.seed}

    def load_state_dict(self, state):
        # a checkpoint from before shuffling holds only shard and pos: it continues in file order
        self.shard, self.pos = int(state["shard"]), int(state["pos"])
        self.epoch, self.shuffle, self.seed = int(state.get("epoch", 0)), bool(state.get("shuffle", 0)), \
            int(state.get("seed", 0))

    def _shard_order(self):
        """The file index of each shard, in the order this epoch reads them."""
        if not self.shuffle:
            return range(len(self.shards))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))

    def _blocks(self, i):
        """The start of each block of shard file i, in the order this epoch reads them."""
        if self._cached[0] != (self.epoch, i):
            starts = np.arange((len(self.shards[i]) - 1) // self.T) * self.T  # every block has T+1 tokens
            if self.shuffle:  # seeded by the epoch and the file, not by the position it is read at
                starts = np.random.default_rng([self.seed, self.epoch, i]).permutation(starts)
            self._cached = ((self.epoch, i), starts)
        return self._cached[1]

    def _advance(self):
        """Returns (file index, block starts) of the next micro-batch and moves past it."""
        if self.pos // self.T + self.B > len(self._blocks(self._shard_order()[self.shard])):
            self.shard, self.pos = self.shard + 1, 0
            if self.shard == len(self.shards):  # past the last shard: a new epoch
                self.epoch, self.shard = self.epoch + 1, 0
        i = self._shard_order()[self.shard]
        first = self.pos // self.T
        self.pos += self.B * self.T
        return i, self._blocks(i)[first: first + self.B]

    def next_batch(self):
        for r in range(self.world_size):  # the micro-batches of the other ranks are skipped, not read
            i, starts = self._advance()
            if r == self.rank:
                rows = [self.shards[i][s: s + self.T + 1] for s in starts]
                buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
        x = buf[:, :-1].contiguous()  # (B, T) inputs
        y = buf[:, 1:].contiguous()  # (B, T) targets: the next token at every position
        return x, y


def val_batches(shards, n_tokens, B, T, rank=0, world_size=1):
    """The fixed val set: the first n_tokens // T sequences of the val split, the same at every
    evaluation and for any world size; sequence i is evaluated on rank i % world_size."""
    tokens = np.concatenate([np.asarray(s[: n_tokens + 1]) for s in shards])[: n_tokens + 1]
    n_seq = (len(tokens) - 1) // T
    if n_seq == 0:
        raise UserError(f"the val split has {len(tokens)} tokens, fewer than seq_len+1 = {T + 1}; "
                        "lower --seq_len or give more val data")
    mine = list(range(rank, n_seq, world_size))
    for i in range(0, len(mine), B):
        rows = [torch.from_numpy(tokens[j * T: (j + 1) * T + 1].astype(np.int64)) for j in mine[i: i + B]]
        buf = torch.stack(rows)  # (b, T + 1)
        yield buf[:, :-1], buf[:, 1:]


# -----------------------------------------------------------------------------
# learning-rate schedule and batch arithmetic


def get_lr(step, max_lr, warmup_steps, max_steps, min_lr_ratio=0.1):
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr_ratio * max_lr at max_steps
    (GPT-3 paper, appendix B), flat after that."""
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def grad_accum_steps(total_batch_size, batch_size, seq_len, world_size):
    """Micro-steps per optimizer step so that all ranks together process total_batch_size tokens.
    batch_size None (--batch_size auto, not chosen yet) checks that whole sequences fill the step."""
    if batch_size is None:
        per_rank = seq_len * world_size
        if total_batch_size % per_rank != 0:
            raise UserError(f"--total_batch_size {total_batch_size} is not a multiple of seq_len * world_size = "
                            f"{seq_len} * {world_size} = {per_rank}; change --total_batch_size (e.g. to "
                            f"{max(1, total_batch_size // per_rank) * per_rank}) or --seq_len")
        return None
    per_micro = batch_size * seq_len * world_size
    if total_batch_size % per_micro != 0:
        raise UserError(f"--total_batch_size {total_batch_size} is not a multiple of batch_size * seq_len * "
                        f"world_size = {batch_size} * {seq_len} * {world_size} = {per_micro}; change "
                        f"--total_batch_size (e.g. to {max(1, total_batch_size // per_micro) * per_micro}) "
                        "or --batch_size")
    return total_batch_size // per_micro


def pick_batch_size(max_batch, fits):
    """The largest micro-batch that divides max_batch (so accumulation makes up the rest exactly), at most 64,
    for which fits(b) says it fits in memory."""
    for b in range(min(max_batch, 64), 0, -1):
        if max_batch % b == 0 and fits(b):
            return b
    raise UserError("not even --batch_size 1 fits in memory; use --grad_checkpoint 1, a smaller --seq_len or a "
                    "smaller model")


def activation_bytes_per_token(config, dtype, grad_checkpoint=False):
    """Rough training memory per token beyond weights and optimizer: 34*E bytes per layer in 16-bit with
    flash attention (Korthikanti et al. 2022, "Reducing Activation Recomputation", section 4), double in fp32;
    with checkpointing only each block's input (2*E) plus one block's activations; and the loss's fp32
    gradient of the final hidden states (4*E). The logits are not kept per token: see batch_fits."""
    scale = 1 if dtype in ("bf16", "fp16") else 2
    per_layer = 34 * config.n_embd * scale
    layers = config.n_layer * 2 * config.n_embd * scale + per_layer if grad_checkpoint else config.n_layer * per_layer
    return layers + 4 * config.n_embd


def batch_fits(model, b, seq_len, rt, grad_checkpoint):
    """Does a micro-batch of b sequences fit? On CUDA by trial (forward and backward, plus room for the AdamW
    state that is not allocated yet); elsewhere from the memory formula and the RAM available."""
    n_params = model.num_params()
    if rt.device_type == "cuda":
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(rt.device)  # net of the CUDA context and of other processes
        base = torch.cuda.memory_reserved(rt.device)  # the weights, already on the card
        torch.cuda.reset_peak_memory_stats(rt.device)
        try:  # the eager model: compiled training keeps fewer intermediates, so this errs on the safe side
            x = torch.randint(0, model.config.vocab_size, (b, seq_len), device=rt.device)
            with rt.autocast():
                loss = model(x, x)[1]
            loss.backward()
            peak = torch.cuda.max_memory_reserved(rt.device) - base  # reserved: the allocator's cache counts
        except torch.cuda.OutOfMemoryError:
            peak = float("inf")
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        return cuda_batch_fits(peak, n_params, free, rt.ddp)
    try:  # MemAvailable counts the page cache that the kernel can reclaim (the memory-mapped shards)
        with open("/proc/meminfo") as f:
            free = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux: assume half of the RAM is free
        free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    free //= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    need = 16 * n_params + b * seq_len * activation_bytes_per_token(model.config, rt.dtype, grad_checkpoint)
    # one block of the loss at a time (ChunkedCrossEntropy): its logits, fp32 softmax and gradient, ~16 bytes each
    need += min(b * seq_len, model.loss_rows) * model.config.padded_vocab_size * 16
    return need < 0.6 * free


def cuda_batch_fits(trial_peak, n_params, free, ddp):
    """Decides from a trial step's peak memory (gradients and activations, bytes reserved) whether training fits
    in `free` bytes of the card: plus AdamW's two fp32 moments (8 bytes per parameter, allocated at the first
    step), and a margin of 10% and 512 MiB for what a trial cannot see (NCCL's buffers under DDP, fragmentation,
    the optimizer's temporaries). DDP's buckets hold the gradients themselves (gradient_as_bucket_view)."""
    margin = 0.1 * free + (512 << 20) * (2 if ddp else 1)
    return trial_peak + 8 * n_params < free - margin


def flops_per_token(config, T):
    """Training FLOPs per token: 6 per parameter in matmuls (forward 2, backward 4) plus attention's
    12 * L * E * T (PaLM paper, appendix B)."""
    L, E, V = config.n_layer, config.n_embd, config.padded_vocab_size
    return 6 * (12 * L * E * E + V * E) + 12 * L * E * T


# Dense peak TFLOP/s per card from NVIDIA's data sheets (with-sparsity figures halved): (16-bit tensor cores,
# fp32 runs), where fp32 runs use TF32 tensor cores from Ampere on (setup_runtime) and plain fp32 before.
# Keys are whole device names, as torch.cuda.get_device_name() reports them without the vendor words, so that
# "L4" is not "L40" and a MIG slice ("... MIG 1g.10gb"), which has a fraction of the card, has no entry.
GPU_PEAK_TFLOPS = {
    "H100 80GB HBM3": (989, 495), "H100 PCIe": (756, 378), "H100 NVL": (835, 418),  # SXM, PCIe, NVL
    "H200": (989, 495), "H200 NVL": (835, 418),
    "A100-SXM4-80GB": (312, 156), "A100-SXM4-40GB": (312, 156), "A100-PCIE-40GB": (312, 156),
    "A100 80GB PCIe": (312, 156), "A10": (125, 62.5), "L40S": (362, 183), "L40": (181, 90.5), "L4": (121, 60),
    "RTX 4090": (165, 82.6), "RTX 3090": (71, 35.6),
    "V100-SXM2-16GB": (125, 15.7), "V100-SXM2-32GB": (125, 15.7), "V100-PCIE-16GB": (112, 14),
    "V100-PCIE-32GB": (112, 14), "T4": (65, 8.1),  # Volta and Turing: fp16 tensor cores, no bf16
    "GTX 960": (2.4, 2.4),  # Maxwell: no tensor cores, fp16 at the fp32 rate
}


def peak_flops(rt):
    """The device's peak FLOP/s in the training dtype, for MFU: a table for GPUs (None for a card it does not
    know, or a MIG slice); on CPU, measured on the spot with a matmul."""
    if rt.device_type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        for word in ("NVIDIA ", "Tesla ", "GeForce ", "Quadro "):
            name = name.replace(word, "")
        peaks = GPU_PEAK_TFLOPS.get(name.strip())
        return None if peaks is None else peaks[0 if rt.dtype in ("bf16", "fp16") else 1] * 1e12
    if rt.device_type != "cpu":
        return None
    # the fastest of a few large square matmuls in the training dtype: what the cores can do at best
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    times = []
    with rt.autocast():
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * 2048 ** 3 / min(times[1:])


# -----------------------------------------------------------------------------
# device, dtype and distributed setup


@dataclass
class Runtime:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    master: bool
    device: str
    device_type: str
    dtype: str  # "bf16", "fp16" or "fp32"

    def autocast(self):
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16 if self.dtype == "bf16" else torch.float16)


def cpu_has_bf16():
    # Only AVX512-BF16 or AMX do bf16 matmuls natively; elsewhere they are emulated and slower than fp32.
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: stay with fp32
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "bf16", "fp16", "fp32")


def cuda_arch_supported(capability, arch_list):
    """Does this PyTorch build carry kernels for a GPU of this compute capability? Code built for sm_XY runs on
    X.y for y >= Y (same major version); PTX for compute_XY is compiled by the driver for any capability >= X.Y
    (NVIDIA's CUDA C++ Programming Guide, "Binary Compatibility" and "PTX Compatibility")."""
    if not any(a.startswith(("sm_", "compute_")) for a in arch_list):
        return True  # a ROCm build lists gfx targets: AMD GPUs are not judged here
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        if number.isdigit():  # "sm_90a" and the like are tied to one chip: the plain "sm_90" is listed beside
            built = (int(number[:-1]), int(number[-1]))
            if (kind == "sm" and built[0] == capability[0] and built[1] <= capability[1]) or \
                    (kind == "compute" and built <= tuple(capability)):
                return True
    return False


def setup_runtime(device="auto", dtype="auto", check=None, dist_timeout=60):
    """The one place that reads the environment: rank and world size from torchrun, the device, the dtype.
    check(world_size), if given, validates the flags before any device or process-group setup. It sets
    process-wide state, as a training program should: deterministic algorithms and the thread count on CPU,
    TF32 matmuls for fp32 on CUDA, the current GPU, the process group."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # set by torchrun
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    for name, value, choices in (("device", device, DEVICES), ("dtype", dtype, DTYPES)):
        if value not in choices:
            raise UserError(f"unknown --{name} {value}; use {', '.join(choices)}")
    if check is not None:
        check(world_size)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but PyTorch sees no CUDA GPU; use --device cpu (or auto)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps but MPS is not available here; use --device cpu (or auto)")
    if device == "mps" and ddp:
        raise UserError("torchrun cannot train on MPS (its gloo backend does not carry MPS tensors); run one "
                        "process on MPS, or torchrun with --device cpu")
    device_type = device
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs; use "
                            f"--nproc_per_node={torch.cuda.device_count()} or fewer")
        device = f"cuda:{local_rank}"
        name, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        arch_list = torch.cuda.get_arch_list()
        if not cuda_arch_supported(capability, arch_list):
            # e.g. a GTX 960 (Maxwell, 5.2) with a CUDA 12.8+ build: it would die at the first kernel
            fix = ("a newer PyTorch built for a newer CUDA (pip install -U torch)" if capability >= (7, 5) else
                   "a build for CUDA 12.6, the last with Maxwell, Pascal and Volta: pip install 'torch<2.15' "
                   "--index-url https://download.pytorch.org/whl/cu126 (see README)")
            raise UserError(f"this PyTorch build has no kernels for the {name} (compute capability "
                            f"{capability[0]}.{capability[1]}; it has {' '.join(arch_list)}); install {fix}, or use "
                            "--device cpu")
        torch.cuda.set_device(device)
    bf16_ok = (torch.cuda.is_bf16_supported(including_emulation=False) if device_type == "cuda"
               else cpu_has_bf16() if device_type == "cpu" else False)
    if dtype == "auto":
        # bf16 where the hardware does it natively; fp16 (with a GradScaler) on older GPUs such as the
        # GTX 960 this project started on; fp32 everywhere else.
        dtype = "bf16" if bf16_ok else "fp16" if device_type == "cuda" else "fp32"
    if dtype == "bf16" and device_type == "cuda" and not bf16_ok:
        raise UserError("--dtype bf16 but this GPU has no bf16 support; use --dtype fp16 (or auto)")
    if dtype == "fp16" and device_type == "cpu":
        raise UserError("--dtype fp16 is not supported for training on CPU; use --dtype bf16 or fp32 (or auto)")
    if device_type == "cuda" and dtype == "fp32":
        # fp32 matmuls on TF32 tensor cores (Ampere and newer; ignored before): 10 mantissa bits in the
        # products, fp32 accumulation, ~8x the fp32 throughput. The GPT-2 reproduction recipes train this way.
        torch.set_float32_matmul_precision("high")
    if device_type == "cpu":
        # Bitwise reproducibility on CPU. Compiled, the backward of an embedding lookup is a scatter-add
        # that Inductor runs as a parallel loop of atomic adds (index_put with accumulate=True lowers to
        # ir.Scatter(scatter_mode="atomic_add") in torch/_inductor/lowering.py). Where a token or position
        # repeats in a batch, its gradient row is summed in whatever order the threads arrive, and float
        # addition is not associative: two runs differed by ~1e-9. Deterministic mode makes Inductor call
        # ATen's index_put_ instead, which accumulates serially on CPU. Filling new tensors with NaN (on by
        # default in that mode, to catch reads of uninitialized memory) only costs time, so it is off.
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        # torchrun sets OMP_NUM_THREADS=1 per process; share the cores between the local ranks instead.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if ddp and not dist.is_initialized():
        # The default timeout (10 minutes for NCCL) would abort the job while rank 0 alone writes a big
        # checkpoint (gpt2-xl: ~19 GB) and the others wait for it in the next collective.
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=dist_timeout))
    return Runtime(ddp, rank, local_rank, world_size, rank == 0, device, device_type, dtype)


# -----------------------------------------------------------------------------
# sharded data parallel (FSDP2): each of N ranks keeps 1/N of the weights, gradients and AdamW state


def shard_model(model, rt, compile_blocks):
    """--fsdp 1: shards the model in place over the ranks. Each block is one FSDP unit: its weights are
    all-gathered just before its forward (and again in backward) and freed after, so only about one block
    is ever whole. The root unit holds the rest, among them wte and lm_head: one tied matrix, which must
    live in one unit to stay one tensor. On bf16 hardware the gathered weights are bf16 for compute, while
    the shards (the master weights AdamW updates) and the gradient reduction stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if rt.dtype == "bf16" \
        else MixedPrecisionPolicy()
    for block in model.transformer.h:
        if compile_blocks:  # per block: one graph reused by every layer; FSDP's communication stays outside
            block.compile()
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    assert model.transformer.wte.weight is model.lm_head.weight  # still tied


def dcp_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def training_state(model, optimizer, fsdp):
    """The model and optimizer state dicts as one unsharded process has them: what a checkpoint holds, so
    that it resumes in any mode. Under FSDP every rank must call this: the shards are gathered to rank 0,
    in CPU memory (the other ranks get empty dicts)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    model_sd = get_model_state_dict(model, options=dcp_options(cpu_offload=True))
    optim_sd = get_optimizer_state_dict(model, optimizer, options=dcp_options(cpu_offload=True))
    if dist.get_rank() != 0:
        return {}, {}
    # These helpers key the optimizer state by parameter name; torch.optim, and so our checkpoints, by the
    # parameter's position in the param groups.
    ids = {name: i for i, name in enumerate(n for g in optim_sd["param_groups"] for n in g["params"])}
    groups = [{**g, "params": [ids[n] for n in g["params"]]} for g in optim_sd["param_groups"]]
    return model_sd, {"state": {ids[n]: v for n, v in optim_sd["state"].items()}, "param_groups": groups}


def load_training_state(model, optimizer, ckpt, fsdp, device_type):
    """Loads a checkpoint's model and optimizer state (written in any mode). Under FSDP rank 0's copy is
    broadcast and each rank keeps its shard."""
    if not fsdp:
        model.load_state_dict(ckpt["model"])
        load_optimizer_state(optimizer, ckpt["optimizer"], device_type)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    name = {p: n for n, p in model.named_parameters()}
    names = [name[p] for g in optimizer.param_groups for p in g["params"]]  # position -> parameter name
    model_sd, optim_sd = {}, {}
    if dist.get_rank() == 0:
        model_sd, sd = ckpt["model"], ckpt["optimizer"]
        optim_sd = {"state": {names[i]: v for i, v in sd["state"].items()},
                    "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
    set_model_state_dict(model, model_sd, options=dcp_options(broadcast_from_rank0=True))
    set_optimizer_state_dict(model, optimizer, optim_sd, options=dcp_options(broadcast_from_rank0=True))


def hellaswag_totals(model, examples, enc, batch_size, rt, fsdp):
    """HellaSwag counts (n, correct, correct_norm), summed over the ranks. Under FSDP each forward gathers
    weights from every rank, so all ranks must run the same number: the examples that do not split evenly
    are scored on every rank and counted once; and the root's weights, which HellaSwag's calls to
    features() and head() (not forward()) would find sharded, are gathered for the duration."""
    import hellaswag
    split = len(examples) - len(examples) % rt.world_size if fsdp else len(examples)
    score = lambda ex, rank, world: hellaswag.score(model, ex, enc, rt.device, batch_size=batch_size,  # noqa: E731
                                                    autocast=rt.autocast, rank=rank, world_size=world)
    with gathered_root(model, rt, fsdp):
        parts = [score(examples[:split], rt.rank, rt.world_size)]
        if split < len(examples):
            rest = score(examples[split:], 0, 1)
            parts.append(rest if rt.master else dict.fromkeys(rest, 0))
    totals = torch.tensor([sum(p[k] for p in parts) for k in ("n", "correct", "correct_norm")], device=rt.device)
    if rt.ddp:
        dist.all_reduce(totals)
    return totals


@contextlib.contextmanager
def gathered_root(model, rt, fsdp):
    if fsdp:
        with torch.no_grad():  # FSDP sets itself up in the first forward(), which a resumed run may not have had
            model(torch.zeros(1, 1, dtype=torch.long, device=rt.device))
        model.unshard()
    try:
        yield
    finally:
        if fsdp:
            model.reshard()


# -----------------------------------------------------------------------------
# checkpoints

CHECKPOINT_FORMAT = 1  # bump when the layout of the checkpoint dict changes
CHECKPOINT_RE = re.compile(r"^model_(\d{5,})\.pt$")


def rng_state():
    """Every random generator, as plain types and tensors so that torch.load(weights_only=True) reads it."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                  "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": np_state["key"].numpy().astype(np.uint32),
                         "pos": np_state["pos"]}, "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def write_atomic(path, write, mode="wb"):
    """Every file this program writes goes through here: write(f) fills a temporary file, which is then
    renamed to `path`, so a crash at any moment leaves either the old file or the complete new one under
    `path`, never half a file. A write that fails removes its temporary file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    """torch.save, atomically (see write_atomic); a failed write is a UserError that leaves the rest intact."""
    try:
        write_atomic(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:  # torch.save's zip writer reports a full disk as a RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed; is the disk full?"
        raise UserError(f"could not write {path}: {reason}; free some disk space or choose another --log_dir "
                        "(earlier checkpoints are intact), then continue with --resume auto") from None


def save_checkpoint(path, model, optimizer, scaler, step, loader, train_config, wandb_id=None, fsdp=False):
    """Called on every rank (under FSDP all of them gather the state); rank 0 writes the file."""
    model_sd, optimizer_sd = training_state(model, optimizer, fsdp)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    atomic_save({
        "format_version": CHECKPOINT_FORMAT,
        "model": model_sd,
        "optimizer": optimizer_sd,
        "config": dataclasses.asdict(model.config),  # GPTConfig(**ckpt["config"]) rebuilds the model
        "train_config": dataclasses.asdict(train_config),
        "step": step,  # optimizer steps done
        "loader": loader.state_dict(),
        "rng": rng_state(),
        "scaler": scaler.state_dict(),
        "wandb_id": wandb_id,  # the W&B run that a resumed run continues (a str), or None
    }, path)


def load_checkpoint(path, mmap=False):
    """A checkpoint dict, read without unpickling arbitrary objects (weights_only=True), or a UserError.
    mmap: tensors are read from disk only when used (FSDP's other ranks never use the weights: rank 0
    broadcasts them)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; check the path (or use --resume auto)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        reason = "it holds objects other than tensors, which are refused" if "weights_only" in str(e) else \
            "it is truncated or not a PyTorch file"
        raise UserError(f"{path} is not a valid checkpoint ({reason}); delete it or point to another one") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint of train_gpt2.py (no model/config/step); point to another one")
    if ckpt.get("format_version", 0) > CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {ckpt['format_version']}, newer than this train_gpt2.py "
                        f"reads ({CHECKPOINT_FORMAT}); update train_gpt2.py")
    ckpt["path"] = path  # for messages; not stored in the file
    return ckpt


def find_checkpoints(log_dir):
    """Checkpoint paths in log_dir, newest step first."""
    names = [n for n in os.listdir(log_dir) if CHECKPOINT_RE.match(n)] if os.path.isdir(log_dir) else []
    return [os.path.join(log_dir, n) for n in sorted(names, key=lambda n: -int(CHECKPOINT_RE.match(n)[1]))]


def resume_checkpoint(resume, log_dir):
    """The checkpoint dict to resume from, or None to start fresh (only where log_dir has none)."""
    def load_resumable(path):
        ckpt = load_checkpoint(path)
        missing = {"optimizer", "loader", "rng", "scaler"} - ckpt.keys()
        if missing:
            raise UserError(f"{path} holds weights but not the training state ({', '.join(sorted(missing))}); "
                            "start a new run from it with --init_from instead")
        return ckpt

    if resume != "auto":
        return load_resumable(resume)
    paths = find_checkpoints(log_dir)
    for path in paths:
        try:
            return load_resumable(path)
        except UserError as e:
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
    if paths:
        raise UserError(f"--resume auto: none of the {len(paths)} checkpoints in {log_dir} is valid; "
                        "move them away to start fresh, or --resume a good checkpoint")
    return None


def prune_checkpoints(log_dir, keep, step, protect=None):
    """--keep_checkpoints: delete all but the `keep` newest checkpoints of steps up to `step`, the one just
    written. Called only after that one is completely on disk (write_atomic), so a crash at any moment
    leaves at least one whole checkpoint. Checkpoints of later steps (left by an earlier life of the run,
    e.g. truncated ones that --resume auto skipped) are left alone: training overwrites them when it gets
    there. `protect` is never deleted: the newest checkpoint known to give a finite loss (at first the one
    this run resumed from), the one a NaN stop tells the user to go back to."""
    done = [p for p in find_checkpoints(log_dir) if int(CHECKPOINT_RE.match(os.path.basename(p))[1]) <= step]
    for path in done[keep:]:
        if not (protect and os.path.abspath(path) == os.path.abspath(protect)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def model_from_checkpoint(ckpt, path="checkpoint"):
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as e:
        raise UserError(f"{path} does not hold a GPT-2 of this program ({str(e).splitlines()[0]})") from None
    return model


def load_model(path_or_name):
    """A model from one of our checkpoints (model_*.pt) or from Hugging Face GPT-2 weights (name or directory)."""
    if os.path.isfile(path_or_name):
        return model_from_checkpoint(load_checkpoint(path_or_name), path_or_name)
    return GPT.from_pretrained(path_or_name)


# -----------------------------------------------------------------------------
# evaluation and sampling


@torch.no_grad()
def evaluate_loss(model, val_shards, n_tokens, batch_size, seq_len, rt, fsdp=False):
    """Mean cross-entropy over the fixed val tokens, split over the ranks and summed back together."""
    model.eval()
    loss_sum, count = 0.0, 0
    batches = list(val_batches(val_shards, n_tokens, batch_size, seq_len, rt.rank, rt.world_size))
    if fsdp:  # each forward gathers weights from every rank: a rank with fewer batches runs idle ones
        most = torch.tensor(len(batches), device=rt.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        batches += [(torch.zeros(1, seq_len, dtype=torch.long), None)] * (int(most) - len(batches))
    for x, y in batches:
        with rt.autocast():
            logits, _ = model(x.to(rt.device))
        if y is not None:  # None: an idle forward, counted nowhere
            loss_sum += F.cross_entropy(logits.float().flatten(0, 1), y.to(rt.device).flatten(), reduction="sum").item()
            count += y.numel()
    model.train()
    totals = torch.tensor([loss_sum, count], dtype=torch.float64, device=rt.device if rt.ddp else "cpu")
    if rt.ddp:
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
    """Continues idx (B, T) by max_new_tokens tokens. temperature 0 is greedy decoding.

    With the KV cache each new token costs one position's forward instead of the whole context's.
    When the context fills the block size, the cache is rebuilt from the last block_size tokens: exactly
    what recomputing the cropped context does, so both paths give the same tokens.
    """
    model.eval()
    block_size = model.config.block_size
    cache = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = model(idx[:, -block_size:])
        elif cache is None or len(cache) >= block_size:
            cache = KVCache(model.config.n_layer)
            logits, _ = model(idx[:, -block_size:], cache=cache)
        else:
            logits, _ = model(idx[:, -1:], cache=cache)
        logits = logits[:, -1, :].float()  # (B, vocab)
        if temperature == 0:
            next_tok = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_tok = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, next_tok], dim=1)
    return idx


def sample_texts(model, enc, prompt, num_samples, max_new_tokens, rt, temperature=1.0, top_k=50, seed=0):
    tokens = enc.encode(prompt, allowed_special="all")
    if not tokens:
        raise UserError("the prompt is empty; give some text to continue")
    idx = torch.tensor([tokens] * num_samples, dtype=torch.long, device=rt.device)  # (num_samples, T)
    gen = torch.Generator(device=rt.device).manual_seed(seed)
    with rt.autocast():
        out = generate(model, idx, max_new_tokens, temperature, top_k, gen)
    return [enc.decode(row) for row in out.tolist()]


# -----------------------------------------------------------------------------
# training


class StopSignal:
    """SIGTERM/SIGINT (preemption, Ctrl-C) ask for a clean stop: the step in progress finishes, a checkpoint
    is written, and the program exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), which
    schedulers tell from success. A second signal gets the default behaviour: exit at once. Under torchrun a
    repeated SIGTERM is expected (the scheduler signals every process and torchrun forwards its own), so
    there only a second Ctrl-C exits at once."""

    def __init__(self, ddp=False):
        self.signum = 0
        self.ddp = ddp
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum:
            return  # a repeated SIGTERM under torchrun: already stopping
        self.signum = signum
        for s in (signal.SIGINT,) if self.ddp else (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
        # os.write, not print: a handler may interrupt a print in progress
        os.write(2, f"{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                    "(signal again to exit at once)\n".encode())


TRITON_MIN_CAPABILITY = (7, 0)  # Triton, torch.compile's GPU code generator, supports Volta and newer


def torch_version():
    return tuple(int(n) for n in re.findall(r"\d+", torch.__version__)[:2])


def use_compile(flag, rt):
    """--compile on/off/auto -> whether to torch.compile. auto: on CPU and CUDA, except GPUs older than Volta."""
    old_gpu = rt.device_type == "cuda" and torch.cuda.get_device_capability(rt.device) < TRITON_MIN_CAPABILITY
    if old_gpu and flag == "on":
        raise UserError(f"--compile on needs a GPU of compute capability {TRITON_MIN_CAPABILITY[0]}.0 or newer "
                        f"(Triton); the {torch.cuda.get_device_name(rt.device)} is older: use --compile off or auto")
    if old_gpu and flag == "auto":
        if rt.master:
            print(f"compile: off: the {torch.cuda.get_device_name(rt.device)} is older than compute capability "
                  f"{TRITON_MIN_CAPABILITY[0]}.0, which Triton (torch.compile on GPUs) needs; training runs eagerly")
        return False
    return flag == "on" or (flag == "auto" and rt.device_type in ("cuda", "cpu"))


def agree_on_signal(signum, rt):
    """The signal that stops every rank (0: none): the largest any rank received, so that all ranks stop at the
    same step and exit with the same code, whichever of them got it."""
    if not rt.ddp:
        return signum
    agreed = torch.tensor(signum, device=rt.device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return int(agreed.item())


def model_config(cfg, ckpt=None, init_model=None):
    """The model shape: from the checkpoint when resuming, from the weights when fine-tuning, else the preset."""
    if cfg.model not in PRESETS:
        raise UserError(f"unknown --model {cfg.model!r}; choose one of {', '.join(PRESETS)}")
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k) is not None}
    config = GPTConfig(**{**PRESETS[cfg.model], **overrides})
    if ckpt is not None or init_model is not None:
        given = GPTConfig(**ckpt["config"]) if ckpt is not None else init_model.config
        if overrides and any(getattr(given, k) != v for k, v in overrides.items()):
            raise UserError(f"the checkpoint holds a model of shape {dataclasses.asdict(given)}, not the "
                            f"{overrides} asked for; drop the shape flags or start a new --log_dir")
        config = given
    if config.n_embd % config.n_head:
        raise UserError(f"n_embd {config.n_embd} is not divisible by n_head {config.n_head}; change one of them")
    if cfg.seq_len > config.block_size:
        raise UserError(f"--seq_len {cfg.seq_len} is larger than the model's block size {config.block_size}; "
                        f"use --seq_len {config.block_size} or less")
    return config


def rewrite_log(log_file, start_step):
    """On resume, keep only the log lines of the steps before start_step: the run repeats the rest."""
    lines = []
    if start_step > 0 and os.path.exists(log_file):
        with open(log_file) as f:
            lines = [ln for ln in f if ln.split()[:1] and ln.split()[0].isdigit() and int(ln.split()[0]) < start_step]
    write_atomic(log_file, lambda f: f.writelines(lines), mode="w")


def check_fsdp(cfg, rt):
    """--fsdp against the runtime that setup_runtime chose (world and dtype)."""
    if cfg.fsdp and not rt.ddp:
        raise UserError("--fsdp 1 shards over the ranks that torchrun starts: launch with torchrun "
                        "--nproc_per_node=N (in one process, leave --fsdp off)")
    if cfg.fsdp and rt.dtype == "fp16":
        raise UserError("--fsdp 1 trains in bf16 or fp32, not fp16 (no loss scaling for shards here); use --dtype "
                        "fp32, or DDP")


def check_scale_flags(cfg):
    """The flags of long runs at scale (checkpoint retention, data order, tracking, sharding)."""
    if cfg.fsdp not in (0, 1):
        raise UserError(f"--fsdp must be 0 or 1, got {cfg.fsdp}")
    if cfg.fsdp and cfg.batch_size == "auto":
        raise UserError("--batch_size auto measures an unsharded model, not an FSDP one; give --batch_size N with "
                        "--fsdp 1")
    if cfg.keep_checkpoints < 0:
        raise UserError(f"--keep_checkpoints must not be negative, got {cfg.keep_checkpoints} (0 keeps all)")
    if cfg.shuffle not in (None, 0, 1):
        raise UserError(f"--shuffle must be 0 or 1, got {cfg.shuffle}")
    if data_shuffle(cfg) and cfg.seed < 0:
        raise UserError(f"--seed must not be negative to shuffle the data, got {cfg.seed}; or use --shuffle 0")
    if cfg.wandb_project is not None:
        import_wandb()  # missing: say so before anything is written


def data_shuffle(cfg):
    """--shuffle, or its default: shuffle shard directories (many documents, read again every epoch); keep a
    text file (one document, usually small) in order, as before --shuffle existed."""
    return bool(cfg.shuffle if cfg.shuffle is not None else os.path.isdir(cfg.data))


def check_data_order(cfg, ckpt, master):
    """A resumed run continues in its checkpoint's data order: changing it mid-epoch would repeat or skip data."""
    was = int(ckpt["loader"].get("shuffle", 0))
    if cfg.shuffle is not None and cfg.shuffle != was:
        raise UserError(f"{ckpt['path']} was trained with --shuffle {was}; resume with --shuffle {was} or without "
                        "the flag")
    if master and "shuffle" not in ckpt["loader"] and data_shuffle(cfg):
        print(f"{ckpt['path']} is from before --shuffle: the data continues in file order")


def import_wandb():
    try:
        import wandb  # optional: only runs with --wandb_project need it installed
    except ImportError:
        raise UserError("--wandb_project needs the wandb package: pip install wandb (or drop --wandb_project)") \
            from None
    return wandb


def start_wandb(cfg, run_id, config):
    """--wandb_project: a W&B run (on rank 0) that gets the events of log.txt and the per-step numbers of stdout.
    run_id (from the checkpoint) continues that run; None starts a new one. Its files go to --log_dir/wandb."""
    wandb = import_wandb()
    try:
        run = wandb.init(project=cfg.wandb_project, id=run_id, resume="allow", dir=cfg.log_dir, config=config)
    except Exception as e:  # no API key, no network, a bad project name...
        raise UserError(f"could not start the W&B run ({type(e).__name__}: {str(e).splitlines()[0][:200]}); run "
                        "`wandb login`, set WANDB_MODE=offline, or drop --wandb_project") from None
    # The x axis is our step, not W&B's own counter: a resumed run logs again the steps after its checkpoint.
    run.define_metric("*", step_metric="step")
    return run


WANDB_KEYS = {"train": "train/loss", "val": "val/loss", "hella": "hellaswag/acc_norm"}  # log.txt kind -> W&B key


def check_config(cfg, world_size):
    """Every flag that can be checked alone, before any device or process-group setup: a typo costs nothing,
    and under torchrun no rank starts NCCL/gloo only to stop again."""
    if cfg.batch_size != "auto" and not (cfg.batch_size.isdigit() and int(cfg.batch_size) > 0):
        raise UserError(f"--batch_size must be a positive number or auto, got {cfg.batch_size}")
    for name in ("seq_len", "total_batch_size", "max_steps", "val_tokens", "max_lr", "dist_timeout"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {cfg.dropout}; GPT-2 used 0.1")
    for name in ("warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "eval_every", "sample_every",
                 "hellaswag_every", "checkpoint_every", "hellaswag_limit"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    if cfg.compile not in ("auto", "on", "off"):  # (--device and --dtype: setup_runtime checks them first)
        raise UserError(f"unknown --compile {cfg.compile}; use auto, on, off")
    if cfg.resume and cfg.init_from:
        raise UserError("--resume and --init_from exclude each other: resume continues a run, init_from starts one")
    if not os.path.exists(cfg.data):
        raise UserError(f"--data {cfg.data} does not exist; give a text file or a directory of .npy shards")
    if cfg.hellaswag_every and cfg.hellaswag_data and not os.path.isfile(cfg.hellaswag_data):
        raise UserError(f"HellaSwag file {cfg.hellaswag_data} does not exist; fix --hellaswag_data or leave "
                        "--hellaswag_every at 0")
    if not cfg.resume and not cfg.init_from:
        model_config(cfg)  # the shape flags (a resumed or fine-tuned model's shape is checked once it is read)
    grad_accum_steps(cfg.total_batch_size, None if cfg.batch_size == "auto" else int(cfg.batch_size), cfg.seq_len,
                     world_size)
    if cfg.sample_every and not get_encoding().encode(cfg.prompt, allowed_special="all"):
        raise UserError("--prompt is empty; give some text for the samples (or --sample_every 0)")
    check_scale_flags(cfg)


def train_step(model, optimizer, scaler, loader, grad_accum, lr, grad_clip, rt, fsdp=False):
    """One optimizer step: grad_accum micro-steps on every rank, gradients averaged once at the end.
    Returns the mean loss (a tensor, for the log) and the gradient norm before clipping."""
    model.train()
    loss_accum = torch.zeros((), device=rt.device)
    for micro in range(grad_accum):
        x, y = loader.next_batch()
        if rt.device_type == "cuda":  # page-locked host memory lets the copy overlap with GPU work
            x, y = x.pin_memory().to(rt.device, non_blocking=True), y.pin_memory().to(rt.device, non_blocking=True)
        else:
            x, y = x.to(rt.device), y.to(rt.device)
        # DDP all-reduces gradients in backward(); only the last micro-step needs to. FSDP reduce-scatters
        # them in every backward: that keeps each rank's gradients a shard (memory is FSDP's point).
        sync = contextlib.nullcontext() if not rt.ddp or fsdp or micro == grad_accum - 1 else model.no_sync()
        with sync:
            with rt.autocast():
                loss = model(x, y)[1]  # only the loss: holding the (B, T, vocab) logits through backward costs GBs
            # Why divide: the gradient of the mean over all micro-batches, not the sum
            loss = loss / grad_accum
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
    if rt.ddp:  # for the log only: the mean loss over ranks (SUM, since gloo before torch 2.8 has no AVG)
        dist.all_reduce(loss_accum)
        loss_accum /= rt.world_size
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_accum, norm


def train(cfg):
    rt = setup_runtime(cfg.device, cfg.dtype, check=lambda world_size: check_config(cfg, world_size),
                       dist_timeout=cfg.dist_timeout)
    check_fsdp(cfg, rt)
    if not cfg.resume and find_checkpoints(cfg.log_dir):
        raise UserError(f"{cfg.log_dir} already holds checkpoints of a run; continue it with --resume auto, or "
                        "start a new run with another --log_dir")
    ckpt = resume_checkpoint(cfg.resume, cfg.log_dir) if cfg.resume and rt.master else None
    if cfg.resume and rt.ddp:  # rank 0 chooses; every rank then loads that same checkpoint
        chosen = [ckpt["path"] if ckpt else None]
        dist.broadcast_object_list(chosen, src=0)
        if not rt.master and chosen[0]:
            if not os.path.isfile(chosen[0]):
                raise UserError(f"rank {rt.rank} cannot see {chosen[0]}; put --log_dir on storage every node shares")
            ckpt = load_checkpoint(chosen[0], mmap=bool(cfg.fsdp))
    last_good = ckpt["path"] if ckpt else None  # the newest checkpoint known to give a finite loss
    init_model = load_model(cfg.init_from) if cfg.init_from else None
    config = model_config(cfg, ckpt, init_model)
    max_batch = cfg.total_batch_size // (cfg.seq_len * rt.world_size)  # sequences per rank and optimizer step
    train_shards = load_split(cfg.data, "train")
    val_shards = load_split(cfg.data, "val") if cfg.eval_every else None

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = init_model or GPT(config)
    model.to(rt.device)
    model.grad_checkpoint = bool(cfg.grad_checkpoint)
    model.dropout = cfg.dropout
    compile_model = use_compile(cfg.compile, rt)
    if cfg.fsdp:  # before the optimizer and the checkpoint load, which both work on the shards
        shard_model(model, rt, compile_model)
    batch_size = (pick_batch_size(max_batch, lambda b: batch_fits(model, b, cfg.seq_len, rt, cfg.grad_checkpoint))
                  if cfg.batch_size == "auto" else int(cfg.batch_size))
    if rt.ddp and cfg.batch_size == "auto":  # every rank must use the same: the smallest that fits everywhere
        agreed = torch.tensor(batch_size, device=rt.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        batch_size = int(agreed.item())
    grad_accum = grad_accum_steps(cfg.total_batch_size, batch_size, cfg.seq_len, rt.world_size)
    train_loader = DataLoader(train_shards, batch_size, cfg.seq_len, rt.rank, rt.world_size, data_shuffle(cfg),
                              cfg.seed)
    optimizer = configure_optimizer(model, cfg.max_lr, cfg.weight_decay, rt.device_type)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 have fp32's exponent range and need none
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "fp16")
    start_step = 0
    if ckpt is not None:
        load_training_state(model, optimizer, ckpt, cfg.fsdp, rt.device_type)
        if scaler.is_enabled() and ckpt["scaler"]:  # a bf16/fp32 run's scaler holds nothing to restore
            scaler.load_state_dict(ckpt["scaler"])
        if ckpt["loader"]["shard"] >= len(train_shards):
            raise UserError(f"{ckpt['path']} was trained on more shards than --data {cfg.data} has; resume with "
                            "the same --data")
        check_data_order(cfg, ckpt, rt.master)
        train_loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        start_step = ckpt["step"]
    wandb_id = ckpt.get("wandb_id") if ckpt else None
    del ckpt, init_model

    # The model we train may be compiled and DDP-wrapped; evaluation and sampling use the plain module,
    # which shares its weights, so they are never slowed down by recompilation.
    raw_model = model
    if compile_model:
        # Why compile: it fuses the elementwise work around the matmuls (casts, GELU, LayerNorm, and the
        # softmax over 50304 logits) into few kernels; measured 1.8x on a 2-core CPU for GPT-2 124M.
        import torch._dynamo as dynamo
        dynamo.config.suppress_errors = cfg.compile == "auto"  # auto: no C++ compiler? run eager
        if rt.ddp and cfg.grad_checkpoint and torch_version() < (2, 6):
            dynamo.config.optimize_ddp = False  # DDPOptimizer could not split checkpointed blocks before 2.6
        model = model if cfg.fsdp else torch.compile(model)  # FSDP: each block is compiled (shard_model)
    if rt.ddp and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets, not in a second copy
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None,
                    gradient_as_bucket_view=True)

    log_file = os.path.join(cfg.log_dir, "log.txt")
    enc = get_encoding() if cfg.sample_every else None
    hella = None
    if rt.master:
        try:
            os.makedirs(cfg.log_dir, exist_ok=True)
            rewrite_log(log_file, start_step)
        except OSError as e:
            raise UserError(f"cannot write to --log_dir {cfg.log_dir} ({e.strerror}); choose a writable directory") \
                from None
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, {dataclasses.asdict(config)}")
        print(f"device {rt.device} ({rt.dtype}), world size {rt.world_size}, {cfg.total_batch_size} tokens/step = "
              f"{batch_size} x {cfg.seq_len} x {rt.world_size} ranks x {grad_accum} accumulation steps")
        if start_step:
            print(f"resumed at step {start_step}")
    tracker = None
    if cfg.wandb_project is not None and rt.master:
        tracker = start_wandb(cfg, wandb_id, {**dataclasses.asdict(cfg), "model_config": dataclasses.asdict(config),
                                              "world_size": rt.world_size, "batch_size": batch_size,
                                              "grad_accum": grad_accum, "num_params": raw_model.num_params()})
        wandb_id = tracker.id
    if cfg.hellaswag_every:
        import hellaswag
        try:
            if rt.master:  # one download, then everyone reads the cached file
                hellaswag.load_examples(cfg.hellaswag_data, limit=cfg.hellaswag_limit)
            if rt.ddp:
                dist.barrier()
            hella = hellaswag.load_examples(cfg.hellaswag_data, limit=cfg.hellaswag_limit)
        except hellaswag.HellaSwagError as e:
            raise UserError(f"{e}; fix --hellaswag_data or leave --hellaswag_every at 0") from None
        enc = enc or get_encoding()

    def log(line, extra=None):
        """One event for log.txt (<step> <kind> <value>), and for W&B with the extra numbers (None: not known)."""
        if rt.master:
            try:
                with open(log_file, "a") as f:
                    f.write(line + "\n")
            except OSError as e:
                raise UserError(f"cannot append to {log_file} ({e.strerror}); free some disk space and "
                                "continue with --resume auto") from None
            if tracker is not None:
                step, kind, value = line.split()
                extra = {k: v for k, v in (extra or {}).items() if v is not None}
                tracker.log({"step": int(step), WANDB_KEYS[kind]: float(value), **extra})

    def checkpoint(path, step):
        """Every rank calls it (FSDP gathers the shards); rank 0 writes, then prunes older ones."""
        save_checkpoint(path, raw_model, optimizer, scaler, step, train_loader, cfg, wandb_id, cfg.fsdp)
        if rt.master and cfg.keep_checkpoints:
            prune_checkpoints(cfg.log_dir, cfg.keep_checkpoints, step, last_good)

    peak = peak_flops(rt)
    tokens_flops = flops_per_token(config, cfg.seq_len)
    stop = StopSignal(rt.ddp)
    stop_for = 0  # the signal every rank stops for (0: none)
    new_ckpt = None
    for step in range(start_step, cfg.max_steps + 1):
        last = step == cfg.max_steps
        ckpt_path = os.path.join(cfg.log_dir, f"model_{step:05d}.pt")
        if stop_for:
            checkpoint(ckpt_path, step)
            if rt.master:
                print(f"stopped by signal at step {step}; wrote {ckpt_path}; continue with --resume auto")
            if rt.ddp:  # no rank leaves before the checkpoint is written: torchrun stops all once one exits
                dist.barrier()
            sys.exit(128 + stop_for)
        if cfg.eval_every and (step % cfg.eval_every == 0 or last):
            val_loss = evaluate_loss(raw_model, val_shards, cfg.val_tokens, batch_size, cfg.seq_len, rt, cfg.fsdp)
            log(f"{step} val {val_loss:.6f}")
            if rt.master:
                print(f"step {step:5d} | val loss {val_loss:.6f}")
        if hella is not None and (step % cfg.hellaswag_every == 0 or last):
            import hellaswag
            totals = hellaswag_totals(raw_model, hella, enc, batch_size, rt, cfg.fsdp)
            acc = hellaswag.accuracies(dict(zip(("n", "correct", "correct_norm"), totals.tolist())))
            log(f"{step} hella {acc['acc_norm']:.6f}")
            if rt.master:
                print(f"step {step:5d} | hellaswag acc_norm {acc['acc_norm']:.4f} ({acc['n']} examples)")
        # under FSDP every rank samples (the same texts): each forward needs all of them
        if cfg.sample_every and (rt.master or cfg.fsdp) and step > 0 and (step % cfg.sample_every == 0 or last):
            for i, text in enumerate(sample_texts(raw_model, enc, cfg.prompt, 4, 32, rt, seed=cfg.seed + step)):
                if rt.master:
                    print(f"sample {i}: {text!r}")
        if cfg.checkpoint_every and step > start_step and (step % cfg.checkpoint_every == 0 or last):
            checkpoint(ckpt_path, step)
            new_ckpt = ckpt_path
        if last:
            if rt.ddp:  # leave together: a rank that tears down the group while others still use it can abort
                dist.barrier()
            if tracker is not None:
                tracker.finish()
            if rt.master and rt.device_type == "cuda":
                print(f"peak GPU memory {torch.cuda.max_memory_allocated(rt.device) / 2**30:.2f} GiB")
            break

        t0 = time.perf_counter()
        lr = get_lr(step, cfg.max_lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        try:
            loss_accum, norm = train_step(model, optimizer, scaler, train_loader, grad_accum, lr, cfg.grad_clip, rt,
                                          cfg.fsdp)
        except torch.OutOfMemoryError:
            smaller = next((f"--batch_size {b}, " for b in range(batch_size - 1, 0, -1) if max_batch % b == 0), "")
            raise UserError(f"out of memory on {rt.device} at step {step} with --batch_size {batch_size} and "
                            f"--seq_len {cfg.seq_len}; use {smaller}--grad_checkpoint 1 or a smaller --seq_len "
                            "(gradient accumulation keeps --total_batch_size)") from None
        stop_for = agree_on_signal(stop.signum, rt)
        loss_val = loss_accum.item()  # waits for the step to finish on the device
        dt = time.perf_counter() - t0
        if not math.isfinite(loss_val):
            raise UserError(f"the loss is {loss_val} at step {step}; stopping. Last good checkpoint: "
                            f"{last_good or 'none'}; resume from it with a lower --max_lr")
        if new_ckpt and new_ckpt != last_good:  # its weights just gave a finite loss
            last_good = new_ckpt
            if rt.master and cfg.keep_checkpoints:  # the one it replaces as last good may go now
                prune_checkpoints(cfg.log_dir, cfg.keep_checkpoints, step, last_good)
        tok_s = cfg.total_batch_size / dt
        mfu = 100 * tok_s * tokens_flops / (peak * rt.world_size) if peak else None  # percent
        log(f"{step} train {loss_val:.6f}", {"train/lr": lr, "train/grad_norm": norm.item(), "train/tok_per_s": tok_s,
                                             "train/mfu": mfu})
        if rt.master:
            mfu = f"{mfu:.1f}%" if mfu is not None else "n/a"
            print(f"step {step:5d} | loss {loss_val:.6f} | lr {lr:.4e} | norm {norm.item():.4f} | "
                  f"{1000 * dt:.1f} ms | {tok_s:,.0f} tok/s | MFU {mfu}")


# -----------------------------------------------------------------------------
# main: train (the default), sample, export, plot


def train_main(argv):
    parser = argparse.ArgumentParser(prog="train_gpt2.py", description="Train GPT-2. Subcommands: sample, "
                                     "export, plot (python train_gpt2.py sample --help).")
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{f.name}", type=f.type, default=f.default,
                            help=f.metadata["help"] + ("" if "default" in f.metadata["help"] else " (default: %(default)s)"))
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            gc.collect()  # free the DDP wrapper (and its hold on the process group) before destroying the group
            dist.destroy_process_group()


def sample_main(argv):
    parser = argparse.ArgumentParser(prog="train_gpt2.py sample", description="Generate text from a model.")
    parser.add_argument("--checkpoint", default="gpt2", help="a model_*.pt checkpoint, or Hugging Face GPT-2 "
                        "weights: a name (gpt2, gpt2-medium, ...) or a directory (default: %(default)s)")
    parser.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue (default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--num_samples", type=int, default=4, help="continuations per prompt (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k likeliest tokens, 0 = all "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32 (default: %(default)s)")
    parser.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, "
                        "until end of input (default: off)")
    args = parser.parse_args(argv)
    if args.max_new_tokens <= 0 or args.num_samples <= 0 or args.temperature < 0 or args.top_k < 0:
        raise UserError("--max_new_tokens and --num_samples must be positive, --temperature and --top_k >= 0")
    rt = setup_runtime(args.device, args.dtype)
    model = load_model(args.checkpoint).to(rt.device)
    enc = get_encoding()
    ask = "prompt> " if sys.stdin.isatty() else ""  # no prompt text in piped output
    prompts = iter(lambda: input(ask), None) if args.interactive else [args.prompt]
    try:
        for prompt in prompts:
            if not prompt.strip():
                continue
            texts = sample_texts(model, enc, prompt, args.num_samples, args.max_new_tokens, rt,
                                 args.temperature, args.top_k, args.seed)
            for i, text in enumerate(texts):
                print(f"--- sample {i}\n{text}", flush=True)
    except EOFError:
        pass


def export_main(argv):
    parser = argparse.ArgumentParser(prog="train_gpt2.py export",
                                     description="Write a checkpoint as a Hugging Face GPT-2 directory.")
    parser.add_argument("--checkpoint", required=True, help="a model_*.pt checkpoint (required)")
    parser.add_argument("--out", required=True, help="output directory (required)")
    args = parser.parse_args(argv)
    from safetensors.torch import save
    model = model_from_checkpoint(load_checkpoint(args.checkpoint), args.checkpoint)
    c = model.config
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size,
        "n_ctx": c.block_size, "vocab_size": c.vocab_size, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
    }
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {args.out} ({e.strerror}); choose another directory") from None
    sd = ours_to_hf(model.state_dict(), c)
    try:
        write_atomic(os.path.join(args.out, "model.safetensors"), lambda f: f.write(save(sd, {"format": "pt"})))
        write_atomic(os.path.join(args.out, "config.json"), lambda f: json.dump(hf_config, f, indent=2), mode="w")
        written = ["config.json", "model.safetensors"] + export_tokenizer(args.out, c.block_size)
    except (OSError, RuntimeError) as e:
        raise UserError(f"could not write {args.out} ({e}); free some disk space or choose another --out") from None
    print(f"wrote {args.out} ({', '.join(written)})")


def export_tokenizer(out, max_length):
    """Hugging Face's GPT-2 tokenizer files are OpenAI's BPE files under other names: encoder.json is vocab.json
    and vocab.bpe is merges.txt. Copies them from tiktoken's cache when they are there (tiktoken names each
    file by the sha1 of its URL); returns the names written."""
    import hashlib
    import tempfile
    get_encoding()  # makes sure tiktoken has fetched (or found) the files
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    written = []
    for remote, local in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        src = os.path.join(cache, hashlib.sha1((base + remote).encode()).hexdigest())
        if os.path.isfile(src):
            with open(src, "rb") as f:
                data = f.read()
            write_atomic(os.path.join(out, local), lambda f: f.write(data))
            written.append(local)
    if len(written) == 2:
        tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "bos_token": "<|endoftext|>",
                            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        write_atomic(os.path.join(out, "tokenizer_config.json"), lambda f: json.dump(tokenizer_config, f, indent=2),
                     mode="w")
        written.append("tokenizer_config.json")
    return written


def plot_main(argv):
    parser = argparse.ArgumentParser(prog="train_gpt2.py plot", description="Plot log.txt: losses and HellaSwag.")
    parser.add_argument("--log_dir", default="log", help="directory holding log.txt (default: %(default)s)")
    parser.add_argument("--out", default=None, help="PNG to write (default: <log_dir>/plot.png)")
    args = parser.parse_args(argv)
    log_file = os.path.join(args.log_dir, "log.txt")
    if not os.path.isfile(log_file):
        raise UserError(f"{log_file} does not exist; give the --log_dir of a training run")
    series = {"train": ([], []), "val": ([], []), "hella": ([], [])}
    with open(log_file) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[1] in series:
                series[parts[1]][0].append(int(parts[0]))
                series[parts[1]][1].append(float(parts[2]))
    try:
        import matplotlib
    except ImportError:
        raise UserError("plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    ax1.plot(*series["train"], label="train loss", alpha=0.6)
    ax1.plot(*series["val"], label="val loss", marker="o", markersize=3)
    # reference: OpenAI's GPT-2 124M on the FineWeb-Edu val shard, as measured in Karpathy's build-nanogpt
    ax1.axhline(3.2924, color="r", linestyle="--", label="OpenAI GPT-2 124M val (3.2924)")
    ax1.set(xlabel="step", ylabel="loss", title="loss")
    ax1.legend()
    ax2.plot(*series["hella"], label="ours", marker="o", markersize=3)
    ax2.axhline(0.2955, color="r", linestyle="--", label="OpenAI GPT-2 124M (0.2955)")
    ax2.axhline(0.337, color="g", linestyle="--", label="GPT-3 124M (0.337)")
    ax2.axhline(0.25, color="gray", linestyle=":", label="chance (0.25)")
    ax2.set(xlabel="step", ylabel="acc_norm", title="HellaSwag" if series["hella"][0] else
            "HellaSwag (not in this log: train with --hellaswag_every)", xlim=ax1.get_xlim(), ylim=(0.2, 0.4))
    ax2.legend()
    out = args.out or os.path.join(args.log_dir, "plot.png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise UserError(f"the folder of --out {out} does not exist; create it or choose another --out")
    write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    print(f"wrote {out}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"sample": sample_main, "export": export_main, "plot": plot_main}
    try:
        if argv and argv[0] in commands:
            commands[argv[0]](argv[1:])
        else:
            train_main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before training started (or in sample): nothing to save
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
