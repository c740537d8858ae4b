"""
Train GPT-2 from scratch, in a file that reads top to bottom as a lecture on pretraining:

    1. the model          embeddings, transformer blocks, the output layer
    2. the optimizer      AdamW as GPT-3 set it (or Muon for the matrices)
    3. the data           token shards cut into micro-batches, alike on any number of GPUs
    4. the schedule       linear warmup, then cosine decay of the learning rate
    5. the training loop  the ranks (DDP), what training starts from, one step, the loop
    6. evaluation         val loss, HellaSwag, sampling text with a KV cache
    7. checks, loading    the flags against the model's shape; a trained model from disk
    8. the command line   train (the default), sample, export, evaluate, plot
What real machines need and a reader can skip is in plumbing/: one module for each job.

    python train_gpt2.py --data input.txt --n_layer 4 --n_head 4 --n_embd 128   # a laptop
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --data edu_fineweb10B  # 8 GPUs
"""

import contextlib
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# the plumbing (plumbing/__init__.py lists its modules)
from plumbing import checkpoints, chunked_loss, commands, compiling, errors, hellaswag_eval
from plumbing import huggingface, long_run, runtime, startup, token_files, train_flags

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
        # Why: matmul kernels are faster on a multiple of 128 (50304) than on 50257. The extra
        # rows are never targets; their logits are -inf (head(), the loss): they never win.
        return (self.vocab_size + 127) // 128 * 128


# The shapes of OpenAI's four GPT-2 checkpoints (GPT-2 paper, table 2, and the released configs).
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def maybe_dropout(x, p):
    # at p = 0 no dropout operation at all: the forward is exactly GPT-2's, compiled or not
    return F.dropout(x, p) if p > 0 else x


