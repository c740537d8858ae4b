"""
Train GPT-2 from scratch, in one file that reads top to bottom as a lecture on pretraining:

    1. the model            GPT-2: token and position embeddings, a stack of transformer blocks, the output layer
    2. the optimizer        AdamW with the GPT-3 paper's settings
    3. the data             token shards cut into micro-batches, the same ones on any number of GPUs
    4. the schedule         linear warmup, then cosine decay of the learning rate
    5. the training loop    train() and train_step(): the whole of pretraining in ~150 lines
    6. evaluation           val loss, HellaSwag, and sampling text with a KV cache
    7. plumbing             device setup, flag checks, checkpoints, signals, FLOP counts, FSDP, Hugging Face
    8. the command line     train (the default), sample, export, plot

Launch:
    python train_gpt2.py --data input.txt --n_layer 4 --n_head 4 --n_embd 128 ...      # laptop CPU
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

# =============================================================================
# 1. The model: GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners")


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


# The shapes of OpenAI's four GPT-2 checkpoints (GPT-2 paper, table 2, and the released configs).
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def maybe_dropout(x, p):
    # Why not F.dropout(x, 0): skipping it keeps dropout-0 runs exactly what they were without dropout
    return F.dropout(x, p) if p > 0 else x


class CausalSelfAttention(nn.Module):
    """Every position looks back at all earlier ones, in n_head independent heads, and mixes in what it finds."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # mixes the heads' outputs back together
        self.c_proj.RESIDUAL_PROJ = True  # scaled at init, see GPT._init_weights

    def forward(self, x, cache=None, dropout=0.0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # each head gets its own C / n_head channels and attends on its own: heads become a batch dimension
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # sampling: the keys and values of the tokens before this one are kept
            k, v = cache.update(k, v)  # (B, nh, T_past + T, hs)
        # A query attends to itself and the past. With a cache and one new token the whole past is
        # visible, so no mask is needed; with no cache the usual causal mask applies.
        assert cache is None or T == 1 or k.size(2) == T, "a cached forward takes one token at a time"
        # softmax(q k^T / sqrt(hs)) v, computed in blocks (flash attention) without the (T, T) matrix in memory
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout,
                                           is_causal=(k.size(2) == T and T > 1))  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return maybe_dropout(self.c_proj(y), dropout)


class MLP(nn.Module):
    """Each position on its own: widen 4x, a nonlinearity, narrow back. Two thirds of a block's weights."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # GPT-2 used the tanh approximation of GELU (cheaper in 2019); the exact erf form would change its outputs
        self.gelu = nn.GELU(approximate="tanh")
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
        # Pre-LayerNorm (GPT-2 moved it from after each branch to before it): the residual stream x itself is
        # never normalized, so gradients flow straight from the loss to the first layer through the additions.
        x = x + self.attn(self.ln_1(x), cache, dropout)  # communicate: tokens exchange information
        return x + self.mlp(self.ln_2(x), dropout)  # compute: each token thinks about what it gathered


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),  # pre-LayerNorm leaves the last block's output unnormalized
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying (as in GPT-2; Press & Wolf 2017): the input embedding and the output projection are one
        # matrix. A token's vector serves both to read it and to predict it, and 38M of 124M weights are saved.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        self.grad_checkpoint = False  # set by training to trade compute for memory
        self.dropout = 0.0  # set by training; only in train() mode
        # Rows per block of the loss (ChunkedCrossEntropy). Each block rereads and rewrites the (V, C) fp32
        # gradient of lm_head, while its own logits are (rows, V): rows ~ C balances the two memory streams
        # (measured on CPU with bench/bench_train.py: C = 128 is 1.4x faster at 256 rows than at 2048).
        self.loss_rows = max(256, 1 << round(math.log2(config.n_embd)))

    def _init_weights(self, module):
        # GPT-2 init: N(0, 0.02), biases zero; each residual projection scaled by 1/sqrt(2 * n_layer)
        # because every block adds two of them to the residual stream (GPT-2 paper, section 2.3): without
        # it the stream's variance would grow with depth.
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
                                         self.config.vocab_size, self.loss_block_rows(idx.numel(), idx.device.type))
        return None, loss

    def features(self, idx, cache=None):
        """The final hidden states (B, T, C): everything but the output projection."""
        B, T = idx.shape
        start = len(cache) if cache is not None else 0  # sampling: positions continue after the cached ones
        assert start + T <= self.config.block_size, f"sequence of {start + T} > block_size {self.config.block_size}"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        p = self.dropout if self.training else 0.0
        # a token's vector plus its position's vector: attention itself does not know where a token is
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

    def loss_block_rows(self, n, device_type="cpu"):
        """Rows per block of the loss for n rows in all: loss_rows on a CPU; on a GPU, where caches matter
        less than kernel launches, 4096 (fp32 logits of 0.8 GB a block at GPT-2's vocabulary: the memory
        saving stays, and a small batch is one block). At most 32 blocks, because compiled the loop over the
        blocks is unrolled (a GPU micro-batch of 64 x 1024 rows in blocks of 256 would be 256 copies)."""
        return max(self.loss_rows if device_type == "cpu" else 4096, -(-n // 32))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied wte/lm_head counted once

    @classmethod
    def from_pretrained(cls, path_or_name):
        """OpenAI's GPT-2 (or any Hugging Face GPT-2): a hub name such as "gpt2", or a local directory."""
        config, sd = read_hf_gpt2(path_or_name)  # Hugging Face's files, in our names and layout (plumbing)
        model = cls(config)
        try:
            model.load_state_dict(sd)
        except (KeyError, RuntimeError) as e:
            raise UserError(f"the weights in {path_or_name} are not GPT-2's ({str(e).splitlines()[0][:200]})") \
                from None
        return model


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
            # loss of a row = -log softmax(z)[target] = logsumexp(z) - z[target]; logsumexp subtracts the max first
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


