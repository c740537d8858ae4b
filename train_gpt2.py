"""
Train GPT-2 from scratch, in a file that reads top to bottom as a lecture on pretraining:

    1. the model          token and position embeddings, transformer blocks, the output layer
    2. the optimizer      AdamW with the GPT-3 paper's settings
    3. the data           token shards cut into micro-batches, the same on any number of GPUs
    4. the schedule       linear warmup, then cosine decay of the learning rate
    5. the training loop  train() and train_step(): the whole of pretraining
    6. evaluation         val loss, HellaSwag, and sampling text with a KV cache
    7. checks, loading    the flags against the model's shape; a trained model from disk
    8. the command line   train (the default), sample, export, plot, evaluate
What real machines need and a reader can skip is in plumbing/, a module a job, called by name
(runtime.setup, checkpoints.save, ...; plumbing/__init__.py lists them).

    python train_gpt2.py --data input.txt --n_layer 4 --n_head 4 --n_embd 128 ...   # a laptop
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --data edu_fineweb10B  # 8 GPUs
    python train_gpt2.py sample --checkpoint log/model_19073.pt --prompt "Hello"
docs/flags.md has every flag; README.md and docs/ the rest.
"""

import contextlib
import dataclasses
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

# the plumbing, a module a job (plumbing/__init__.py lists them), called by name
from plumbing import checkpoints, chunked_loss, commands, errors, evaluate, flags, formats
from plumbing import hellaswag_eval, huggingface, memory, mfu, optimizers, plot, resume, runlog
from plumbing import runtime, sharding, signals, token_files, train_flags

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
        # Why: 50257 is an awkward number for matmul kernels; rounding the table up to a multiple
        # of 128 (50304) makes lm_head measurably faster. The extra rows are never targets, and
        # their logits are -inf (head(), the loss), so they never win.
        return (self.vocab_size + 127) // 128 * 128


# The shapes of OpenAI's four GPT-2 checkpoints (GPT-2 paper, table 2, and the released configs).
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def maybe_dropout(x, p):
    # Why not F.dropout(x, 0): skipping it keeps dropout-0 runs exactly what they were without it
    return F.dropout(x, p) if p > 0 else x