class CausalSelfAttention(nn.Module):
    """Each position looks back at all earlier ones in n_head heads and mixes in what it finds."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        # q, k, v for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # mixes the heads' outputs
        self.c_proj.RESIDUAL_PROJ = True  # scaled at init (GPT._init_weights)

    def forward(self, x, cache=None, dropout=0.0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # each head attends on its own C / n_head channels: heads become a batch dimension
        nh, hs = self.n_head, C // self.n_head
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # sampling: the keys and values of the tokens before are kept
            k, v = cache.update(k, v)  # (B, nh, T_past + T, hs) (KVCache, section 6)
        assert cache is None or T == 1 or k.size(2) == T, "cache: a whole prompt, then 1 token"
        # softmax(q k^T / sqrt(hs)) v, in blocks (flash attention), never the (T, T) matrix whole.
        # Causal: a query sees itself and the tokens before it. One token after the cached ones
        # comes last: it sees them all, and needs no mask.
        causal = k.size(2) == T and T > 1
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)  # like q
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return maybe_dropout(self.c_proj(y), dropout)


class MLP(nn.Module):
    """Each position alone: widen 4x, a nonlinearity, narrow back (2/3 of a block's weights)."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # GPT-2's tanh approximation of GELU (cheaper in 2019): the exact one changes outputs
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
        # Pre-LayerNorm (GPT-2 moved it before each branch): the residual stream x is never
        # normalized, so gradients flow straight from the loss to the first layer.
        x = x + self.attn(self.ln_1(x), cache, dropout)  # communicate: tokens exchange information
        return x + self.mlp(self.ln_2(x), dropout)  # compute: each token thinks on what it gathered


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),  # pre-LayerNorm leaves the last block unnormalized
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying (GPT-2; Press & Wolf 2017): the input embedding and the output projection
        # are one matrix: a token's row embeds it and scores it as the next token (38M saved).
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # what training sets: recompute blocks in backward, dropout, the loss compiled
        self.grad_checkpoint, self.dropout, self.compile_loss = False, 0.0, False
        self.loss_block_bytes = None  # fp32 logits per block of the loss (None: the device's)

    def _init_weights(self, module):
        # GPT-2 init: N(0, 0.02), biases zero; residual projections scaled by 1/sqrt(2 * n_layer),
        # as each block adds two to the residual stream (GPT-2 paper, 2.3): its variance stays put.
        if isinstance(module, nn.Linear):
            residual = hasattr(module, "RESIDUAL_PROJ")
            std = 0.02 * (2 * self.config.n_layer) ** -0.5 if residual else 0.02
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None):
        """(logits (B, T, padded_vocab), None) without targets; (None, mean loss) with them."""
        x = self.features(idx, cache)  # (B, T, C)
        if targets is None:
            return self.head(x), None
        # loss = F.cross_entropy(self.head(x).flatten(0, 1).float(), targets.flatten()), a block
        # of rows at a time: GPT-2 124M's whole logits for 64 x 1024 tokens, their fp32 copy and
        # gradient take ~20 GB, one block of them 0.8 GB (plumbing/chunked_loss.py)
        rows = self.loss_block_rows(idx.numel(), idx.device, torch.is_grad_enabled())
        return None, chunked_loss.cross_entropy(x.flatten(0, 1), self.lm_head.weight,
                                                targets.flatten(), self.config.vocab_size, rows,
                                                self.compile_loss)

    def features(self, idx, cache=None):
        """The final hidden states (B, T, C): everything but the output projection."""
        B, T = idx.shape
        start = len(cache) if cache is not None else 0  # sampling: after the cached positions
        assert start + T <= self.config.block_size, f"{start + T} tokens > {self.config.block_size}"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        p = self.dropout if self.training else 0.0
        # a token's vector plus its position's: attention alone does not know where a token is
        x = maybe_dropout(self.transformer.wte(idx) + self.transformer.wpe(pos), p)  # (B, T, C)
        for block in self.transformer.h:
            if self.grad_checkpoint and self.training and cache is None:
                # keep only the block's input; backward runs it again (same dropout masks)
                x = torch.utils.checkpoint.checkpoint(block, x, None, p, use_reentrant=False)
            else:
                x = block(x, cache, p)
        return self.transformer.ln_f(x)

    def head(self, x):
        logits = self.lm_head(x)  # (..., C) -> (..., padded_vocab)
        logits[..., self.config.vocab_size:] = float("-inf")  # padding rows are never a token
        return logits

    def loss_block_rows(self, n, device="cpu", grad=True):  # rows per block of the loss
        return chunked_loss.block_rows(n, self.config.padded_vocab_size, torch.device(device), grad,
                                       self.loss_block_bytes)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied wte/lm_head counted once

    @classmethod
    def from_pretrained(cls, path_or_name):
        """OpenAI's GPT-2 (or any Hugging Face GPT-2): a hub name such as "gpt2", or a directory."""
        shape, sd_hf = huggingface.read_hf_gpt2(path_or_name, hub_names=PRESETS)
        model = cls(GPTConfig(**shape))
        huggingface.load_hf_weights(model, sd_hf, path_or_name)  # their layout -> ours, padded
        return model


# =============================================================================
# 2. The optimizer