# =============================================================================
# 2. The optimizer


def configure_optimizer(model, lr, weight_decay, device_type):
    """AdamW as in the GPT-3 paper (appendix B): betas (0.9, 0.95), eps 1e-8, weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Why: decaying 2-D tensors (matmul weights, embeddings) regularizes; decaying biases and LayerNorm
    # gains only pulls them towards zero for no benefit.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates each parameter in one pass over memory instead of one pass per operation of the
    # update: one kernel launch on CUDA, ~10x faster on CPU for 124M (bench/bench_train.py), same results.
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


# =============================================================================
# 3. The data: tokens on disk -> micro-batches of (inputs, targets)


def get_encoding():
    import tiktoken  # imported here so that importing this file stays free of side effects
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise UserError(f"could not load the GPT-2 tokenizer ({type(e).__name__}); tiktoken downloads it once, so "
                        "connect to the network or point TIKTOKEN_CACHE_DIR at a folder holding its files") from None


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
    # encode_ordinary: text that happens to contain "<|endoftext|>" is just text, not the special token
    tokens = np.array(get_encoding().encode_ordinary(text), dtype=np.uint16)
    n_val = len(tokens) // 10  # the val split is the end of the text: no sentence is in both
    return [tokens[: len(tokens) - n_val]] if split == "train" else [tokens[len(tokens) - n_val:]]


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
                # one read of B*(T+1) tokens; uint16 on disk (GPT-2's 50257 ids fit), int64 as embeddings want
                buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
        # Why T+1 tokens: the targets are the inputs shifted by one, so every position is a training example
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
    mine = list(range(rank, n_seq, world_size))  # every rank a share; their sums are all-reduced
    for i in range(0, len(mine), B):
        rows = [torch.from_numpy(tokens[j * T: (j + 1) * T + 1].astype(np.int64)) for j in mine[i: i + B]]
        buf = torch.stack(rows)  # (b, T + 1)
        yield buf[:, :-1], buf[:, 1:]


# =============================================================================
# 4. The schedule: how fast to learn at each step, and how many micro-steps make one step


def get_lr(step, max_lr, warmup_steps, max_steps, min_lr_ratio=0.1):
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr_ratio * max_lr at max_steps
    (GPT-3 paper, appendix B), flat after that."""
    min_lr = max_lr * min_lr_ratio
    # Why warm up: at init AdamW's moment estimates are poor and the gradients large; full-size steps then
    # could throw the model somewhere it never recovers from
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    # Why decay: late in training smaller steps settle into the valley instead of bouncing across it
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def grad_accum_steps(total_batch_size, batch_size, seq_len, world_size):
    """Micro-steps per optimizer step so that all ranks together process total_batch_size tokens.
    batch_size None (--batch_size auto, not chosen yet) checks that whole sequences fill the step."""
    per_micro = (batch_size or 1) * seq_len * world_size
    if total_batch_size % per_micro != 0:
        what, fix = ("batch_size * ", f"{batch_size} * ") if batch_size else ("", "")
        raise UserError(f"--total_batch_size {total_batch_size} is not a multiple of {what}seq_len * world_size = "
                        f"{fix}{seq_len} * {world_size} = {per_micro}; change --total_batch_size (e.g. to "
                        f"{max(1, total_batch_size // per_micro) * per_micro}) or "
                        f"{'--batch_size' if batch_size else '--seq_len'}")
    return total_batch_size // per_micro if batch_size else None


# =============================================================================
# 5. Training: the flags, the loop, one optimizer step, and building what the loop starts from


def arg(default, help):
    """A config field with the one-line help that --help shows."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every flag of `python train_gpt2.py`; the defaults are GPT-2 124M on 10B tokens of FineWeb-Edu."""
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
    seq_len: int = arg(1024, "tokens per sequence, at most the model's block size")
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
    seed: int = arg(1337, "random seed (model init, data order, dropout, sampling)")
    dist_timeout: int = arg(60, "minutes a rank waits in a collective (e.g. while rank 0 writes a checkpoint) "
                            "before NCCL/gloo abort the job")
    # periodic work, in optimizer steps
    eval_every: int = arg(250, "val loss every this many steps (0 = off)")
    val_tokens: int = arg(20 * 65536, "val tokens per evaluation: always the same first ones of the val split")
    sample_every: int = arg(250, "print samples every this many steps (0 = off)")
    prompt: str = arg("Hello, I'm a language model,", "prompt for the samples printed during training")
    hellaswag_every: int = arg(0, "HellaSwag accuracy every this many steps (0 = off)")
    hellaswag_data: str = arg(None, "local hellaswag_val.jsonl; None: download the official file once")
    hellaswag_limit: int = arg(0, "score only the first N HellaSwag examples (0 = all 10,042)")
    checkpoint_every: int = arg(5000, "write model_<step>.pt every this many steps, and at the end (0 = off)")
    keep_checkpoints: int = arg(0, "keep only the newest K model_*.pt (and the newest one known to give a finite "
                                "loss); older ones are deleted once a newer one is written (0 = keep all)")
    shuffle: int = arg(None, "1: a new seeded order of the shards, and of T-token blocks within them, every epoch; "
                       "0: file order; None: 1 for a shard directory, 0 for a text file, and a resumed run keeps its "
                       "checkpoint's")
    wandb_project: str = arg(None, "also log to this Weights & Biases project, from rank 0 (needs pip install wandb; "
                             "WANDB_MODE=offline logs without network); a resumed run continues its W&B run")
    fsdp: int = arg(0, "1: shard weights, gradients and AdamW state over the torchrun ranks (FSDP2) instead of "
                    "a full copy on each (DDP); checkpoints move freely between the two and one process")