class CausalSelfAttention(nn.Module):
    """Every position looks back at all earlier ones, in n_head independent heads, and mixes in
    what it finds."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        # q, k, v for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # mixes the heads' outputs
        self.c_proj.RESIDUAL_PROJ = True  # scaled at init, see GPT._init_weights

    def forward(self, x, cache=None, dropout=0.0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # each head attends on its own, with its own C / n_head channels: heads become a batch dim
        nh, hs = self.n_head, C // self.n_head
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # sampling: the keys and values of the tokens before are kept
            k, v = cache.update(k, v)  # (B, nh, T_past + T, hs)
        # A query attends to itself and the past. With a cache and one new token the whole past is
        # visible, so no mask is needed; with no cache the usual causal mask applies.
        assert cache is None or T == 1 or k.size(2) == T, "a cached forward takes one token a time"
        # softmax(q k^T / sqrt(hs)) v, in blocks (flash attention), never the (T, T) matrix whole
        causal = k.size(2) == T and T > 1
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)  # like q
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return maybe_dropout(self.c_proj(y), dropout)


class MLP(nn.Module):
    """Each position on its own: widen 4x, a nonlinearity, narrow back. Two thirds of a block's
    weights."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # GPT-2 used the tanh approximation of GELU (cheaper in 2019); the exact one changes outputs
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
        # Pre-LayerNorm (GPT-2 moved it from after each branch to before it): the residual stream x
        # is never normalized, so gradients flow straight from the loss to the first layer.
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
        # Weight tying (GPT-2; Press & Wolf 2017): the input embedding and the output projection are
        # one matrix. A token's vector both reads it and predicts it; 38M of 124M weights are saved.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        self.grad_checkpoint = False  # set by training to trade compute for memory
        self.dropout = 0.0  # set by training; only in train() mode
        self.loss_block_bytes = None  # fp32 logits per block of the loss; None: the device's budget

    def _init_weights(self, module):
        # GPT-2 init: N(0, 0.02), biases zero; each residual projection scaled by 1/sqrt(2 *
        # n_layer) because every block adds two of them to the residual stream (GPT-2 paper,
        # section 2.3): without it the stream's variance would grow with depth.
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
                                                targets.flatten(), self.config.vocab_size, rows)

    def features(self, idx, cache=None):
        """The final hidden states (B, T, C): everything but the output projection."""
        B, T = idx.shape
        start = len(cache) if cache is not None else 0  # sampling: after the cached positions
        assert start + T <= self.config.block_size, f"{start + T} tokens > {self.config.block_size}"
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        p = self.dropout if self.training else 0.0
        # a token's vector plus its position's: attention itself does not know where a token is
        x = maybe_dropout(self.transformer.wte(idx) + self.transformer.wpe(pos), p)  # (B, T, C)
        for block in self.transformer.h:
            if self.grad_checkpoint and self.training and cache is None:
                # keep only the block's input; backward runs the block again (same dropout masks:
                # the checkpoint restores the random state) to get what it needs
                x = torch.utils.checkpoint.checkpoint(block, x, None, p, use_reentrant=False)
            else:
                x = block(x, cache, p)
        return self.transformer.ln_f(x)

    def head(self, x):
        """Hidden states (..., C) -> logits (..., padded_vocab), the padding -inf."""
        logits = self.lm_head(x)  # (..., padded_vocab)
        logits[..., self.config.vocab_size:] = float("-inf")  # padding rows are never a token
        return logits

    def loss_block_rows(self, n, device="cpu", grad=True):
        """Rows per block of the loss for n rows in all (chunked_loss.block_rows)."""
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
    """AdamW as in the GPT-3 paper (appendix B): betas (0.9, 0.95), eps 1e-8, weight decay on
    matrices only. muon (Muon's settings, --optimizer muon): Muon for the blocks' matrices."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Muon only for the matrices inside the blocks, which map one hidden state to another. The
    # embedding (the tied output layer too) is a lookup table whose rows learn from their own
    # tokens alone, and 1-D tensors are no matrices: they stay on AdamW (Jordan 2024; nanochat).
    blocks = model.transformer.h
    matrices = [p for b in blocks for p in b.parameters() if p.dim() == 2] if muon else []
    params = [p for p in params if all(p is not m for m in matrices)]
    # Why: decaying 2-D tensors (matmul weights, embeddings) regularizes; decaying biases and
    # LayerNorm gains only pulls them towards zero for no benefit.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates each parameter in one pass over memory instead of one per operation
    # of the update: one launch on CUDA, several times faster on CPU, the same results.
    fused = device_type in ("cuda", "cpu")
    adamw = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    if not muon:
        return adamw
    muon = Muon(matrices, **muon)
    muon.param_groups[0]["lr_ratio"] = muon.defaults["lr"] / lr  # its peak over AdamW's
    return optimizers.Combined(adamw=adamw, muon=muon)


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers"): momentum, then each
    matrix's update orthogonalized. A gradient's update is dominated by a few directions; Muon
    keeps U V^T of its SVD U S V^T, so that every direction moves as far, and the rare ones learn
    as fast as the common: GPT-2 124M reached the same loss in 1.5x fewer tokens (modded-nanogpt).
    torch.optim.Muon's step (tests/test_model.py holds them equal), orthogonalized in ns_dtype."""

    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0, ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if not self.state[p]:  # the first step
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf = self.state[p]["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)  # the gradients' moving average
                update = orthogonalize(p.grad.lerp(buf, mu), self.ns_dtype)  # Nesterov: look ahead
                p.mul_(1 - lr * group["weight_decay"])
                # U V^T's entries are smaller in a tall matrix: scaled by sqrt(rows / cols) (Jordan)
                p.add_(update, alpha=-lr * math.sqrt(max(1, p.size(0) / p.size(1))))


def orthogonalize(g, dtype, steps=5):
    """About U V^T of g = U S V^T, without an SVD: a quintic Newton-Schulz iteration that drives
    every singular value towards 1 (its coefficients are Jordan's, tuned for 5 steps)."""
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x  # the iteration multiplies by x x^T: the smaller side
    x = x / x.norm().clamp(min=1e-7)  # the Frobenius norm bounds the singular values: all <= 1
    for _ in range(steps):
        a = x @ x.T
        x = torch.addmm(x, torch.addmm(a, a, a, beta=-4.7750, alpha=2.0315), x, beta=3.4445)
    return x.T if tall else x


# =============================================================================
# 3. The data: tokens on disk (token_files reads and checks them) -> micro-batches of (x, y)


class DataLoader:
    """Micro-batches of B sequences of T tokens, epoch after epoch. Each shard is cut into blocks
    of T tokens (plus the next, for the targets), read B at a time (a shard's last < B are skipped).
    Unshuffled, in file order; with shuffle, epoch e permutes the shards and their blocks seeded by
    (seed, e) alone: documents mix, reads stay in one memory-mapped shard at a time. Micro-batch j
    goes to rank j % world_size, so N ranks with A accumulation steps see exactly what one process
    with N*A steps sees, and the position (epoch, shard, pos) resumes on any number of ranks."""

    def __init__(self, shards, B, T, rank=0, world_size=1, shuffle=False, seed=0):
        # fineweb.py's last shard may be shorter than a micro-batch: skipped
        self.shards = token_files.shards_that_fill(shards, B * T + 1, rank)
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.shard, self.pos = 0, 0, 0  # pos: tokens of the shard read, T per block
        self._cached = (None, None)  # ((epoch, shard), block order): the current shard's blocks

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "pos": self.pos,
                "shuffle": int(self.shuffle), "seed": self.seed}

    def load_state_dict(self, state):
        # a checkpoint from before shuffling holds only shard and pos: it continues in file order
        self.shard, self.pos = int(state["shard"]), int(state["pos"])
        self.epoch = int(state.get("epoch", 0))
        self.shuffle, self.seed = bool(state.get("shuffle", 0)), int(state.get("seed", 0))

    def _shard_order(self):
        """The file index of each shard, in the order this epoch reads them."""
        if not self.shuffle:
            return range(len(self.shards))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))

    def _blocks(self, i):
        """The start of each block of shard file i, in the order this epoch reads them."""
        if self._cached[0] != (self.epoch, i):
            starts = np.arange((len(self.shards[i]) - 1) // self.T) * self.T  # T+1 tokens a block
            if self.shuffle:  # seeded by the epoch and the file, not by where it is read
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
        for r in range(self.world_size):  # the other ranks' micro-batches are skipped, not read
            i, starts = self._advance()
            if r == self.rank:
                rows = [self.shards[i][s: s + self.T + 1] for s in starts]
                # one read of B*(T+1) tokens; uint16 on disk (50257 ids fit), int64 for embeddings
                buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
        # Why T+1 tokens: the targets are the inputs shifted by one, so every position is an example
        x = buf[:, :-1].contiguous()  # (B, T) inputs
        y = buf[:, 1:].contiguous()  # (B, T) targets: the next token at every position
        return x, y


# =============================================================================
# 4. The schedule: how fast to learn at each step, and how many micro-steps make one step


def get_lr(step, max_lr, warmup_steps, max_steps, min_lr_ratio=0.1):
    """Linear warmup to max_lr over warmup_steps, then cosine decay to min_lr_ratio * max_lr at
    max_steps (GPT-3 paper, appendix B), flat after that."""
    min_lr = max_lr * min_lr_ratio
    # Why warm up: at init AdamW's moment estimates are poor and the gradients large; full-size
    # steps then could throw the model somewhere it never recovers from
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)  # 0 -> 1
    # Why decay: late in training smaller steps settle into the valley instead of bouncing across
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def grad_accum_steps(total_batch_size, batch_size, seq_len, world_size):
    """Micro-steps per optimizer step so that all ranks together process total_batch_size tokens.
    batch_size None (--batch_size auto, not yet chosen) checks that whole sequences fill a step."""
    per_micro = (batch_size or 1) * seq_len * world_size
    if total_batch_size % per_micro != 0:
        what, fix = ("batch_size * ", f"{batch_size} * ") if batch_size else ("", "")
        raise errors.UserError(
            f"--total_batch_size {total_batch_size} is not a multiple of {what}seq_len * "
            f"world_size = {fix}{seq_len} * {world_size} = {per_micro}; change --total_batch_size "
            f"(e.g. to {max(1, total_batch_size // per_micro) * per_micro}) or "
            f"{'--batch_size' if batch_size else '--seq_len'}")
    return total_batch_size // per_micro if batch_size else None