def configure_optimizer(model, lr, weight_decay, device_type, muon=None):
    """AdamW with GPT-3's betas (0.9, 0.95) and eps 1e-8 (paper, appendix B), weight decay on 2-D
    tensors only (as build-nanogpt); with muon (its settings), Muon for the blocks' matrices."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Muon only for the blocks' matrices, which map hidden states to hidden states; embeddings
    # (rows that learn from their own tokens alone) and 1-D tensors stay on AdamW (Jordan 2024)
    blocks = model.transformer.h
    matrices = [p for b in blocks for p in b.parameters() if p.dim() == 2] if muon else []
    params = [p for p in params if all(p is not m for m in matrices)]
    # Why: decay regularizes the 2-D tensors (matmuls, embeddings); biases and gains need no pull
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # the fused kernel updates a parameter in one pass over memory, not one per operation
    fused = device_type in ("cuda", "cpu")
    adamw = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    if not muon:
        return adamw
    muon = Muon(matrices, **muon)
    muon.param_groups[0]["lr_ratio"] = muon.defaults["lr"] / lr  # train_step: lr x this
    return Combined(adamw=adamw, muon=muon)


class Combined:
    """Optimizers (name=optimizer) as one, for the loop, GradScaler and checkpoints."""

    def __init__(self, **parts):
        self.parts = parts

    @property
    def param_groups(self):
        return [group for opt in self.parts.values() for group in opt.param_groups]

    def step(self):
        for opt in self.parts.values():
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state):
        for name, opt in self.parts.items():
            opt.load_state_dict(state[name])


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024): momentum, then each matrix's update orthogonalized. A few
    directions dominate a gradient; Muon keeps U V^T of its SVD U S V^T, so every direction moves
    as far and the rare ones learn as fast: GPT-2 124M in 1.5x fewer tokens (modded-nanogpt).
    torch.optim.Muon's step, with Newton-Schulz in ns_dtype."""

    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0, ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if not self.state[p]:  # first step
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf = self.state[p]["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)  # the gradients' moving average
                update = orthogonalize(p.grad.lerp(buf, mu), self.ns_dtype)  # Nesterov's
                p.mul_(1 - lr * group["weight_decay"])
                # U V^T's entries are smaller in a tall matrix: scaled by sqrt(rows / cols)
                p.add_(update, alpha=-lr * math.sqrt(max(1, p.size(0) / p.size(1))))


def orthogonalize(g, dtype, steps=5):
    """Roughly U V^T of g = U S V^T, without an SVD: a quintic Newton-Schulz iteration maps each
    singular value s to a s + b s^3 + c s^5. Jordan's coefficients lift small values fast in 5
    steps and leave them between ~0.5 and ~1.5, not at 1: no worse for training (Jordan 2024)."""
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x  # the iteration multiplies by x x^T: the smaller side
    x = x / x.norm().clamp(min=1e-7)  # the Frobenius norm bounds the singular values: all <= 1
    for _ in range(steps):
        a = x @ x.T
        x = torch.addmm(x, torch.addmm(a, a, a, beta=-4.7750, alpha=2.0315), x, beta=3.4445)
    return x.T if tall else x


# =============================================================================
# 3. The data: tokens on disk (token_files reads them) -> micro-batches of (x, y)


class DataLoader:
    """Micro-batches of B sequences of T tokens, epoch after epoch: each shard cut into blocks of
    T (+1) tokens, read B at a time; with shuffle, epoch e permutes shards and blocks seeded by
    (seed, e). Micro-batch j goes to rank j % world_size: N ranks with A accumulation steps see
    what one process with N*A steps sees, and (epoch, shard, pos) resumes on any number of ranks."""

    def __init__(self, shards, B, T, rank=0, world_size=1, shuffle=False, seed=0):
        # the token arrays that hold a micro-batch (rank 0 names the shorter ones)
        self.shards = token_files.shards_that_fill(shards, B * T + 1, rank)
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.shard, self.pos = 0, 0, 0  # pos: tokens of the shard read
        self._cached = (None, None)  # ((epoch, shard), block order)

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "pos": self.pos,
                "shuffle": int(self.shuffle), "seed": self.seed}

    def load_state_dict(self, state):
        # an older checkpoint holds only shard and pos: it goes on in file order
        state = {"epoch": 0, "shuffle": 0, "seed": 0, **state}
        self.epoch, self.shard, self.pos = (int(state[k]) for k in ("epoch", "shard", "pos"))
        self.shuffle, self.seed = bool(state["shuffle"]), int(state["seed"])

    def _shard_order(self):  # the file index of each shard, in the order this epoch reads them
        if not self.shuffle:
            return range(len(self.shards))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))

    def _blocks(self, i):  # the start of each block of shard file i, in this epoch's order
        if self._cached[0] != (self.epoch, i):
            starts = np.arange((len(self.shards[i]) - 1) // self.T) * self.T  # T+1 tokens a block
            if self.shuffle:  # seeded by the epoch and the file, not where it is read
                starts = np.random.default_rng([self.seed, self.epoch, i]).permutation(starts)
            self._cached = ((self.epoch, i), starts)
        return self._cached[1]

    def _advance(self):  # (file index, block starts) of the next micro-batch; moves past it
        if self.pos // self.T + self.B > len(self._blocks(self._shard_order()[self.shard])):
            self.shard, self.pos = self.shard + 1, 0
            if self.shard == len(self.shards):  # past the last shard: a new epoch
                self.epoch, self.shard = self.epoch + 1, 0
        i = self._shard_order()[self.shard]
        first = self.pos // self.T
        self.pos += self.B * self.T
        return i, self._blocks(i)[first: first + self.B]

    def next_batch(self):
        for r in range(self.world_size):  # other ranks' micro-batches are skipped, not read
            i, starts = self._advance()
            if r == self.rank:
                rows = [self.shards[i][s: s + self.T + 1] for s in starts]
                # uint16 on disk (50257 ids fit), int64 for the embedding lookup
                buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
        # targets: the inputs shifted by one, so every position is an example
        x = buf[:, :-1].contiguous()  # (B, T) inputs
        y = buf[:, 1:].contiguous()  # (B, T) targets: the next token at every position
        return x, y


# =============================================================================
# 4. The schedule: how fast to learn at each step, how many micro-steps make one step


def get_lr(step, max_lr, warmup_steps, max_steps, min_lr_ratio=0.1):
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr_ratio * max_lr at
    max_steps (GPT-3 paper, appendix B), flat after that."""
    min_lr = max_lr * min_lr_ratio
    # Why warm up: at init the moment estimates are poor and the gradients large; full steps
    # could throw the model somewhere it never recovers from
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    # Why decay: late in training smaller steps settle into the valley, not bounce across it
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def grad_accum_steps(total_batch_size, batch_size, seq_len, world_size):
    """Micro-steps per optimizer step so that all ranks together process total_batch_size tokens
    (batch_size None: --batch_size auto, not yet chosen: only checked)."""
    per_micro = (batch_size or 1) * seq_len * world_size
    if total_batch_size % per_micro != 0:
        raise errors.UserError(train_flags.indivisible_batch(total_batch_size, batch_size, seq_len,
                                                             world_size))
    return total_batch_size // per_micro if batch_size else None


# =============================================================================
# 5. Training, in the order a run goes: setup_ddp (which process, which device), build_state (the
# model, optimizer, loader), wrap_model (compiled, in DDP), train_step, and train: the loop, which
# evaluates now and then (section 6). The defaults are GPT-2 124M's recipe: 524,288 tokens a step
# and max_lr 6e-4 (GPT-3 paper, table 2.1), 715 warmup steps (375M tokens), weight decay 0.1, clip
# 1.0 (appendix B); 19,073 steps: FineWeb-Edu's 10B-token sample once (build-nanogpt's budget).


def setup_ddp(cfg):
    """Which process of the run this is, on which device; cfg: the flags (train_flags, section 8).
    torchrun starts one process per GPU, on every node, and tells each its place in env vars."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # started by torchrun?
    rank = int(os.environ.get("RANK", 0))  # this process among all: 0 .. world_size - 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # among this node's: the GPU it drives
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    check_config(cfg, world_size)  # (section 7) the flags first: a typo costs no device setup
    # the device ("cuda:<local_rank>" on GPUs; auto: cuda > mps > cpu), the dtype (auto: bf16
    # where native, else fp16 on GPUs, else fp32); rt.master (rank 0) logs and saves checkpoints
    rt = runtime.resolve(cfg.device, cfg.dtype, ranks=(ddp, rank, local_rank, world_size))
    runtime.configure_process(rt)  # this GPU made current; TF32, CPU threads
    if ddp:  # the ranks meet. Long timeout: rank 0 alone may write gpt2-xl's 19 GB checkpoint
        backend = "nccl" if rt.device_type == "cuda" else "gloo"  # NCCL between GPUs
        dist.init_process_group(backend, **runtime.rendezvous(rank, world_size, cfg.dist_timeout))
    return rt


@dataclass
class TrainState:
    """What the loop starts from (build_state) and carries."""
    model: nn.Module  # the plain GPT (FSDP: blocks sharded): evaluation, sampling, saving
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: DataLoader
    val_shards: list
    batch_size: int  # sequences per micro-step on each rank
    grad_accum: int  # micro-steps per optimizer step
    compile: bool  # whether to torch.compile the model
    sync_once: bool = True  # FSDP: gradients reduced once a step, not every micro-step
    step: int = 0  # steps taken: where the loop starts
    last_good: str = None  # the newest checkpoint known to give a finite loss (never pruned)
    wandb_id: str = None  # the W&B run a resumed run continues


def build_state(cfg, rt):
    """What training starts from: the model on its device, the optimizer, the data loader and the
    micro-steps a step; new (seeded by --seed), fine-tuned (--init_from) or resumed (--resume)."""
    ckpt = startup.checkpoint_to_resume(cfg, rt)  # None: a new run
    init_model = load_model(cfg.init_from, report=rt.master) if cfg.init_from else None
    config = model_config(cfg, ckpt, init_model)
    train_shards, val_shards = token_files.train_and_val(cfg.data, val=bool(cfg.eval_every))

    torch.manual_seed(cfg.seed)  # the initial weights: the same on every rank
    model = (init_model or GPT(config)).to(rt.device)
    model.grad_checkpoint, model.dropout = bool(cfg.grad_checkpoint), cfg.dropout
    # to compile or not; FSDP's shards (--fsdp 1); --batch_size auto: the micro-batch that fits
    batch_size, compile_model = startup.place_model(model, cfg, rt)
    grad_accum = grad_accum_steps(cfg.total_batch_size, batch_size, cfg.seq_len, rt.world_size)
    torch.manual_seed(runtime.rank_seed(cfg.seed, rt.rank))  # each rank its own dropout masks
    loader = DataLoader(train_shards, batch_size, cfg.seq_len, rt.rank, rt.world_size,
                        token_files.data_shuffle(cfg), cfg.seed)
    # Muon: no weight decay; Newton-Schulz in bf16 (as torch.optim.Muon), else fp32
    ns_dtype = torch.bfloat16 if rt.dtype == "bf16" else torch.float32
    muon = dict(lr=cfg.muon_lr, momentum=cfg.muon_momentum, ns_dtype=ns_dtype)
    optimizer = configure_optimizer(model, cfg.max_lr, cfg.weight_decay, rt.device_type,
                                    muon if cfg.optimizer == "muon" else None)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 have fp32's exponent range
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "fp16")
    s = TrainState(model, optimizer, scaler, loader, val_shards, batch_size, grad_accum,
                   compile_model)
    startup.restore(s, ckpt, cfg, rt)  # a checkpoint's weights, moments, data position, step
    return s