def train(cfg):
    """Pretraining, in outline: set up the machine; build (or restore) the model, optimizer and data; wrap the
    model for speed; then loop: every so often evaluate, sample and checkpoint, and every time one step."""
    rt = setup_runtime(cfg.device, cfg.dtype, check=lambda world_size: check_config(cfg, world_size),
                       dist_timeout=cfg.dist_timeout)
    s = build_state(cfg, rt)  # what training starts from: new, or a checkpoint's step, weights, data position
    model = wrap_model(s.model, cfg, rt, s.compile)  # compiled, DDP: what steps run; s.model stays the plain one
    log = RunLog(cfg, rt, s)  # log.txt, W&B, the console (rank 0)
    hella = load_hellaswag(cfg, rt) if cfg.hellaswag_every else None
    enc = get_encoding() if cfg.sample_every or hella else None
    flops, peak = flops_per_token(s.model.config, cfg.seq_len), peak_flops(rt)  # for MFU
    stop = StopSignal(rt.ddp)  # SIGTERM/SIGINT (preemption, Ctrl-C): finish the step, checkpoint, exit
    stop_for, new_ckpt = 0, None  # the signal every rank stops for (0: none); the newest checkpoint written

    def checkpoint(path, step):  # every rank calls it (FSDP gathers the shards); rank 0 writes, then prunes
        save_checkpoint(path, s.model, s.optimizer, s.scaler, step, s.loader, cfg, s.wandb_id, cfg.fsdp)
        if rt.master and cfg.keep_checkpoints:
            prune_checkpoints(cfg.log_dir, cfg.keep_checkpoints, step, s.last_good)

    # Why max_steps + 1 passes, with the periodic work before the step: pass k evaluates, samples and saves the
    # model after k optimizer steps, so the last pass does that for the final model and takes no step.
    for step in range(s.step, cfg.max_steps + 1):
        last = step == cfg.max_steps
        ckpt_path = os.path.join(cfg.log_dir, f"model_{step:05d}.pt")
        if stop_for:  # a signal came during the last step (on any rank): save where we are, and leave
            checkpoint(ckpt_path, step)
            log.print(f"stopped by signal at step {step}; wrote {ckpt_path}; continue with --resume auto")
            if rt.ddp:  # no rank leaves before the checkpoint is written: torchrun stops all once one exits
                dist.barrier()
            sys.exit(128 + stop_for)

        # ---- periodic work, on the plain model (no recompilation, no DDP hooks); every rank takes part ----
        if cfg.eval_every and (step % cfg.eval_every == 0 or last):
            # the loss on text never trained on: falling train loss alone could be memorization
            val_loss = evaluate_loss(s.model, s.val_shards, cfg.val_tokens, s.batch_size, cfg.seq_len, rt, cfg.fsdp)
            log(f"{step} val {val_loss:.6f}", f"step {step:5d} | val loss {val_loss:.6f}")
        if hella is not None and (step % cfg.hellaswag_every == 0 or last):
            acc = accuracies(hellaswag_totals(s.model, hella, enc, s.batch_size, rt, cfg.fsdp))
            log(f"{step} hella {acc['acc_norm']:.6f}",
                f"step {step:5d} | hellaswag acc_norm {acc['acc_norm']:.4f} ({acc['n']} examples)")
        # under FSDP every rank samples (the same texts): each forward needs the shards of all of them
        if cfg.sample_every and (rt.master or cfg.fsdp) and step > 0 and (step % cfg.sample_every == 0 or last):
            for i, text in enumerate(sample_texts(s.model, enc, cfg.prompt, 4, 32, rt, seed=cfg.seed + step)):
                log.print(f"sample {i}: {text!r}")
        if cfg.checkpoint_every and step > s.step and (step % cfg.checkpoint_every == 0 or last):
            checkpoint(ckpt_path, step)
            new_ckpt = ckpt_path
        if last:
            if rt.ddp:  # leave together: a rank that tears down the group while others still use it can abort
                dist.barrier()
            log.finish()
            break

        # ---- one optimizer step ----
        t0 = time.perf_counter()
        # Why set the learning rate by hand each step: it is a pure function of the step, so a resumed run
        # continues the schedule exactly where it stopped (no scheduler state to save)
        lr = get_lr(step, cfg.max_lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        try:
            loss, norm = train_step(model, s.optimizer, s.scaler, s.loader, s.grad_accum, lr, cfg.grad_clip, rt,
                                    cfg.fsdp)
        except torch.OutOfMemoryError:
            raise out_of_memory_error(step, s, cfg, rt) from None
        stop_for = agree_on_signal(stop.signum, rt)  # so that every rank stops after the same step
        loss = loss.item()  # waits for the device to finish the step: only now is its time known
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):  # diverged: every later step would be wasted
            raise UserError(f"the loss is {loss} at step {step}; stopping. Last good checkpoint: "
                            f"{s.last_good or 'none'}; resume from it with a lower --max_lr")
        if new_ckpt and new_ckpt != s.last_good:  # its weights just gave a finite loss
            s.last_good = new_ckpt
            if rt.master and cfg.keep_checkpoints:  # the one it replaces as last good may go now
                prune_checkpoints(cfg.log_dir, cfg.keep_checkpoints, step, s.last_good)
        tok_s = cfg.total_batch_size / dt
        # MFU, model FLOPs utilization (PaLM paper, appendix B): the FLOPs the model needs per second, as a share
        # of what the hardware can do at best. 40-50% is good on GPUs; time lost elsewhere shows up here
        mfu = 100 * tok_s * flops / (peak * rt.world_size) if peak else None  # percent
        log(f"{step} train {loss:.6f}",
            f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm.item():.4f} | {1000 * dt:.1f} ms | "
            f"{tok_s:,.0f} tok/s | MFU " + (f"{mfu:.1f}%" if mfu is not None else "n/a"),
            {"train/lr": lr, "train/grad_norm": norm.item(), "train/tok_per_s": tok_s, "train/mfu": mfu})


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
        # DDP all-reduces gradients in backward(); only the last micro-step needs to, so the others skip it
        # (no_sync) and their gradients just add up locally. FSDP reduce-scatters them in every backward: that
        # keeps each rank's gradients a shard, which is FSDP's point.
        sync = contextlib.nullcontext() if not rt.ddp or fsdp or micro == grad_accum - 1 else model.no_sync()
        with sync:
            with rt.autocast():  # matmuls in bf16/fp16 where set up; weights and the loss stay fp32
                loss = model(x, y)[1]  # only the loss: holding the (B, T, vocab) logits through backward costs GBs
            # Why divide: backward() adds up the gradients of the micro-steps, and we want the gradient of the
            # mean loss over the whole batch, as if it had gone through in one piece
            loss = loss / grad_accum
            loss_accum += loss.detach()
            scaler.scale(loss).backward()  # fp16: loss scaled up so that small gradients do not flush to zero
    if rt.ddp:  # for the log only (the gradients are already averaged): SUM, as gloo before torch 2.8 has no AVG
        dist.all_reduce(loss_accum)
        loss_accum /= rt.world_size
    scaler.unscale_(optimizer)  # (fp16) back to true gradients before measuring their norm
    # Why clip at 1.0 (the GPT-3 recipe): a rare bad batch gives a huge gradient; scaling the whole gradient
    # down to norm 1 keeps its direction but bounds how far one step can throw the weights
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)  # (fp16) skips the step if any gradient overflowed to inf
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_accum, norm