# =============================================================================
# 5. Training: the loop, one optimizer step, and building what the loop starts from. The flags
# are train_flags.TrainConfig; their defaults are GPT-2 124M's recipe (GPT-3 paper, appendix B):
# 524,288 tokens a step, max_lr 6e-4, 715 warmup steps, 19,073 steps (10B tokens of FineWeb-Edu),
# weight decay 0.1, gradients clipped to norm 1.0.


@runlog.holds_log_dir  # one run a --log_dir: a second one there is refused until train() ends
@signals.keeps_signal_handlers  # a caller's Ctrl-C handler is back when train() returns or raises
def train(cfg):
    """Pretraining: set up the machine; build (or restore) the model, optimizer and data; wrap the
    model for speed; then loop: now and then evaluate, sample and checkpoint; always one step."""
    rt = runtime.setup(cfg.device, cfg.dtype, check=lambda ranks: check_config(cfg, ranks),
                       dist_timeout=cfg.dist_timeout)
    s = build_state(cfg, rt)  # new, or a checkpoint's step, weights and data position
    # The model's two roles: train_model runs the training steps (compiled; DDP- or FSDP-wrapped);
    # s.model, the same weights, evaluates, samples and is saved, always eagerly
    train_model = wrap_model(s.model, cfg, rt, s.compile)
    log = runlog.RunLog(cfg, rt, s)  # log.txt, W&B, the console (rank 0)
    hella = hellaswag_eval.for_training(cfg, rt) if cfg.hellaswag_every else None
    enc = token_files.get_encoding() if cfg.sample_every or hella else None
    flops, peak = mfu.flops_per_token(s.model.config, cfg.seq_len), mfu.peak_flops(rt)
    stop = signals.StopSignal(rt.ddp)  # SIGTERM/SIGINT: finish the step, checkpoint, exit
    stop_for, new_ckpt = 0, None  # the signal all ranks stop for (0: none); the newest checkpoint
    step_times = []  # seconds of the recent steps (evaluation excluded), for the time left

    def checkpoint(path, step):  # every rank calls it (FSDP gathers); rank 0 writes, then prunes
        checkpoints.save(path, s.model, s.optimizer, s.scaler, step, s.loader, cfg, s.wandb_id,
                         cfg.fsdp)
        if rt.master and cfg.keep_checkpoints:
            checkpoints.prune(cfg.log_dir, cfg.keep_checkpoints, step, s.last_good)

    # Why max_steps + 1 passes, the periodic work before the step: pass k evaluates, samples and
    # saves the model after k steps, so the last pass does that for the final model, and no step.
    for step in range(s.step, cfg.max_steps + 1):
        last = step == cfg.max_steps
        ckpt_path = os.path.join(cfg.log_dir, f"model_{step:05d}.pt")
        if stop_for:  # a signal came during the last step (on any rank): save, and leave
            checkpoint(ckpt_path, step)
            log.print(f"stopped by signal at step {step}; wrote {ckpt_path}; continue with "
                      "--resume auto")
            if rt.ddp:  # no rank leaves before the checkpoint is written
                dist.barrier()
            raise errors.Stopped(stop_for)

        periodic_work(s, cfg, rt, log, hella, enc, step, last)  # val loss, HellaSwag, samples
        if cfg.checkpoint_every and step > s.step and (step % cfg.checkpoint_every == 0 or last):
            checkpoint(ckpt_path, step)
            new_ckpt = ckpt_path
        if last:
            if rt.ddp:  # leave together: tearing down the group under other ranks can abort
                dist.barrier()
            log.finish()
            break

        # ---- one optimizer step ----
        t0 = time.perf_counter()
        # Why set the learning rate by hand: it is a pure function of the step, so a resumed run
        # continues the schedule exactly where it stopped (no scheduler state to save)
        lr = get_lr(step, cfg.max_lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        try:
            loss, norm = train_step(train_model, s, lr, cfg.grad_clip, rt, cfg.fsdp)
        except torch.OutOfMemoryError:
            raise memory.out_of_memory_error(step, s, cfg, rt) from None
        stop_for = signals.agree_on_signal(stop.signum, rt)  # every rank stops after this step
        loss = loss.item()  # waits for the device to finish the step: only now is its time known
        dt = time.perf_counter() - t0
        if not math.isfinite(loss):  # diverged: every later step would be wasted
            raise errors.UserError(f"the loss is {loss} at step {step}; stopping. Last good "
                                   f"checkpoint: {s.last_good or 'none'}; resume from it with a "
                                   "lower --max_lr")
        if new_ckpt and new_ckpt != s.last_good:  # its weights just gave a finite loss
            s.last_good = new_ckpt
            if rt.master and cfg.keep_checkpoints:  # the last good one it replaces may go now
                checkpoints.prune(cfg.log_dir, cfg.keep_checkpoints, step, s.last_good)
        tok_s = cfg.total_batch_size / dt
        # MFU, model FLOPs utilization (PaLM paper, appendix B): the FLOPs the model needs per
        # second over what the hardware can do at best. 40-50% is good on GPUs
        util, peak = mfu.mfu_percent(tok_s, flops, peak, rt)  # a CPU's peak may be measured again
        step_times = step_times[-19:] + [dt] if step > s.step else []  # the first one compiles
        log.step(step, loss, lr, norm.item(), dt, tok_s, util, step_times, cfg.max_steps)


def periodic_work(s, cfg, rt, log, hella, enc, step, last):
    """Every so often, and after the last step: the val loss, HellaSwag, samples. On s.model (no
    DDP hooks), on every rank."""
    # Eagerly: under FSDP the blocks of s.model are compiled in place, and evaluation's other
    # shapes would compile them again and again; force_eager runs compiled code as plain Python.
    with torch.compiler.set_stance("force_eager"):
        if cfg.eval_every and (step % cfg.eval_every == 0 or last):
            # the loss on text never trained on: falling train loss alone could be memorization
            val_loss = evaluate_loss(s.model, s.val_shards, cfg.val_tokens, s.batch_size,
                                     cfg.seq_len, rt, cfg.fsdp)
            log(f"{step} val {val_loss:.6f}", f"step {step:5d} | val loss {val_loss:.6f}")
        if hella is not None and (step % cfg.hellaswag_every == 0 or last):
            counts = hellaswag_eval.totals(s.model, hella, enc, s.batch_size, rt, cfg.fsdp)
            acc = hellaswag_eval.accuracies(counts)
            log(f"{step} hella {acc['acc_norm']:.6f}",
                f"step {step:5d} | hellaswag acc_norm {acc['acc_norm']:.4f} ({acc['n']} examples)")
        # under FSDP every rank samples (the same texts): each forward needs all ranks' shards
        if cfg.sample_every and (rt.master or cfg.fsdp) and step > 0 and (
                step % cfg.sample_every == 0 or last):
            for i, text in enumerate(sample_texts(s.model, enc, cfg.prompt, 4, 32, rt,
                                                  seed=cfg.seed + step)):
                log.print(f"sample {i}: {text!r}")


def train_step(model, s, lr, grad_clip, rt, fsdp=False):
    """One step of s.optimizer: s.grad_accum micro-steps of s.loader's batches on every rank.
    Returns the mean loss (a tensor, for the log) and the gradient norm before clipping."""
    model.train()
    loss_accum = torch.zeros((), device=rt.device)
    for micro in range(s.grad_accum):
        x, y = s.loader.next_batch()
        if rt.device_type == "cuda":  # page-locked host memory lets the copy overlap GPU work
            x, y = (t.pin_memory().to(rt.device, non_blocking=True) for t in (x, y))
        else:
            x, y = x.to(rt.device), y.to(rt.device)
        # DDP all-reduces gradients in backward(); only the last micro-step needs to, so the others
        # skip it (no_sync) and their gradients add up locally. FSDP likewise with sync_once: until
        # the last backward each rank keeps the whole gradient and the gathered weights; without it
        # every backward reduce-scatters and frees, so that each rank only ever holds shards.
        last = micro == s.grad_accum - 1
        if fsdp:
            model.set_requires_gradient_sync(last or not s.sync_once)
            model.set_reshard_after_backward(last or not s.sync_once)
        sync = model.no_sync() if rt.ddp and not fsdp and not last else contextlib.nullcontext()
        with sync:
            with rt.autocast():  # matmuls in bf16/fp16 where set up; weights and loss stay fp32
                loss = model(x, y)[1]  # the loss alone: (B, T, vocab) logits kept would cost GBs
            # Why divide: backward() adds up the micro-steps' gradients, and we want the gradient
            # of the mean loss over the whole batch, as if it had gone through in one piece
            loss = loss / s.grad_accum
            loss_accum += loss.detach()
            s.scaler.scale(loss).backward()  # fp16: scaled up so small gradients do not flush to 0
    if rt.ddp:  # for the log only: SUM, as gloo before torch 2.8 has no AVG
        dist.all_reduce(loss_accum)
        loss_accum /= rt.world_size
    s.scaler.unscale_(s.optimizer)  # (fp16) back to true gradients before measuring their norm
    # Why clip at 1.0 (the GPT-3 recipe): a rare bad batch gives a huge gradient; scaling it down to
    # norm 1 keeps its direction but bounds how far one step can throw the weights
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    for group in s.optimizer.param_groups:  # Muon's: at its own peak, on the same schedule
        group["lr"] = lr * group.get("lr_ratio", 1)
    s.scaler.step(s.optimizer)  # (fp16) skips the step if any gradient overflowed to inf
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    return loss_accum, norm


@dataclass
class TrainState:
    """What the loop starts from (build_state) and carries along."""
    model: nn.Module  # the plain GPT (its blocks sharded under FSDP): evaluation, sampling, saving
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: DataLoader
    val_shards: list
    batch_size: int  # sequences per micro-step on each rank
    grad_accum: int  # micro-steps per optimizer step
    compile: bool  # whether to torch.compile the model
    sync_once: bool = True  # FSDP: gradients reduced once per optimizer step, not every micro-step
    step: int = 0  # optimizer steps already taken: where the loop starts
    last_good: str = None  # the newest checkpoint known to give a finite loss (never pruned)
    wandb_id: str = None  # the W&B run a resumed run continues


def build_state(cfg, rt):
    """What training starts from: new (seeded by --seed), weights to fine-tune (--init_from), or a
    whole training state to continue (--resume: also the step, data position, random state)."""
    sharding.check_fsdp(cfg, rt)
    ckpt = resume.to_resume(cfg, rt)  # None: a new run
    if ckpt is not None:
        resume.check(cfg, ckpt, rt.master)  # what may change on resume
    init_model = load_model(cfg.init_from, report=rt.master) if cfg.init_from else None
    config = model_config(cfg, ckpt, init_model)
    max_batch = cfg.total_batch_size // (cfg.seq_len * rt.world_size)  # sequences per rank and step
    splits = ("train", "val") if cfg.eval_every else ("train",)
    train_shards, val_shards = (token_files.load_splits(cfg.data, splits) + [None])[:2]

    # --seed sets the initial weights (the same on every rank: FSDP shards each rank's copy), the
    # data order (DataLoader) and, through rank_seed below, each rank's own dropout stream
    torch.manual_seed(cfg.seed)
    model = (init_model or GPT(config)).to(rt.device)
    model.grad_checkpoint, model.dropout = bool(cfg.grad_checkpoint), cfg.dropout
    compile_model = runtime.use_compile(cfg.compile, rt)
    if cfg.fsdp:  # before the optimizer and the checkpoint load, which both work on the shards
        sharding.shard_model(model, rt, compile_model)
    batch_size = cfg.batch_size
    if batch_size == "auto":
        batch_size = memory.auto_batch_size(model, max_batch, cfg, rt)
    grad_accum = grad_accum_steps(cfg.total_batch_size, batch_size, cfg.seq_len, rt.world_size)
    # after --batch_size auto, whose trial steps on a GPU draw from its generator
    torch.manual_seed(runtime.rank_seed(cfg.seed, rt.rank))  # each rank its own stream
    loader = DataLoader(train_shards, batch_size, cfg.seq_len, rt.rank, rt.world_size,
                        token_files.data_shuffle(cfg), cfg.seed)
    # Muon orthogonalizes in bf16 where the hardware has it (as torch.optim.Muon always does), in
    # fp32 elsewhere: an AVX2 CPU emulates bf16 slowly, a GTX 960 has none
    ns_dtype = torch.bfloat16 if rt.dtype == "bf16" else torch.float32
    muon = dict(lr=cfg.muon_lr, momentum=cfg.muon_momentum, ns_dtype=ns_dtype)
    optimizer = configure_optimizer(model, cfg.max_lr, cfg.weight_decay, rt.device_type,
                                    muon if cfg.optimizer == "muon" else None)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 have fp32's exponent range
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "fp16")
    sync_once = sharding.fsdp_sync_once(cfg, model, rt, grad_accum) if cfg.fsdp else True
    s = TrainState(model, optimizer, scaler, loader, val_shards, batch_size, grad_accum,
                   compile_model, sync_once)
    if ckpt is not None:
        resume.restore(s, ckpt, cfg, rt)
    s.step = s.step or cfg.init_step  # --init_from: new AdamW moments, the schedule at --init_step
    return s