def wrap_model(model, cfg, rt, compile_model):
    """The model the training steps run: its blocks compiled, in DDP under torchrun (--fsdp 1:
    startup.place_model did both)."""
    if compile_model and not cfg.fsdp:
        # Why compile: it fuses elementwise work (casts, GELU, LayerNorm, the residual adds) into
        # kernels that read memory once, not once per operation; one graph that all blocks reuse
        compiling.compile_blocks(model)
    if rt.ddp and not cfg.fsdp:
        # DDP averages the gradients over the ranks in backward, bucket by bucket, overlapped
        # with the rest of backward (gradient_as_bucket_view: the gradients live in the buckets)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None,
            gradient_as_bucket_view=True)
    return model


def train_step(model, s, lr, grad_clip, rt, fsdp=False):
    """One step of s.optimizer: s.grad_accum micro-steps of s.loader's batches on every rank.
    Returns the mean loss (a tensor) and the gradient norm before clipping. Lines marked (fp16),
    (FSDP) or (Muon) do nothing under the defaults (bf16 or fp32, DDP or one process, AdamW)."""
    model.train()
    loss_accum = torch.zeros((), device=rt.device)
    for micro in range(s.grad_accum):
        x, y = runtime.to_device(s.loader.next_batch(), rt)  # CUDA: copied while the GPU works
        # DDP all-reduces gradients in backward(); only the last micro-step needs to, the others
        # skip it (no_sync) and add up locally
        last = micro == s.grad_accum - 1
        sync = model.no_sync() if rt.ddp and not fsdp and not last else contextlib.nullcontext()
        if fsdp:  # (FSDP) likewise with sync_once, holding the whole gradient and weights till then
            model.set_requires_gradient_sync(last or not s.sync_once)
            model.set_reshard_after_backward(last or not s.sync_once)
        with sync:
            with rt.autocast():  # matmuls in bf16/fp16 if set up; weights and loss stay fp32
                loss = model(x, y)[1]  # the loss alone: keeping (B, T, vocab) logits costs GBs
            # Why divide: backward() adds up the micro-steps' gradients; we want the mean loss's
            loss = loss / s.grad_accum
            loss_accum += loss.detach()
            s.scaler.scale(loss).backward()  # (fp16) scaled up first: small gradients stay above 0
    if rt.ddp:  # the mean loss over the ranks, for the log only
        dist.all_reduce(loss_accum)
        loss_accum /= rt.world_size
    s.scaler.unscale_(s.optimizer)  # (fp16) the true gradients again, before their norm is taken
    # Why clip (to 1.0 in the GPT-3 recipe): a rare bad batch gives a huge gradient; scaled down
    # it keeps its direction, but one step can throw the weights only so far
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    for group in s.optimizer.param_groups:  # this step's learning rate; (Muon) at its own peak
        group["lr"] = lr * group.get("lr_ratio", 1)
    s.scaler.step(s.optimizer)  # the update; (fp16) skipped if a gradient overflowed to inf
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    return loss_accum, norm