@dataclass
class TrainState:
    """What the loop starts from (build_state) and carries along."""
    model: nn.Module  # the plain GPT (its blocks sharded under FSDP): evaluation, sampling, checkpoints use it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: DataLoader
    val_shards: list
    batch_size: int  # sequences per micro-step on each rank
    grad_accum: int  # micro-steps per optimizer step
    compile: bool  # whether to torch.compile the model
    step: int = 0  # optimizer steps already taken: where the loop starts
    last_good: str = None  # the newest checkpoint known to give a finite loss (never pruned)
    wandb_id: str = None  # the W&B run a resumed run continues


def build_state(cfg, rt):
    """The model, optimizer and data that training starts from: new (seeded by --seed), weights to fine-tune
    (--init_from), or a whole training state to continue (--resume: also the step, data position, random state)."""
    check_fsdp(cfg, rt)
    ckpt = checkpoint_to_resume(cfg, rt)  # None: a new run
    init_model = load_model(cfg.init_from) if cfg.init_from else None
    config = model_config(cfg, ckpt, init_model)
    max_batch = cfg.total_batch_size // (cfg.seq_len * rt.world_size)  # sequences per rank and optimizer step
    train_shards = load_split(cfg.data, "train")
    val_shards = load_split(cfg.data, "val") if cfg.eval_every else None

    # one seed for all that is random: the initial weights, dropout, the data order
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = init_model or GPT(config)
    model.to(rt.device)
    model.grad_checkpoint, model.dropout = bool(cfg.grad_checkpoint), cfg.dropout
    compile_model = use_compile(cfg.compile, rt)
    if cfg.fsdp:  # before the optimizer and the checkpoint load, which both work on the shards
        shard_model(model, rt, compile_model)
    if cfg.batch_size == "auto":
        import train_extras  # the memory estimate: tries (GPU) or computes (CPU) what fits
        batch_size = train_extras.auto_batch_size(model, max_batch, cfg, rt)
    else:
        batch_size = int(cfg.batch_size)
    grad_accum = grad_accum_steps(cfg.total_batch_size, batch_size, cfg.seq_len, rt.world_size)
    loader = DataLoader(train_shards, batch_size, cfg.seq_len, rt.rank, rt.world_size, data_shuffle(cfg), cfg.seed)
    optimizer = configure_optimizer(model, cfg.max_lr, cfg.weight_decay, rt.device_type)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 have fp32's exponent range and need none
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "fp16")
    s = TrainState(model, optimizer, scaler, loader, val_shards, batch_size, grad_accum, compile_model)
    if ckpt is not None:
        restore_state(s, ckpt, cfg, rt)
    return s


def wrap_model(model, cfg, rt, compile_model):
    """The model the training steps run: compiled, and under torchrun wrapped in DDP. It shares its weights
    with `model`, which evaluation and sampling use as it is (no recompilation for their other shapes)."""
    if compile_model:
        # Why compile: it fuses the elementwise work around the matmuls (casts, GELU, LayerNorm, the softmax of
        # the loss) into few kernels that read memory once, instead of one kernel and one pass per operation
        import torch._dynamo as dynamo
        dynamo.config.suppress_errors = cfg.compile == "auto"  # auto: no C++ compiler? run eager
        if rt.ddp and cfg.grad_checkpoint and torch_version() < (2, 6):
            dynamo.config.optimize_ddp = False  # DDPOptimizer could not split checkpointed blocks before 2.6
        model = model if cfg.fsdp else torch.compile(model)  # FSDP: each block is compiled (shard_model)
    if rt.ddp and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # DDP averages the gradients over the ranks in backward, bucket by bucket, overlapped with the rest of
        # backward; gradient_as_bucket_view: the gradients live in the buckets, not in a second copy
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None,
                    gradient_as_bucket_view=True)
    return model