def wrap_model(model, cfg, rt, compile_model):
    """The model the training steps run: compiled, under torchrun in DDP (FSDP: `model` itself, its
    blocks sharded and compiled by shard_model), with `model`'s weights."""
    if compile_model:
        # Why compile: it fuses the elementwise work around the matmuls (casts, GELU, LayerNorm, the
        # softmax of the loss) into few kernels that read memory once, not one pass per operation
        torch._dynamo.config.suppress_errors = cfg.compile == "auto"  # no C++ compiler? eagerly
        model = model if cfg.fsdp else torch.compile(model)  # FSDP: each block is compiled
    if rt.ddp and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        # DDP averages the gradients over the ranks in backward, bucket by bucket, overlapped with
        # the rest of backward; gradient_as_bucket_view: the gradients live in the buckets
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None,
                    gradient_as_bucket_view=True)
    return model


# =============================================================================
# 6. Evaluation and sampling


@torch.no_grad()
def evaluate_loss(model, val_shards, n_tokens, batch_size, seq_len, rt, fsdp=False):
    """Mean cross-entropy over the fixed val set, split over the ranks and summed back."""
    loss_sum, count = 0.0, 0
    # the first n_tokens // seq_len sequences of the val split, the same at every evaluation
    batches = list(token_files.val_batches(val_shards, n_tokens, batch_size, seq_len, rt.rank,
                                           rt.world_size))
    if fsdp:  # each forward gathers weights from every rank: one with fewer batches runs idle ones
        idle = runtime.most_on_any_rank(len(batches), rt) - len(batches)
        batches += [(torch.zeros(1, seq_len, dtype=torch.long), None)] * idle
    with runtime.eval_mode(model):  # no dropout
        for x, y in batches:
            with rt.autocast():  # with targets: the training loss without its gradients
                _, loss = model(x.to(rt.device), None if y is None else y.to(rt.device))
            if y is not None:  # None: an idle forward, counted nowhere
                loss_sum += loss.item() * y.numel()
                count += y.numel()
    where = rt.device if rt.ddp else "cpu"  # float64 on the CPU unless ranks sum it (MPS: none)
    totals = torch.tensor([loss_sum, count], dtype=torch.float64, device=where)
    if rt.ddp:
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