@long_run.guards_the_run  # a lock on --log_dir; the caller's signal handlers back afterwards
def train(cfg):
    """Pretraining: set up the ranks, build what training starts from, then loop: now and then
    evaluate, sample and checkpoint; always one optimizer step."""
    rt = setup_ddp(cfg)
    s = build_state(cfg, rt)  # new, or a checkpoint's step, weights and data position
    # train_model runs the steps (DDP or FSDP); s.model, the same weights, evaluates and is saved
    train_model = wrap_model(s.model, cfg, rt, s.compile)
    hella = hellaswag_eval.for_training(cfg, rt) if cfg.hellaswag_every else None  # examples
    enc = token_files.get_encoding() if cfg.sample_every or hella else None  # GPT-2's tokenizer
    run = long_run.LongRun(cfg, rt, s)  # the log, checkpoints, signals: a long run's machinery
    log = run.log  # log.txt, W&B and the console, from rank 0

    # Why max_steps + 1 passes, the evaluations first: pass k evaluates, samples and saves the
    # model after k steps; the last pass does that for the final model and takes no step.
    for step in range(s.step, cfg.max_steps + 1):
        last = step == cfg.max_steps
        run.stop_if_signalled(step)  # SIGTERM or Ctrl-C came: checkpoint here, and exit
        # Eagerly: the blocks are compiled in place, and evaluation's shapes would recompile them
        with torch.compiler.set_stance("force_eager"):
            if cfg.eval_every and (step % cfg.eval_every == 0 or last):
                # the loss on text never trained on (falling train loss could be memorization)
                val_loss = evaluate_loss(s.model, s.val_shards, cfg.val_tokens, s.batch_size,
                                         cfg.seq_len, rt, cfg.fsdp)
                # log(line of log.txt, line of the console)
                log(f"{step} val {val_loss:.6f}", f"step {step:5d} | val loss {val_loss:.6f}")
            if hella is not None and (step % cfg.hellaswag_every == 0 or last):
                counts = hellaswag_eval.totals(hellaswag_score, s.model, hella, enc, s.batch_size,
                                               rt, cfg.fsdp)
                acc = hellaswag_eval.accuracies(counts)  # {n, acc, acc_norm}
                log(f"{step} hella {acc['acc_norm']:.6f}", f"step {step:5d} | hellaswag acc_norm "
                    f"{acc['acc_norm']:.4f} ({acc['n']} examples)")
            # under FSDP every rank samples (the same texts): each forward needs all ranks
            if cfg.sample_every and (rt.master or cfg.fsdp) and step > 0 and (
                    step % cfg.sample_every == 0 or last):
                texts = sample_texts(s.model, enc, cfg.prompt, num_samples=4, max_new_tokens=32,
                                     rt=rt, seed=cfg.seed + step)
                for i, text in enumerate(texts):
                    log.print(f"sample {i}: {text!r}")
        if cfg.checkpoint_every and step > s.step and (step % cfg.checkpoint_every == 0 or last):
            run.checkpoint(step)  # model_<step>.pt: weights, optimizer, data position, randomness
        if last:
            break

        t0 = time.perf_counter()  # one optimizer step
        # the learning rate is a function of the step: a resumed run goes on exactly
        lr = get_lr(step, cfg.max_lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        with run.out_of_memory(step):  # one line naming the fixes, not a traceback
            loss, norm = train_step(train_model, s, lr, cfg.grad_clip, rt, cfg.fsdp)
        loss = loss.item()  # waits for the device to finish the step: now its time is known
        dt = time.perf_counter() - t0
        run.after_step(step, loss)  # a non-finite loss stops the run; a signal stops it next pass
        # the step's line: total_batch_size / dt tokens a second, MFU, the time left
        log.step(step, loss, lr, norm.item(), dt)
    run.finish()  # the ranks wait for each other; W&B closes


# =============================================================================
# 6. Evaluation and sampling


@torch.no_grad()
def evaluate_loss(model, val_shards, n_tokens, batch_size, seq_len, rt, fsdp=False):
    """Mean cross-entropy over the fixed val set, split over ranks."""
    loss_sum, count = 0.0, 0
    # the first n_tokens // seq_len sequences of the val split, the same at every evaluation
    # (FSDP: a rank with fewer batches runs idle ones, y None: each forward needs all ranks)
    batches = token_files.val_batches(val_shards, n_tokens, batch_size, seq_len, rt, fsdp)
    with runtime.eval_mode(model):  # no dropout
        for x, y in batches:
            with rt.autocast():  # the training loss, without gradients
                _, loss = model(x.to(rt.device), None if y is None else y.to(rt.device))
            if y is not None:
                loss_sum += loss.item() * y.numel()
                count += y.numel()
    loss_sum, count = runtime.sum_over_ranks([loss_sum, count], rt)
    return loss_sum / count


# HellaSwag (Zellers et al. 2019): a context, 4 endings, one right. The model's cross-entropy on
# an ending's tokens after the context says how surprised it is; the least surprising ending is its
# answer: by the summed loss (acc) or the mean per token (acc_norm: long endings not punished).


def hellaswag_score(model, examples, enc, device="cpu", batch_size=16,
                    autocast=contextlib.nullcontext, progress=False):
    """How many examples the model gets right: {n, correct (acc), correct_norm (acc_norm)}."""
    # tokens: the context, and each ending with a leading space (as a word mid-sentence)
    rendered = [hellaswag_eval.render_example(ex, enc) for ex in examples]
    with runtime.eval_mode(model):  # no dropout
        # (n, 4) each: an ending's summed loss, and its token count. For one ending, as if
        # F.cross_entropy(model([ctx + end])[0][0, len(ctx) - 1:-1], end, reduction="sum")
        loss_sum, n_tokens = hellaswag_eval.ending_losses(model, rendered, device, batch_size,
                                                          autocast, progress)
    label = torch.tensor([ex["label"] for ex in examples])  # (n,) the right ending
    pick = loss_sum.argmin(1)  # (n,) least surprising in all
    pick_norm = (loss_sum / n_tokens.clamp(min=1)).argmin(1)  # (n,) least surprising a token
    return dict(n=len(examples), correct=int((pick == label).sum()),
                correct_norm=int((pick_norm == label).sum()))


class KVCache:
    """Keys and values of every token so far, per layer: sampling feeds one new token a step."""

    def __init__(self, n_layer):
        self.kv = [None] * n_layer
        self.layer = 0  # which layer the next update() belongs to

    def __len__(self):
        return 0 if self.kv[0] is None else self.kv[0][0].size(2)

    def update(self, k, v):
        if self.kv[self.layer] is not None:  # the past's, then these: (B, nh, T_past + T, hs)
            k, v = (torch.cat([past, new], dim=2) for past, new in zip(self.kv[self.layer], (k, v)))
        self.kv[self.layer] = (k, v)
        self.layer = (self.layer + 1) % len(self.kv)
        return k, v


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
             use_cache=True):
    """Continues idx (B, T) by max_new_tokens tokens; temperature 0 is greedy. With the KV cache a
    new token costs one position's forward (a full cache restarts from the last block_size)."""
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
        logits = logits[:, -1, :].float()  # (B, vocab): the last position predicts the next
        if temperature == 0:
            next_tok = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            logits = logits / temperature  # < 1 sharpens the distribution, > 1 flattens it
            if top_k:  # never pick from the long tail of unlikely tokens, where nonsense lives
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)  # (B, vocab)
            next_tok = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, next_tok], dim=1)
    return idx