# =============================================================================
# 6. Evaluation and sampling


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


# HellaSwag (Zellers et al. 2019): a context and 4 endings, of which one is right. The model's answer is the
# ending it finds least surprising: the lowest summed cross-entropy of the ending's tokens (acc), or the lowest
# mean per token (acc_norm, which does not punish long endings). This is the GPT-2/GPT-3-era protocol; the
# download and the command line live in hellaswag.py.


def render_example(example, enc):
    """(context tokens, [tokens of each of the 4 endings], label). The leading space makes the ending's first
    word tokenize as it would mid-sentence, as in the GPT-2/GPT-3 evaluations."""
    ctx = enc.encode(example["ctx"])
    endings = [enc.encode(" " + e) for e in example["endings"]]
    return ctx, endings, example["label"]


@torch.no_grad()
def ending_losses(model, rendered, device="cpu", batch_size=16, autocast=contextlib.nullcontext, progress=False):
    """Summed cross-entropy of each ending and its token count: two (n, 4) tensors, in `rendered` order.
    The model should be in eval mode (score() sees to it).

    A row is context + ending. Rows longer than block_size lose tokens from the LEFT (the start of the
    context), so the whole ending is always kept; in the extreme case that the ending alone fills the block,
    its first token has no context and is not scored. Real HellaSwag (<= 166 tokens) is never truncated.
    """
    from tqdm import tqdm

    block_size = model.config.block_size
    rows = []  # per example: 4 x (tokens, number of ending tokens scored)
    for ctx, endings, _ in rendered:
        rows.append([((ctx + end)[-block_size:], min(len(end), len((ctx + end)[-block_size:]) - 1)) for end in endings])
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory shows up at once.
    order = sorted(range(len(rows)), key=lambda i: -max(len(t) for t, _ in rows[i]))
    total = torch.zeros(len(rows), 4, dtype=torch.float64)
    count = torch.zeros(len(rows), 4, dtype=torch.long)
    bar = tqdm(total=len(rows), desc="hellaswag", unit="ex", file=sys.stderr, disable=not progress)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        batch = [r for i in idx for r in rows[i]]  # 4 rows per example, all in one forward
        T = max(len(t) for t, _ in batch)
        # Right padding: with causal attention a position only sees positions before it, so the pad
        # tokens after a row's end cannot change its logits; they are also left out of the loss.
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.bool)  # True where logits[t] predicts an ending token
        for r, (toks, n_end) in enumerate(batch):
            x[r, :len(toks)] = torch.tensor(toks)
            y[r, :len(toks) - 1] = torch.tensor(toks[1:])  # logits at t predict token t+1
            mask[r, len(toks) - 1 - n_end:len(toks) - 1] = True
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        with autocast():
            # Only the ending positions need the output layer: the hidden states of the others are dropped
            # before it, which saves most of the largest matmul and all of its (rows, T, vocab) logits.
            logits = model.head(model.features(x)[mask])  # (ending tokens, padded_vocab); padding is -inf
        tok_loss = F.cross_entropy(logits.float(), y[mask], reduction="none")
        losses = torch.zeros(mask.shape, device=device)
        losses[mask] = tok_loss  # scatter back, then sum each row: a fixed order, so deterministic
        total[idx] = losses.cpu().double().sum(1).view(-1, 4)  # float64 on the CPU: MPS has no float64
        count[idx] = mask.sum(1).view(-1, 4).cpu()
        bar.update(len(idx))
    bar.close()
    return total, count


def score(model, examples, enc, device="cpu", batch_size=16, autocast=contextlib.nullcontext,
          rank=0, world_size=1, progress=False):
    """Count right answers on this rank's share of the examples, examples[rank::world_size].
    `batch_size` examples (x 4 endings) go through the model per forward; `autocast` is a function that
    returns a context manager (e.g. bf16 autocast). Returns {n, correct, correct_norm}: sum these over
    ranks, then call accuracies()."""
    mine = examples[rank::world_size]
    rendered = [render_example(e, enc) for e in mine]
    was_training = model.training
    model.eval()  # no dropout in scoring
    try:
        total, count = ending_losses(model, rendered, device, batch_size, autocast, progress)
    finally:
        model.train(was_training)
    labels = torch.tensor([label for _, _, label in rendered], dtype=torch.long)
    return dict(n=len(mine),
                correct=int((total.argmin(1) == labels).sum()),
                correct_norm=int(((total / count.clamp(min=1)).argmin(1) == labels).sum()))


def accuracies(counts):
    """{n, correct, correct_norm} (summed over ranks) -> {n, acc, acc_norm}."""
    n = int(counts["n"])
    return dict(n=n, acc=int(counts["correct"]) / max(n, 1), acc_norm=int(counts["correct_norm"]) / max(n, 1))


def hellaswag_totals(model, examples, enc, batch_size, rt, fsdp):
    """HellaSwag counts {n, correct, correct_norm}, summed over the ranks. Under FSDP each forward gathers
    weights from every rank, so all ranks must run the same number: the examples that do not split evenly
    are scored on every rank and counted once; and the root's weights, which the calls to features() and
    head() (not forward()) would find sharded, are gathered for the duration."""
    split = len(examples) - len(examples) % rt.world_size if fsdp else len(examples)
    with gathered_root(model, rt, fsdp):
        parts = [score(model, examples[:split], enc, rt.device, batch_size, rt.autocast, rt.rank, rt.world_size)]
        if split < len(examples):
            rest = score(model, examples[split:], enc, rt.device, batch_size, rt.autocast)
            parts.append(rest if rt.master else dict.fromkeys(rest, 0))
    keys = ("n", "correct", "correct_norm")
    totals = torch.tensor([sum(p[k] for p in parts) for k in keys], device=rt.device)
    if rt.ddp:
        dist.all_reduce(totals)
    return dict(zip(keys, totals.tolist()))