# HellaSwag (Zellers et al. 2019), scored during training with --hellaswag_every: a context and 4
# endings, one of them right. The model's answer is the ending it finds least surprising: the lowest
# summed cross-entropy of its tokens (acc), or the lowest mean per token (acc_norm, which does not
# punish long endings): the GPT-2/GPT-3-era protocol. Each ending is scored after its context, all 4
# in one batch, right-padded (causal attention never looks ahead): hellaswag_eval.score.


class KVCache:
    """Keys and values of every token seen so far, per layer, so sampling feeds one new token a
    step."""

    def __init__(self, n_layer):
        self.kv = [None] * n_layer
        self.layer = 0  # which layer the next update() belongs to

    def __len__(self):
        return 0 if self.kv[0] is None else self.kv[0][0].size(2)

    def update(self, k, v):
        if self.kv[self.layer] is not None:  # the past's, then this one's: (B, nh, T_past + T, hs)
            k, v = (torch.cat([past, new], dim=2) for past, new in zip(self.kv[self.layer], (k, v)))
        self.kv[self.layer] = (k, v)
        self.layer = (self.layer + 1) % len(self.kv)
        return k, v


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
             use_cache=True):
    """Continues idx (B, T) by max_new_tokens tokens; temperature 0 is greedy. With the KV cache a
    new token costs one position's forward; a full block rebuilds the cache from the last
    block_size tokens, as recomputing would."""
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
        logits = logits[:, -1, :].float()  # (B, vocab): only the last position predicts the next
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
    tokens = enc.encode(prompt, allowed_special="all")
    if not tokens:
        raise errors.UserError("the prompt is empty; give some text to continue")
    idx = torch.tensor([tokens] * num_samples, dtype=torch.long, device=rt.device)  # (n, T)
    # its own generator: training's stays untouched
    gen = torch.Generator(device=rt.device).manual_seed(seed)
    with rt.autocast():
        out = generate(model, idx, max_new_tokens, temperature, top_k, gen)
    return [enc.decode(row) for row in out.tolist()]