def sample_texts(model, enc, prompt, num_samples, max_new_tokens, rt, temperature=1.0, top_k=50,
                 seed=0):
    """num_samples continuations of prompt, as text, from a seeded generator of their own."""
    tokens = enc.encode(prompt, allowed_special="all")  # not empty: the commands refuse ""
    idx = torch.tensor([tokens] * num_samples, dtype=torch.long, device=rt.device)  # (n, T)
    gen = torch.Generator(device=rt.device).manual_seed(seed)  # training's stays untouched
    with rt.autocast():
        out = generate(model, idx, max_new_tokens, temperature, top_k, gen)
    return [enc.decode(row) for row in out.tolist()]


# =============================================================================
# 7. Checking the flags against the model, and a trained model back from disk


def check_config(cfg, world_size):
    """The flags, before any device or process-group setup: a typo costs nothing."""
    train_flags.check(cfg)  # each flag's domain, and the pairs that exclude each other
    if not cfg.resume and not cfg.init_from:  # the shape flags (a checkpoint's: once read)
        model_config(cfg)
    batch_size = None if cfg.batch_size == "auto" else cfg.batch_size
    grad_accum_steps(cfg.total_batch_size, batch_size, cfg.seq_len, world_size)
    long_run.check_run_outputs(cfg)  # the prompt, the log directory, wandb: they read files