def load_hellaswag(cfg, rt):
    """The HellaSwag examples for --hellaswag_every: --hellaswag_data, or the official file (hellaswag.py
    downloads it once, on rank 0, and verifies it)."""
    import hellaswag  # the download; hellaswag.py imports this file for everything else
    try:
        if rt.master:  # one download, then everyone reads the cached file
            hellaswag.load_examples(cfg.hellaswag_data, limit=cfg.hellaswag_limit)
        if rt.ddp:
            dist.barrier()
        return hellaswag.load_examples(cfg.hellaswag_data, limit=cfg.hellaswag_limit)
    except hellaswag.HellaSwagError as e:
        raise UserError(f"{e}; fix --hellaswag_data or leave --hellaswag_every at 0") from None


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
        logits = logits[:, -1, :].float()  # (B, vocab): only the last position predicts the next token
        if temperature == 0:
            next_tok = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            logits = logits / temperature  # < 1 sharpens the distribution, > 1 flattens it
            if top_k:  # never pick from the long tail of unlikely tokens, where nonsense lives
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
    gen = torch.Generator(device=rt.device).manual_seed(seed)  # its own generator: training's stays untouched
    with rt.autocast():
        out = generate(model, idx, max_new_tokens, temperature, top_k, gen)
    return [enc.decode(row) for row in out.tolist()]


# =============================================================================
# 7. Plumbing: what the loop calls to run safely on real machines. Not needed to follow the lecture.


class UserError(Exception):
    """Bad input from the user: main() prints the message as one line and exits with code 2."""


# ---- the runtime: device, dtype, distributed ----


@dataclass
class Runtime:
    ddp: bool  # launched by torchrun: several processes, one per GPU
    rank: int
    local_rank: int
    world_size: int
    master: bool  # rank 0: logs, writes checkpoints
    device: str
    device_type: str
    dtype: str  # "bf16", "fp16" or "fp32"
    local_world_size: int = 1  # processes on this machine

    def autocast(self):
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16 if self.dtype == "bf16" else torch.float16)


DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "bf16", "fp16", "fp32")