# =============================================================================
# 7. Checking the flags against the model, and a trained model back from disk


def check_config(cfg, world_size):
    """The flags, before any device or process-group setup: a typo costs nothing, no rank starts
    NCCL/gloo to stop; the first problem wins."""
    train_flags.check(cfg)  # each flag's domain, and the pairs that exclude each other
    if not cfg.resume and not cfg.init_from:
        model_config(cfg)  # the shape flags (a resumed or fine-tuned model's: once it is read)
    batch_size = None if cfg.batch_size == "auto" else cfg.batch_size
    grad_accum_steps(cfg.total_batch_size, batch_size, cfg.seq_len, world_size)
    runlog.check_run_outputs(cfg)  # the prompt, the log directory, wandb: last, they read files


def model_config(cfg, ckpt=None, init_model=None):
    """The model shape: the checkpoint's (resuming), the weights' (fine-tuning) or the preset's."""
    if cfg.model not in PRESETS:
        raise errors.UserError(f"unknown --model {cfg.model!r}; choose one of {', '.join(PRESETS)}")
    shape = ("n_layer", "n_head", "n_embd")
    overrides = {k: getattr(cfg, k) for k in shape if getattr(cfg, k) is not None}
    config = GPTConfig(**{**PRESETS[cfg.model], **overrides})
    if ckpt is not None or init_model is not None:
        given = GPTConfig(**ckpt["config"]) if ckpt is not None else init_model.config
        if overrides and any(getattr(given, k) != v for k, v in overrides.items()):
            raise errors.UserError(f"the checkpoint holds a model of shape "
                                   f"{dataclasses.asdict(given)}, not the {overrides} asked for; "
                                   "drop the shape flags or start a new --log_dir")
        config = given
    if config.n_embd % config.n_head:
        raise errors.UserError(f"n_embd {config.n_embd} is not divisible by n_head "
                               f"{config.n_head}; change one of them")
    flags.check_seq_len(cfg.seq_len, config.block_size)
    return config