def model_config(cfg, ckpt=None, init_model=None):
    """The model shape: the checkpoint's (resuming), the weights' (fine-tuning) or the preset's."""
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k)}
    given = GPTConfig(**ckpt["config"]) if ckpt else init_model and init_model.config
    config = given or GPTConfig(**{**PRESETS[cfg.model], **overrides})
    # the shape flags agree with given's; heads divide n_embd; seq_len fits the position table
    train_flags.check_shape(config, cfg.seq_len, overrides)
    return config


def load_model(path, report=False):
    """A model from a checkpoint file (ours, build-nanogpt's, nanoGPT's, llm.c's) or Hugging Face
    GPT-2 weights (name or directory). report: say what was read."""
    if not os.path.isfile(path):
        return GPT.from_pretrained(path)
    ckpt = checkpoints.load(path, init_report=report)
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as e:
        why = str(e).splitlines()[0]
        raise errors.UserError(f"{path} holds no GPT-2 of ours ({why})") from None
    return model


# =============================================================================
# 8. The command line: train (the default), or sample, export, evaluate, plot (commands)


@errors.cli  # a mistake as one line and exit 2, a signal as its exit code
def main(argv):
    if argv and argv[0] in commands.SUBCOMMANDS:  # sample, export, evaluate, plot
        return commands.run(argv, load_model, sample_texts, PRESETS)
    try:
        train(train_flags.parse(argv))
    finally:
        runtime.end_process_group()  # torchrun: leave the process group


if __name__ == "__main__":
    main()