def setup_runtime(device="auto", dtype="auto", check=None, dist_timeout=60):
    """The one place that reads the environment: rank and world size from torchrun, the device, the dtype.
    check(world_size), if given, validates the flags before any device or process-group setup. It sets
    process-wide state, as a training program should: deterministic algorithms and the thread count on CPU,
    TF32 matmuls for fp32 on CUDA, the current GPU, the process group."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # set by torchrun
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
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
        torch.set_num_threads(max(1, cores // local_world_size))
    if ddp and not dist.is_initialized():
        # The default timeout (10 minutes for NCCL) would abort the job while rank 0 alone writes a big
        # checkpoint (gpt2-xl: ~19 GB) and the others wait for it in the next collective.
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=dist_timeout))
    return Runtime(ddp, rank, local_rank, world_size, rank == 0, device, device_type, dtype, local_world_size)


def cpu_has_bf16():
    # Only AVX512-BF16 or AMX do bf16 matmuls natively; elsewhere they are emulated and slower than fp32.
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: stay with fp32
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


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


# ---- checks of the flags ----

POSITIVE = ("seq_len", "total_batch_size", "max_steps", "val_tokens", "max_lr", "dist_timeout")
NON_NEGATIVE = ("warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "eval_every", "sample_every",
                "hellaswag_every", "checkpoint_every", "hellaswag_limit", "keep_checkpoints")


def check_config(cfg, world_size):
    """Every flag that can be checked alone, before any device or process-group setup: a typo costs nothing,
    and under torchrun no rank starts NCCL/gloo only to stop again. The first problem found is the error."""
    problems = [  # (is it wrong?, what to say)
        (cfg.batch_size != "auto" and not (cfg.batch_size.isdigit() and int(cfg.batch_size) > 0),
         f"--batch_size must be a positive number or auto, got {cfg.batch_size}"),
        *((getattr(cfg, n) <= 0, f"--{n} must be positive, got {getattr(cfg, n)}") for n in POSITIVE),
        (not 0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}; GPT-2 used 0.1"),
        *((getattr(cfg, n) < 0, f"--{n} must not be negative, got {getattr(cfg, n)}") for n in NON_NEGATIVE),
        (cfg.compile not in ("auto", "on", "off"), f"unknown --compile {cfg.compile}; use auto, on, off"),
        (cfg.resume and cfg.init_from, "--resume and --init_from exclude each other: resume continues a run, init_from starts one"),
        (not os.path.exists(cfg.data), f"--data {cfg.data} does not exist; give a text file or a directory of .npy shards"),
        (cfg.hellaswag_every and cfg.hellaswag_data and not os.path.isfile(cfg.hellaswag_data),
         f"HellaSwag file {cfg.hellaswag_data} does not exist; fix --hellaswag_data or leave --hellaswag_every at 0"),
        (cfg.fsdp not in (0, 1), f"--fsdp must be 0 or 1, got {cfg.fsdp}"),
        (cfg.fsdp and cfg.batch_size == "auto", "--batch_size auto measures an unsharded model; give --batch_size N with --fsdp 1"),
        (cfg.shuffle not in (None, 0, 1), f"--shuffle must be 0 or 1, got {cfg.shuffle}"),
        (data_shuffle(cfg) and cfg.seed < 0, f"--seed must not be negative to shuffle the data, got {cfg.seed}; or use --shuffle 0"),
    ]
    for wrong, message in problems:
        if wrong:
            raise UserError(message)
    if not cfg.resume and not cfg.init_from:
        model_config(cfg)  # the shape flags (a resumed or fine-tuned model's shape is checked once it is read)
    grad_accum_steps(cfg.total_batch_size, None if cfg.batch_size == "auto" else int(cfg.batch_size), cfg.seq_len,
                     world_size)
    if cfg.sample_every and not get_encoding().encode(cfg.prompt, allowed_special="all"):
        raise UserError("--prompt is empty; give some text for the samples (or --sample_every 0)")
    if cfg.wandb_project is not None:
        import train_extras
        train_extras.import_wandb()  # missing: say so before anything is written


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


def check_fsdp(cfg, rt):
    """--fsdp against the runtime that setup_runtime chose (world and dtype)."""
    if cfg.fsdp and not rt.ddp:
        raise UserError("--fsdp 1 shards over the ranks that torchrun starts: launch with torchrun "
                        "--nproc_per_node=N (in one process, leave --fsdp off)")
    if cfg.fsdp and rt.dtype == "fp16":
        raise UserError("--fsdp 1 trains in bf16 or fp32, not fp16 (no loss scaling for shards here); use --dtype "
                        "fp32, or DDP")


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


# ---- the run's log ----


class RunLog:
    """What a run reports, from rank 0 only: events to log.txt, one "<step> <kind> <value>" per line (the format
    `plot` and users' scripts read); the same to W&B with more numbers (--wandb_project); lines to the console."""

    def __init__(self, cfg, rt, s):
        self.rt, self.file, self.tracker = rt, os.path.join(cfg.log_dir, "log.txt"), None
        if not rt.master:
            return
        try:
            os.makedirs(cfg.log_dir, exist_ok=True)
            rewrite_log(self.file, s.step)
        except OSError as e:
            raise UserError(f"cannot write to --log_dir {cfg.log_dir} ({e.strerror}); choose a writable directory") \
                from None
        config = dataclasses.asdict(s.model.config)
        print(f"model: {s.model.num_params() / 1e6:.2f}M parameters, {config}")
        print(f"device {rt.device} ({rt.dtype}), world size {rt.world_size}, {cfg.total_batch_size} tokens/step = "
              f"{s.batch_size} x {cfg.seq_len} x {rt.world_size} ranks x {s.grad_accum} accumulation steps")
        if s.step:
            print(f"resumed at step {s.step}")
        if cfg.wandb_project is not None:
            import train_extras
            self.tracker = train_extras.start_wandb(cfg, s.wandb_id, {
                **dataclasses.asdict(cfg), "model_config": config, "world_size": rt.world_size,
                "batch_size": s.batch_size, "grad_accum": s.grad_accum, "num_params": s.model.num_params()})
            s.wandb_id = self.tracker.id  # saved in checkpoints: a resumed run continues this W&B run

    def __call__(self, event, line=None, extra=None):
        """event for log.txt and W&B, with the extra numbers for W&B (None: not known); line for the console."""
        if not self.rt.master:
            return
        try:
            with open(self.file, "a") as f:
                f.write(event + "\n")
        except OSError as e:
            raise UserError(f"cannot append to {self.file} ({e.strerror}); free some disk space and continue with "
                            "--resume auto") from None
        if self.tracker is not None:
            step, kind, value = event.split()
            kind = {"train": "train/loss", "val": "val/loss", "hella": "hellaswag/acc_norm"}[kind]
            self.tracker.log({"step": int(step), kind: float(value),
                              **{k: v for k, v in (extra or {}).items() if v is not None}})
        self.print(line)

    def print(self, line):
        if self.rt.master and line is not None:
            print(line)

    def finish(self):
        if self.tracker is not None:
            self.tracker.finish()
        if self.rt.master and self.rt.device_type == "cuda":
            print(f"peak GPU memory {torch.cuda.max_memory_allocated(self.rt.device) / 2**30:.2f} GiB")


def rewrite_log(log_file, start_step):
    """On resume, keep only the log lines of the steps before start_step: the run repeats the rest."""
    lines = []
    if start_step > 0 and os.path.exists(log_file):
        with open(log_file) as f:
            lines = [ln for ln in f if ln.split()[:1] and ln.split()[0].isdigit() and int(ln.split()[0]) < start_step]
    write_atomic(log_file, lambda f: f.writelines(lines), mode="w")


# ---- checkpoints ----

CHECKPOINT_FORMAT = 1  # bump when the layout of the checkpoint dict changes
CHECKPOINT_RE = re.compile(r"^model_(\d{5,})\.pt$")


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


def checkpoint_to_resume(cfg, rt):
    """The checkpoint dict that --resume names (None: a new run). Rank 0 chooses; every rank loads that one."""
    if not cfg.resume and find_checkpoints(cfg.log_dir):
        raise UserError(f"{cfg.log_dir} already holds checkpoints of a run; continue it with --resume auto, or "
                        "start a new run with another --log_dir")
    ckpt = resume_checkpoint(cfg.resume, cfg.log_dir) if cfg.resume and rt.master else None
    if cfg.resume and rt.ddp:
        chosen = [ckpt["path"] if ckpt else None]
        dist.broadcast_object_list(chosen, src=0)
        if not rt.master and chosen[0]:
            if not os.path.isfile(chosen[0]):
                raise UserError(f"rank {rt.rank} cannot see {chosen[0]}; put --log_dir on storage every node shares")
            ckpt = load_checkpoint(chosen[0], mmap=bool(cfg.fsdp))
    return ckpt


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


def restore_state(s, ckpt, cfg, rt):
    """Puts a checkpoint's training state into s: weights, AdamW's moments, the loss scale, the data position,
    every random generator and the step, so that training continues exactly as if it had never stopped."""
    load_training_state(s.model, s.optimizer, ckpt, cfg.fsdp, rt.device_type)
    if s.scaler.is_enabled() and ckpt["scaler"]:  # a bf16/fp32 run's scaler holds nothing to restore
        s.scaler.load_state_dict(ckpt["scaler"])
    if ckpt["loader"]["shard"] >= len(s.loader.shards):
        raise UserError(f"{ckpt['path']} was trained on more shards than --data {cfg.data} has; resume with "
                        "the same --data")
    check_data_order(cfg, ckpt, rt.master)
    s.loader.load_state_dict(ckpt["loader"])
    set_rng_state(ckpt["rng"])
    s.step, s.last_good, s.wandb_id = ckpt["step"], ckpt["path"], ckpt.get("wandb_id")


def load_optimizer_state(optimizer, state, device_type):
    """AdamW's saved state, with this device's options: load_state_dict restores the saved param groups' own
    `fused` flag, so a CPU checkpoint would resume unfused on CUDA (and a CUDA one ask for fused on CPU)."""
    # before loading: load_state_dict also moves AdamW's step counters by the saved groups' flag
    groups = [{**saved, "fused": group["fused"]} for saved, group in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})


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