def model_from_checkpoint(ckpt, path="checkpoint"):
    """The GPT a checkpoint dict holds (checkpoints.load's, whatever program wrote the file)."""
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as e:
        raise errors.UserError(f"{path} does not hold a GPT-2 of this program "
                               f"({str(e).splitlines()[0]})") from None
    return model


def load_model(path_or_name, report=False):
    """A model from a checkpoint file (ours, build-nanogpt's, nanoGPT's, llm.c's) or Hugging Face
    GPT-2 weights (name or directory). report: say what was read."""
    if not os.path.isfile(path_or_name):
        return GPT.from_pretrained(path_or_name)
    ckpt = checkpoints.load(path_or_name)
    if report:
        print(formats.init_report(path_or_name, ckpt))
    return model_from_checkpoint(ckpt, path_or_name)


# =============================================================================
# 8. The command line: train (the default), sample, export, plot, evaluate


def train_main(argv):
    try:
        train(train_flags.parse(argv))
    finally:
        runtime.end_process_group()  # torchrun: the ranks leave the process group together


def sample_main(argv):
    args = commands.sample_args(argv, PRESETS)
    rt = runtime.setup(args.device, args.dtype)
    model, enc = load_model(args.checkpoint).to(rt.device), token_files.get_encoding()
    for prompt in commands.prompts(args):  # --prompt, or with --interactive each line of stdin
        texts = sample_texts(model, enc, prompt, args.num_samples, args.max_new_tokens, rt,
                             args.temperature, args.top_k, args.seed)
        print("".join(f"--- sample {i}\n{text}\n" for i, text in enumerate(texts)), end="",
              flush=True)


def export_main(argv):
    args = commands.export_args(argv)
    huggingface.export(load_model(args.checkpoint), args.out)


def evaluate_main(argv):
    args = commands.evaluate_args(argv, PRESETS)
    rt = runtime.setup(args.device, args.dtype)
    evaluate.run(load_model(args.checkpoint).to(rt.device), args, rt)


@errors.cli  # a mistake as one line and exit 2, a signal as its exit code, Ctrl-C before as 130
def main(argv):
    subcommands = {"sample": sample_main, "export": export_main, "evaluate": evaluate_main,
                   "plot": plot.main}
    if argv and argv[0] in subcommands:
        subcommands[argv[0]](argv[1:])
    else:
        train_main(argv)


if __name__ == "__main__":
    main()