# ---- signals and errors in the loop ----


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


def agree_on_signal(signum, rt):
    """The signal that stops every rank (0: none): the largest any rank received, so that all ranks stop at the
    same step and exit with the same code, whichever of them got it."""
    if not rt.ddp:
        return signum
    agreed = torch.tensor(signum, device=rt.device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return int(agreed.item())


def out_of_memory_error(step, s, cfg, rt):
    """The one-line error for an out-of-memory step, naming the fixes."""
    max_batch = cfg.total_batch_size // (cfg.seq_len * rt.world_size)
    smaller = next((f"--batch_size {b}, " for b in range(s.batch_size - 1, 0, -1) if max_batch % b == 0), "")
    return UserError(f"out of memory on {rt.device} at step {step} with --batch_size {s.batch_size} and --seq_len "
                     f"{cfg.seq_len}; use {smaller}--grad_checkpoint 1 or a smaller --seq_len (gradient accumulation "
                     "keeps --total_batch_size)")


# ---- FLOPs, for MFU ----


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
    # the fastest of a few large square matmuls in the training dtype: what the cores can do at best. Its own
    # generator: drawing from the global one would shift dropout's masks after a resume.
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 2048, generator=gen), torch.randn(2048, 2048, generator=gen)
    times = []
    with rt.autocast():
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * 2048 ** 3 / min(times[1:])


# ---- sharded data parallel (FSDP2): each of N ranks keeps 1/N of the weights, gradients and AdamW state ----


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


@contextlib.contextmanager
def gathered_root(model, rt, fsdp):
    """Under FSDP, the root unit's weights (wte/lm_head, ln_f) whole for the duration."""
    if fsdp:
        with torch.no_grad():  # FSDP sets itself up in the first forward(), which a resumed run may not have had
            model(torch.zeros(1, 1, dtype=torch.long, device=rt.device))
        model.unshard()
    try:
        yield
    finally:
        if fsdp:
            model.reshard()


# ---- Hugging Face GPT-2 weights ----

# Hugging Face stores these four as Conv1D, (in, out): the transpose of nn.Linear's (out, in).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_hf_gpt2(path_or_name):
    """(GPTConfig, our state dict) of a Hugging Face GPT-2: a local directory (config.json + model.safetensors
    or pytorch_model.bin) or a hub name such as "gpt2" (downloaded through huggingface_hub)."""
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
    try:
        return config, hf_to_ours(sd_hf, config)
    except KeyError as e:
        raise UserError(f"the weights in {path} are not GPT-2's (no {e})") from None


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


# =============================================================================
# 8. The command line: train (the default), sample, export, plot


def train_main(argv):
    parser = argparse.ArgumentParser(prog="train_gpt2.py", description="Train GPT-2. Subcommands: sample, "
                                     "export, plot (python train_gpt2.py sample --help).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{f.name}", type=f.type, default=f.default, help=f.metadata["help"])
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    try:
        train(cfg)
    finally:
        if dist.is_initialized():
            gc.collect()  # free the DDP wrapper (and its hold on the process group) before destroying the group
            dist.destroy_process_group()


def sample_main(argv):
    parser = argparse.ArgumentParser(prog="train_gpt2.py sample", description="Generate text from a model.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default="gpt2", help="a model_*.pt checkpoint, or Hugging Face GPT-2 "
                        "weights: a name (gpt2, gpt2-medium, ...) or a directory")
    parser.add_argument("--prompt", default="Hello, I'm a language model,", help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate")
    parser.add_argument("--num_samples", type=int, default=4, help="continuations per prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k likeliest tokens, 0 = all")
    parser.add_argument("--seed", type=int, default=1337, help="random seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
    parser.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, "
                        "until end of input")
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "sample":
            sample_main(argv[1:])
        elif argv and argv[0] in ("export", "plot"):
            import train_extras  # writing Hugging Face directories and plots: not part of the lecture
            train_extras.COMMANDS[argv[0]](argv[1:])
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
