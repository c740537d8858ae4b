"""
Train GPT-2 from scratch, in a file that reads top to bottom as a lecture on pretraining:

    1. the model            GPT-2: token and position embeddings, a stack of transformer blocks, the output layer
    2. the optimizer        AdamW with the GPT-3 paper's settings
    3. the data             token shards cut into micro-batches, the same ones on any number of GPUs
    4. the schedule         linear warmup, then cosine decay of the learning rate
    5. the training loop    train() and train_step(): the whole of pretraining in ~150 lines
    6. evaluation           val loss, HellaSwag, and sampling text with a KV cache
    7. checks and loading   the flags against each other and the model's shape; a trained model from disk
    8. the command line     train (the default), sample, export, plot, evaluate
What real machines need and a reader can skip is in train_plumbing.py (device setup, reading token files, the log,
checkpoints, signals, FLOP counts, FSDP, downloads, Hugging Face weights, other programs' checkpoints); export,
plot, evaluate's report, the subcommands' flags and the --batch_size auto estimate in train_extras.py.

    python train_gpt2.py --data input.txt --n_layer 4 --n_head 4 --n_embd 128 ...      # laptop CPU
    python train_gpt2.py --data edu_fineweb10B                                       # one GPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py --data edu_fineweb10B     # 8 GPUs
    python train_gpt2.py sample --checkpoint log/model_19073.pt --prompt "Hello"     # also export, plot, evaluate
See docs/flags.md for every flag, README.md and docs/ for the rest.
"""

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import train_extras  # export, plot, evaluate's report, the subcommands' flags, the --batch_size auto estimate
# the plumbing: what pretraining needs on real machines, kept out of the lecture (its docstring lists what is where)
from train_plumbing import (DEVICES, DTYPES, Flag, FlagParser, RunLog, StopSignal, Stopped, UserError, agree_on_signal,
                            arg, autocast_dtype, check_fsdp, check_resume, check_run_outputs, check_seq_len,
                            check_train_flags, checkpoint_to_resume, cli, data_shuffle, end_process_group, eval_mode,
                            first_tokens, flops_per_token, fsdp_sync_once, get_encoding, hellaswag_totals, init_report,
                            keeps_signal_handlers, load_checkpoint, load_hellaswag, load_hf_weights, load_splits,
                            loss_block_budget, mfu_percent, most_on_any_rank, out_of_memory_error, peak_flops,
                            prune_checkpoints, rank_seed, read_hf_gpt2, restore_state, save_checkpoint, setup_runtime,
                            shard_model, shards_that_fill, use_compile)

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
        self.loss_block_bytes = None  # bytes of fp32 logits per block of the loss; None: loss_block_budget's

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
        loss = chunked_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), self.config.vocab_size,
                                     self.loss_block_rows(idx.numel(), idx.device, torch.is_grad_enabled()))
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
        """Hidden states (..., C) -> logits (..., padded_vocab), the padding's -inf: what sampling needs."""
        logits = self.lm_head(x)  # (..., padded_vocab)
        logits[..., self.config.vocab_size:] = float("-inf")  # padding rows are never a token (none: an empty slice)
        return logits

    def loss_block_rows(self, n, device="cpu", grad=True):
        """Rows per block of the loss for n rows in all: the largest power of two whose fp32 logits fit in the
        block's byte budget (loss_block_budget, larger without gradients), and at most 32 blocks (compiled, the loop
        over the blocks is unrolled; eager, each block is a dozen launches)."""
        budget = loss_block_budget(torch.device(device), grad, self.loss_block_bytes)
        rows = 1 << max(0, int(budget // (4 * self.config.padded_vocab_size)).bit_length() - 1)  # 2**floor(log2)
        return max(1, min(n, max(rows, -(-n // 32))))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied wte/lm_head counted once

    @classmethod
    def from_pretrained(cls, path_or_name):
        """OpenAI's GPT-2 (or any Hugging Face GPT-2): a hub name such as "gpt2", or a local directory."""
        shape, sd_hf = read_hf_gpt2(path_or_name, hub_names=PRESETS)  # Hugging Face's files (plumbing)
        model = cls(GPTConfig(**shape))
        load_hf_weights(model, sd_hf, path_or_name)  # their names and layout -> ours, the vocabulary padded
        return model


def chunked_cross_entropy(x, weight, targets, vocab_size, rows):
    """Mean cross-entropy of the logits x @ weight.T against targets, over the first vocab_size columns, `rows` rows
    at a time: F.cross_entropy((x @ weight.T)[:, :vocab_size].float(), targets) without ever holding all the logits.
    With gradients it is ChunkedCrossEntropy; without (evaluation) only the loss (token_losses): no gradient buffer."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        if x.device.type == "cpu" and autocast_dtype("cpu", weight.dtype) == torch.float32:
            return eager_chunked_cross_entropy(x, weight, targets, vocab_size, rows)  # fp32 on a CPU: see below
        return ChunkedCrossEntropy.apply(x, weight, targets, vocab_size, rows)
    return token_losses(x, weight, targets, vocab_size, rows).sum() / x.size(0)


@torch.compiler.disable
def eager_chunked_cross_entropy(x, weight, targets, vocab_size, rows):
    """ChunkedCrossEntropy, eager even when compiled. Why: fp32 on a CPU fuses no cast, and the compiled block copied
    the (V, C) gradient at each accumulation (quickstart step 834 -> 760 ms, AVX2); bf16 stays compiled (eager 1.6x)."""
    return ChunkedCrossEntropy.apply(x, weight, targets, vocab_size, rows)


def token_losses(x, weight, targets, vocab_size, rows):
    """The cross-entropy of each row (N,), fp32, without gradients: the plain way (the logits in fp32, the padding
    columns -inf, F.cross_entropy), `rows` rows at a time. A block holds its logits in fp32 and their log-softmax:
    2 fp32 copies (a slice of the real vocabulary instead of the mask would be copied again: 3)."""
    weight = weight.to(autocast_dtype(x.device.type, weight.dtype))  # (V, C), cast once, not in every block
    losses = []
    for i in range(0, x.size(0), rows):
        z = (x[i: i + rows] @ weight.t()).float()  # (n, V) fp32: in fp32 the product itself, in 16-bit its copy
        z[:, vocab_size:] = float("-inf")  # padding never counts
        losses.append(F.cross_entropy(z, targets[i: i + rows], reduction="none"))  # (n,)
    return torch.cat(losses) if losses else torch.zeros(0, device=x.device)


def exp_logits(xi, weight, yi, vocab_size):
    """One block of the loss with gradients: e = exp(logits - their row max), fp32 (n, V), with the padding columns
    0; each row's loss (n,); and the rows' sums of e, s (n, 1). In place: one fp32 (n, V) tensor holds the logits,
    then z - max, then e (the logits' own when they are fp32), so a block holds 1.5 fp32 copies at most."""
    # (n, V) fp32: the softmax is always taken in fp32 (under autocast a copy of the 16-bit product, freed at once)
    z = (xi @ weight.t()).float()
    # padding never counts. Compiled: a mask fused into the block's one pass, on an int32 column index (an int64
    # one costs twice the vector work: bf16 loss path 243 -> 201 ms). Eager: only the padding columns are written.
    if torch.compiler.is_compiling():
        z.masked_fill_(torch.arange(z.size(1), dtype=torch.int32, device=z.device) >= vocab_size, float("-inf"))
    else:
        z[:, vocab_size:] = float("-inf")
    # softmax(z) = e / sum(e) with e = exp(z - max): subtracting the max keeps exp from overflowing. Each exp is
    # taken once and e reused (on a CPU exp is the costliest step after the matmuls).
    m = z.amax(dim=1, keepdim=True)  # (n, 1)
    # loss of a row = -log softmax(z)[target] = log(s) + max - z[target]
    target = z.gather(1, yi)  # (n, 1)
    s = z.sub_(m).exp_().sum(dim=1, keepdim=True)  # z is now e; s (n, 1)
    return z, (s.log() + m - target).squeeze(1), s


class ChunkedCrossEntropy(torch.autograd.Function):
    """chunked_cross_entropy with gradients. Why: the (N, 50304) logits are the largest tensors of training: the
    plain way keeps them, in 16 and 32 bits, until backward, and then writes their gradient too. Here forward
    takes `rows` rows at a time and computes the block's loss and, at once, its share of the gradients of x and
    weight; so no logits outlive their block, and backward only scales the gradients by the incoming one
    (1/grad_accum, the fp16 loss scale). The same matmuls and casts as the plain way, no recomputation. A block
    is worked on in place (exp_logits), which autograd allows here: nothing inside a Function is recorded.
    Eager, a block holds at most 1.5 fp32 (rows, V) copies (1 in fp32), plus under autocast one 16-bit (V, C)
    product; compiled, the compiler plans the buffers (tests/test_model.py measures both)."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, rows):  # x (N, C), weight (V, C), targets (N,)
        loss = torch.zeros((), device=x.device)
        grad_x = torch.empty_like(x)  # (N, C)
        # The weight's gradient sums over all N rows: in fp32 whatever the weight's dtype (bf16 under FSDP's
        # policy), as a 16-bit sum of many blocks would lose the small ones.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # (V, C)
        dtype = autocast_dtype(x.device.type, weight.dtype)  # the matmuls' dtype
        for i in range(0, x.size(0), rows):
            xi, yi = x[i: i + rows], targets[i: i + rows, None]  # (n, C), (n, 1)
            e, row_losses, s = exp_logits(xi, weight, yi, vocab_size)
            loss = loss + row_losses.sum()
            # d(loss of a row)/d(its logits) = softmax - one_hot(target), in place in e. Not yet divided by N:
            # in fp16, p / N would underflow to 0 where the plain way multiplies by the loss scale first.
            e *= s.reciprocal()  # (n, V) p = softmax
            if torch.compiler.is_compiling():  # pointwise: fused with the cast, no fp32 (n, V) is written
                cols = torch.arange(e.size(1), dtype=torch.int32, device=e.device)  # int32: half the lanes of int64
                g = torch.where(cols == yi.int(), e - 1, e).to(dtype)  # (n, V)
            else:  # eager: in place (a pointwise op would allocate a mask and, on a CPU, its fp32 copy)
                g = e.scatter_add_(1, yi, torch.full(yi.shape, -1.0, device=e.device)).to(dtype)  # (n, V)
            del e  # a 16-bit g leaves 0.5 fp32 copies of the block during the matmuls
            grad_x[i: i + rows] = g @ weight  # (n, C)
            if g.dtype == grad_w.dtype and xi.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), xi)  # (V, C), no temporary
            else:
                grad_w += g.t() @ xi  # (V, C): a 16-bit product, summed in fp32
            del g  # before the next block's logits
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss / x.size(0)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss / grad_x.size(0)  # the mean's 1/N times 1/grad_accum (and the fp16 loss scale)
        return grad_x * scale, (grad_w * scale).to(ctx.weight_dtype), None, None, None


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
    # update: one kernel launch on CUDA, several times faster on CPU (bench/bench_train.py), same results.
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


# =============================================================================
# 3. The data: tokens on disk (read and checked by train_plumbing.load_splits) -> micro-batches of (x, y)


class DataLoader:
    """Micro-batches of B sequences of T tokens, read through the shards epoch after epoch. Each shard is cut
    into blocks of T tokens (plus the next one, for the targets); an epoch reads the shards, and each shard's
    blocks, in some order, B blocks per micro-batch (a shard's last < B blocks are skipped). Unshuffled, both orders
    are the file order and a micro-batch is B*T+1 consecutive tokens; with shuffle, epoch e permutes the shards and
    their blocks with generators seeded by (seed, e) alone: documents mix, reads stay in one shard at a time (as
    memory-mapped shards want), and the order never depends on the world size. Micro-batch j goes to rank
    j % world_size, so N ranks with A accumulation steps see exactly what one process with N*A steps sees, and
    the position (epoch, shard, pos), the same on every rank, resumes on any number of ranks."""

    def __init__(self, shards, B, T, rank=0, world_size=1, shuffle=False, seed=0):
        self.shards = shards_that_fill(shards, B * T + 1, rank)  # fineweb.py's last shard may be shorter: skipped
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.shard, self.pos = 0, 0, 0  # pos: tokens of the shard read, T per block
        self._cached = (None, None)  # ((epoch, shard), block order): the blocks of the current shard

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "pos": self.pos, "shuffle": int(self.shuffle),
                "seed": self.seed}

    def load_state_dict(self, state):
        # a checkpoint from before shuffling holds only shard and pos: it continues in file order
        self.shard, self.pos, self.epoch = int(state["shard"]), int(state["pos"]), int(state.get("epoch", 0))
        self.shuffle, self.seed = bool(state.get("shuffle", 0)), int(state.get("seed", 0))

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
    """The fixed val set: the first n_tokens // T sequences of the val split, the same at every evaluation and for
    any world size; sequence i is evaluated on rank i % world_size."""
    tokens = first_tokens(shards, n_tokens + 1)
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
    """Micro-steps per optimizer step so that all ranks together process total_batch_size tokens. batch_size None
    (--batch_size auto, not chosen yet) checks that whole sequences fill the step."""
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


@dataclass
class TrainConfig:
    """Every flag of `python train_gpt2.py`, with what it accepts (its Flag, checked by check_config before any
    device setup); the defaults are GPT-2 124M on 10B tokens of FineWeb-Edu."""
    data: str = arg("input.txt", Flag(path="exists", hint="; give a text file or a directory of .npy shards"),
                    "a text file (last 10%% is val) or a directory of uint16 .npy shards from fineweb.py")
    log_dir: str = arg("log", Flag(path="out_dir"), "where log.txt and the model_<step>.pt checkpoints go")
    model: str = arg("gpt2", Flag(choices=tuple(PRESETS)), "model shape preset: " + ", ".join(PRESETS))
    n_layer: int = arg(None, Flag(int, lo=1), "number of layers (overrides the preset)")
    n_head: int = arg(None, Flag(int, lo=1), "number of attention heads (overrides the preset)")
    n_embd: int = arg(None, Flag(int, lo=1), "embedding width (overrides the preset)")
    init_from: str = arg(None, Flag(path="exists", also=tuple(PRESETS), hint="; give a checkpoint, a Hugging Face "
                                    "GPT-2 directory or one of " + ", ".join(PRESETS)),
                         "start from these weights: a Hugging Face GPT-2 name/directory or a checkpoint "
                         "(ours, build-nanogpt's, nanoGPT's or llm.c's), with a new optimizer")
    init_step: int = arg(0, Flag(int, lo=0), "with --init_from: start at this step of the learning-rate schedule "
                         "(e.g. the checkpoint's, to finish its run with its --max_steps and --warmup_steps)")
    resume: str = arg(None, Flag(path="file", also=("auto",), hint="; give a checkpoint file, or auto"),
                      "'auto': continue from the newest valid checkpoint in --log_dir; or a checkpoint path")
    # batch: the GPT-3 paper's 124M ("Small") recipe uses 0.5M tokens per optimizer step
    total_batch_size: int = arg(524288, Flag(int, lo=1), "tokens per optimizer step, all ranks and micro-steps (2**19)")
    batch_size: int | str = arg(16, Flag(int, lo=1, also=("auto",)), "sequences per micro-step on each rank, or "
                                "'auto': the largest that fits in memory (gradient accumulation makes up the rest)")
    seq_len: int = arg(1024, Flag(int, lo=1), "tokens per sequence, at most the model's block size")
    # optimizer and schedule: GPT-3 paper, appendix B; step counts from the 10B-token reproduction
    max_lr: float = arg(6e-4, Flag(float, lo=0, lo_open=True), "peak learning rate, reached after warmup")
    min_lr_ratio: float = arg(0.1, Flag(float, lo=0, hi=1), "the cosine decays to max_lr * min_lr_ratio at max_steps")
    warmup_steps: int = arg(715, Flag(int, lo=0), "linear warmup steps (375M tokens / 2**19)")
    max_steps: int = arg(19073, Flag(int, lo=1), "optimizer steps in all (10B tokens / 2**19: sample-10BT once)")
    weight_decay: float = arg(0.1, Flag(float, lo=0), "AdamW weight decay on 2-D tensors")
    grad_clip: float = arg(1.0, Flag(float, lo=0), "clip the global gradient norm to this (0 = no clipping)")
    grad_checkpoint: int = arg(0, Flag(int, lo=0, hi=1), "1: recompute blocks in backward (less memory, ~30%% slower)")
    dropout: float = arg(0.0, Flag(float, lo=0, hi=1, hi_open=True, hint="; GPT-2 used 0.1"), "dropout on the "
                         "embeddings, attention weights, residual branches (GPT-2's config: 0.1; 0 on plenty of data)")
    # machine
    device: str = arg("auto", Flag(choices=DEVICES), "auto, cpu, cuda or mps")
    dtype: str = arg("auto", Flag(choices=DTYPES), "auto (bf16 where native, fp16 on older GPUs, else fp32) or one")
    compile: str = arg("auto", Flag(choices=("auto", "on", "off")), "torch.compile the model: on, off, or auto (on "
                       "for CUDA and CPU, falling back to eager if compilation fails)")
    seed: int = arg(1337, Flag(int, lo=0, hi=2**32 - 1), "random seed (model init, data order, dropout, sampling)")
    dist_timeout: int = arg(60, Flag(int, lo=1, hi=525600), "minutes (at most a year) a rank waits in a collective "
                            "(e.g. while rank 0 writes a checkpoint) before NCCL/gloo abort the job")
    # periodic work, in optimizer steps
    eval_every: int = arg(250, Flag(int, lo=0), "val loss every this many steps (0 = off)")
    val_tokens: int = arg(20 * 65536, Flag(int, lo=1), "val tokens per evaluation: always the val split's first")
    sample_every: int = arg(250, Flag(int, lo=0), "print samples every this many steps (0 = off)")
    prompt: str = arg("Hello, I'm a language model,", Flag(empty=True), "prompt of the samples during training")
    hellaswag_every: int = arg(0, Flag(int, lo=0), "HellaSwag accuracy every this many steps (0 = off)")
    hellaswag_data: str = arg(None, Flag(path="file", hint="; give a HellaSwag .jsonl, or drop the flag to download "
                                         "the official file"),
                              "local hellaswag_val.jsonl; None: download the official file once")
    hellaswag_limit: int = arg(0, Flag(int, lo=0), "score only the first N HellaSwag examples (0 = all 10,042)")
    checkpoint_every: int = arg(5000, Flag(int, lo=0), "model_<step>.pt every this many steps and at the end (0 = off)")
    keep_checkpoints: int = arg(0, Flag(int, lo=0), "keep only the newest K model_*.pt (and the newest one known to "
                                "give a finite loss), deleting older ones once a newer one is written (0 = keep all)")
    shuffle: int = arg(None, Flag(int, lo=0, hi=1), "1: a new seeded order of the shards, and of T-token blocks "
                       "within them, every epoch; 0: file order; None: 1 for a shard directory, 0 for a text file, "
                       "and a resumed run keeps its checkpoint's")
    wandb_project: str = arg(None, Flag(), "also log to this Weights & Biases project, from rank 0 (pip install "
                             "wandb; WANDB_MODE=offline: no network); a resumed run continues its W&B run")
    fsdp: int = arg(0, Flag(int, lo=0, hi=1), "1: shard weights, gradients and AdamW state over the ranks "
                    "(FSDP2), not a full copy on each (DDP); checkpoints move freely between FSDP, DDP, one process")
    fsdp_sync: str = arg("auto", Flag(choices=("auto", "step", "micro")), "--fsdp 1 with gradient accumulation: "
                         "'step' reduces the gradients once per optimizer step (each rank holds the whole gradient and "
                         "weights meanwhile), 'micro' in every micro-step (only shards, more communication); auto: "
                         "step where that fits (docs/scale.md)")


@keeps_signal_handlers  # a caller's Ctrl-C handler is back when train() returns or raises
def train(cfg):
    """Pretraining, in outline: set up the machine; build (or restore) the model, optimizer and data; wrap the
    model for speed; then loop: every so often evaluate, sample and checkpoint, and every time one step."""
    rt = setup_runtime(cfg.device, cfg.dtype, check=lambda world_size: check_config(cfg, world_size),
                       dist_timeout=cfg.dist_timeout)
    s = build_state(cfg, rt)  # what training starts from: new, or a checkpoint's step, weights, data position
    # The model's two roles: train_model runs the training steps (compiled; DDP- or FSDP-wrapped); s.model, the
    # same weights, evaluates, samples and is saved, always eagerly (see the periodic work below)
    train_model = wrap_model(s.model, cfg, rt, s.compile)
    log = RunLog(cfg, rt, s)  # log.txt, W&B, the console (rank 0)
    hella = load_hellaswag(cfg, rt) if cfg.hellaswag_every else None
    enc = get_encoding() if cfg.sample_every or hella else None
    flops, peak = flops_per_token(s.model.config, cfg.seq_len), peak_flops(rt)  # for MFU
    stop = StopSignal(rt.ddp)  # SIGTERM/SIGINT (preemption, Ctrl-C): finish the step, checkpoint, exit
    stop_for, new_ckpt = 0, None  # the signal every rank stops for (0: none); the newest checkpoint written
    step_times = []  # seconds of the recent optimizer steps (evaluation excluded), for the time left

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
            raise Stopped(stop_for)

        periodic_work(s, cfg, rt, log, hella, enc, step, last)  # val loss, HellaSwag, samples: every rank
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
            loss, norm = train_step(train_model, s.optimizer, s.scaler, s.loader, s.grad_accum, lr, cfg.grad_clip, rt,
                                    cfg.fsdp, s.sync_once)
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
        mfu, peak = mfu_percent(tok_s, flops, peak, rt)  # a CPU's peak is measured again if this beats it
        step_times = step_times[-19:] + [dt] if step > s.step else []  # the first one compiles: not counted
        log.step(step, loss, lr, norm.item(), dt, tok_s, mfu, step_times, cfg.max_steps)


def periodic_work(s, cfg, rt, log, hella, enc, step, last):
    """Every so often, and after the last step: the val loss, HellaSwag, samples. On s.model (no DDP hooks), on
    every rank."""
    # Eagerly: under FSDP the blocks of s.model are compiled in place (shard_model), and evaluation's other
    # shapes (val batches, HellaSwag's row lengths, the KV cache's growing context) would compile them again
    # and again; force_eager runs compiled code as plain Python, leaving the training graphs untouched.
    with torch.compiler.set_stance("force_eager"):
        if cfg.eval_every and (step % cfg.eval_every == 0 or last):
            # the loss on text never trained on: falling train loss alone could be memorization
            val_loss = evaluate_loss(s.model, s.val_shards, cfg.val_tokens, s.batch_size, cfg.seq_len, rt, cfg.fsdp)
            log(f"{step} val {val_loss:.6f}", f"step {step:5d} | val loss {val_loss:.6f}")
        if hella is not None and (step % cfg.hellaswag_every == 0 or last):
            acc = accuracies(hellaswag_totals(score, s.model, hella, enc, s.batch_size, rt, cfg.fsdp))
            log(f"{step} hella {acc['acc_norm']:.6f}",
                f"step {step:5d} | hellaswag acc_norm {acc['acc_norm']:.4f} ({acc['n']} examples)")
        # under FSDP every rank samples (the same texts): each forward needs the shards of all of them
        if cfg.sample_every and (rt.master or cfg.fsdp) and step > 0 and (step % cfg.sample_every == 0 or last):
            for i, text in enumerate(sample_texts(s.model, enc, cfg.prompt, 4, 32, rt, seed=cfg.seed + step)):
                log.print(f"sample {i}: {text!r}")


def train_step(model, optimizer, scaler, loader, grad_accum, lr, grad_clip, rt, fsdp=False, sync_once=True):
    """One optimizer step: grad_accum micro-steps on every rank, gradients averaged at the end (FSDP without
    sync_once: in every micro-step). Returns the mean loss (a tensor, for the log) and the norm before clipping."""
    model.train()
    loss_accum = torch.zeros((), device=rt.device)
    for micro in range(grad_accum):
        x, y = loader.next_batch()
        if rt.device_type == "cuda":  # page-locked host memory lets the copy overlap with GPU work
            x, y = x.pin_memory().to(rt.device, non_blocking=True), y.pin_memory().to(rt.device, non_blocking=True)
        else:
            x, y = x.to(rt.device), y.to(rt.device)
        # DDP all-reduces gradients in backward(); only the last micro-step needs to, so the others skip it
        # (no_sync) and their gradients just add up locally. FSDP likewise with sync_once (fsdp_sync_once says
        # when): until the last backward each rank keeps the whole gradient, in fp32, and the gathered weights
        # (no reduce-scatter, and no all-gather again in the next forward); without it every backward
        # reduce-scatters and frees, so that each rank only ever holds shards.
        last = micro == grad_accum - 1
        if fsdp:
            model.set_requires_gradient_sync(last or not sync_once)
            model.set_reshard_after_backward(last or not sync_once)
        sync = model.no_sync() if rt.ddp and not fsdp and not last else contextlib.nullcontext()
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
    sync_once: bool = True  # FSDP: gradients reduced once per optimizer step, not every micro-step
    step: int = 0  # optimizer steps already taken: where the loop starts
    last_good: str = None  # the newest checkpoint known to give a finite loss (never pruned)
    wandb_id: str = None  # the W&B run a resumed run continues


def build_state(cfg, rt):
    """The model, optimizer and data that training starts from: new (seeded by --seed), weights to fine-tune
    (--init_from), or a whole training state to continue (--resume: also the step, data position, random state)."""
    check_fsdp(cfg, rt)
    ckpt = checkpoint_to_resume(cfg, rt)  # None: a new run
    if ckpt is not None:
        check_resume(cfg, ckpt, rt.master)  # the flags against the checkpoint's: what may change on resume
    init_model = load_model(cfg.init_from, report=rt.master) if cfg.init_from else None
    config = model_config(cfg, ckpt, init_model)
    max_batch = cfg.total_batch_size // (cfg.seq_len * rt.world_size)  # sequences per rank and optimizer step
    train_shards, val_shards = (load_splits(cfg.data) if cfg.eval_every else load_splits(cfg.data, ("train",)) + [None])

    # --seed sets the initial weights (the same on every rank: FSDP shards each rank's copy), the data order
    # (DataLoader) and, through rank_seed below, each rank's own dropout stream
    torch.manual_seed(cfg.seed)
    model = (init_model or GPT(config)).to(rt.device)
    model.grad_checkpoint, model.dropout = bool(cfg.grad_checkpoint), cfg.dropout
    compile_model = use_compile(cfg.compile, rt)
    if cfg.fsdp:  # before the optimizer and the checkpoint load, which both work on the shards
        shard_model(model, rt, compile_model)
    batch_size = train_extras.auto_batch_size(model, max_batch, cfg, rt) if cfg.batch_size == "auto" else cfg.batch_size
    grad_accum = grad_accum_steps(cfg.total_batch_size, batch_size, cfg.seq_len, rt.world_size)
    # after --batch_size auto, whose trial steps on a GPU draw from its generator: the stream starts here
    torch.manual_seed(rank_seed(cfg.seed, rt.rank))  # each rank its own stream, on the CPU and its GPU
    loader = DataLoader(train_shards, batch_size, cfg.seq_len, rt.rank, rt.world_size, data_shuffle(cfg), cfg.seed)
    optimizer = configure_optimizer(model, cfg.max_lr, cfg.weight_decay, rt.device_type)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 have fp32's exponent range and need none
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "fp16")
    s = TrainState(model, optimizer, scaler, loader, val_shards, batch_size, grad_accum, compile_model,
                   sync_once=fsdp_sync_once(cfg, model, rt, grad_accum) if cfg.fsdp else True)
    if ckpt is not None:
        restore_state(s, ckpt, cfg, rt)
    s.step = s.step or cfg.init_step  # --init_from: new AdamW moments, the schedule where --init_step says
    return s


def wrap_model(model, cfg, rt, compile_model):
    """The model the training steps run: compiled, under torchrun wrapped in DDP (FSDP: `model` itself, its blocks
    sharded and compiled by shard_model). Its weights are `model`'s, which evaluation and sampling run eagerly."""
    if compile_model:
        # Why compile: it fuses the elementwise work around the matmuls (casts, GELU, LayerNorm, the softmax of
        # the loss) into few kernels that read memory once, instead of one kernel and one pass per operation
        torch._dynamo.config.suppress_errors = cfg.compile == "auto"  # auto: no C++ compiler? run eagerly
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
    loss_sum, count = 0.0, 0
    batches = list(val_batches(val_shards, n_tokens, batch_size, seq_len, rt.rank, rt.world_size))
    if fsdp:  # each forward gathers weights from every rank: a rank with fewer batches runs idle ones
        idle = most_on_any_rank(len(batches), rt) - len(batches)
        batches += [(torch.zeros(1, seq_len, dtype=torch.long), None)] * idle
    with eval_mode(model):  # no dropout
        for x, y in batches:
            with rt.autocast():  # with targets: the training loss without its gradients, in blocks
                _, loss = model(x.to(rt.device), None if y is None else y.to(rt.device))
            if y is not None:  # None: an idle forward, counted nowhere
                loss_sum += loss.item() * y.numel()
                count += y.numel()
    totals = torch.tensor([loss_sum, count], dtype=torch.float64, device=rt.device if rt.ddp else "cpu")
    if rt.ddp:
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


# HellaSwag (Zellers et al. 2019): a context and 4 endings, of which one is right. The model's answer is the ending
# it finds least surprising: the lowest summed cross-entropy of the ending's tokens (acc), or the lowest mean per
# token (acc_norm, which does not punish long endings): the GPT-2/GPT-3-era protocol. The download is plumbing.


def render_example(example, enc):
    """(context tokens, [tokens of each of the 4 endings], label). The leading space makes the ending's first
    word tokenize as it would mid-sentence, as in the GPT-2/GPT-3 evaluations."""
    ctx = enc.encode(example["ctx"])
    endings = [enc.encode(" " + e) for e in example["endings"]]
    return ctx, endings, example["label"]


@torch.no_grad()
def ending_losses(model, rendered, device="cpu", batch_size=16, autocast=contextlib.nullcontext, progress=False):
    """Summed cross-entropy of each ending and its token count: two (n, 4) tensors, in `rendered` order, from a model
    in eval mode (score() sees to it). A row is context + ending; rows over block_size lose tokens from the LEFT, so
    the whole ending is kept (one that fills the block alone has its first, context-less token unscored). Real
    HellaSwag (<= 166 tokens) is never truncated."""
    from tqdm import tqdm

    block_size = model.config.block_size
    rows = [[((ctx + end)[-block_size:], min(len(end), len((ctx + end)[-block_size:]) - 1)) for end in endings]
            for ctx, endings, _ in rendered]  # per example: 4 x (tokens, number of ending tokens scored)
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory shows up at once.
    order = sorted(range(len(rows)), key=lambda i: -max(len(t) for t, _ in rows[i]))
    total, count = torch.zeros(len(rows), 4, dtype=torch.float64), torch.zeros(len(rows), 4, dtype=torch.long)
    bar = tqdm(total=len(rows), desc="hellaswag", unit="ex", file=sys.stderr, disable=not progress)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        batch = [r for i in idx for r in rows[i]]  # 4 rows per example, all in one forward
        T = max(len(t) for t, _ in batch)
        # Right padding: with causal attention a position only sees positions before it, so the pad
        # tokens after a row's end cannot change its logits; they are also left out of the loss.
        x, y = torch.zeros(2, len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.bool)  # True where logits[t] predicts an ending token
        for r, (toks, n_end) in enumerate(batch):
            x[r, :len(toks)] = torch.tensor(toks)
            y[r, :len(toks) - 1] = torch.tensor(toks[1:])  # logits at t predict token t+1
            mask[r, len(toks) - 1 - n_end:len(toks) - 1] = True
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        with autocast():
            # Only the ending positions need the output layer: the hidden states of the others are dropped
            # before it, which saves most of the largest matmul and all of its (rows, T, vocab) logits.
            h = model.features(x)[mask]  # (ending tokens, C)
            # the training loss's blocks, so that no batch holds all its ending tokens' logits
            tok_loss = token_losses(h, model.lm_head.weight, y[mask], model.config.vocab_size,
                                    model.loss_block_rows(len(h), device, grad=False))  # (ending tokens,)
        losses = torch.zeros(mask.shape, device=device)
        losses[mask] = tok_loss  # scatter back, then sum each row: a fixed order, so deterministic
        total[idx] = losses.cpu().double().sum(1).view(-1, 4)  # float64 on the CPU: MPS has no float64
        count[idx] = mask.sum(1).view(-1, 4).cpu()
        bar.update(len(idx))
    bar.close()
    return total, count


def score(model, examples, enc, device="cpu", batch_size=16, autocast=contextlib.nullcontext,
          rank=0, world_size=1, progress=False):
    """Count right answers on this rank's share of the examples, examples[rank::world_size], `batch_size` examples
    (x 4 endings) per forward; `autocast` returns a context manager (e.g. bf16 autocast). Returns {n, correct,
    correct_norm}: sum these over ranks, then call accuracies()."""
    mine = examples[rank::world_size]
    rendered = [render_example(e, enc) for e in mine]
    with eval_mode(model):  # no dropout in scoring
        total, count = ending_losses(model, rendered, device, batch_size, autocast, progress)
    labels = torch.tensor([label for _, _, label in rendered], dtype=torch.long)
    return dict(n=len(mine), correct=int((total.argmin(1) == labels).sum()),
                correct_norm=int(((total / count.clamp(min=1)).argmin(1) == labels).sum()))


def accuracies(counts):
    """{n, correct, correct_norm} (summed over ranks) -> {n, acc, acc_norm}."""
    n = int(counts["n"])
    return dict(n=n, acc=int(counts["correct"]) / max(n, 1), acc_norm=int(counts["correct_norm"]) / max(n, 1))


class KVCache:
    """Keys and values of every token seen so far, per layer, so sampling feeds one new token per step."""

    def __init__(self, n_layer):
        self.kv = [None] * n_layer
        self.layer = 0  # which layer the next update() belongs to

    def __len__(self):
        return 0 if self.kv[0] is None else self.kv[0][0].size(2)

    def update(self, k, v):
        if self.kv[self.layer] is not None:  # the past's keys and values, then this token's: (B, nh, T_past + T, hs)
            k, v = (torch.cat([past, new], dim=2) for past, new in zip(self.kv[self.layer], (k, v)))
        self.kv[self.layer] = (k, v)
        self.layer = (self.layer + 1) % len(self.kv)
        return k, v


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
    """Continues idx (B, T) by max_new_tokens tokens; temperature 0 is greedy. With the KV cache a new token costs one
    position's forward; a full block rebuilds the cache from the last block_size tokens, as recomputing would."""
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
    """num_samples continuations of prompt, as text, from a seeded generator of their own."""
    tokens = enc.encode(prompt, allowed_special="all")
    if not tokens:
        raise UserError("the prompt is empty; give some text to continue")
    idx = torch.tensor([tokens] * num_samples, dtype=torch.long, device=rt.device)  # (num_samples, T)
    gen = torch.Generator(device=rt.device).manual_seed(seed)  # its own generator: training's stays untouched
    with rt.autocast():
        out = generate(model, idx, max_new_tokens, temperature, top_k, gen)
    return [enc.decode(row) for row in out.tolist()]


# =============================================================================
# 7. Checking the flags, and a trained model back from disk (the plumbing is in train_plumbing.py)


def check_config(cfg, world_size):
    """Every flag against what it accepts (its Flag in TrainConfig), then the flags against each other, before any
    device or process-group setup: a typo costs nothing, no rank starts NCCL/gloo to stop; the first problem wins."""
    check_train_flags(cfg, {f.name: f.metadata["flag"] for f in dataclasses.fields(TrainConfig)})  # plumbing
    if not cfg.resume and not cfg.init_from:
        model_config(cfg)  # the shape flags (a resumed or fine-tuned model's shape is checked once it is read)
    grad_accum_steps(cfg.total_batch_size, None if cfg.batch_size == "auto" else cfg.batch_size, cfg.seq_len,
                     world_size)
    check_run_outputs(cfg)  # the prompt, the log directory, wandb: last, as they load and read files


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
    check_seq_len(cfg.seq_len, config.block_size)
    return config


def model_from_checkpoint(ckpt, path="checkpoint"):
    """The GPT a checkpoint dict holds (load_checkpoint's, whatever program wrote the file)."""
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as e:
        raise UserError(f"{path} does not hold a GPT-2 of this program ({str(e).splitlines()[0]})") from None
    return model


def load_model(path_or_name, report=False):
    """A model from a checkpoint file (ours, build-nanogpt's, nanoGPT's or llm.c's: load_checkpoint tells them apart
    by content) or Hugging Face GPT-2 weights (name or directory). report: say what was read (--init_from)."""
    if not os.path.isfile(path_or_name):
        return GPT.from_pretrained(path_or_name)
    ckpt = load_checkpoint(path_or_name)
    if report:
        print(init_report(path_or_name, ckpt))
    return model_from_checkpoint(ckpt, path_or_name)


# =============================================================================
# 8. The command line: train (the default), sample, export, plot


def train_main(argv):
    cfg = FlagParser.dataclass(TrainConfig, argv, prog="train_gpt2.py", description="Train GPT-2. Subcommands: "
                               "sample, export, plot, evaluate (python train_gpt2.py sample --help).")
    try:
        train(cfg)
    finally:
        end_process_group()  # torchrun: the ranks leave the process group together


def sample_main(argv):
    args = train_extras.sample_args(argv, PRESETS)  # the flags of each subcommand are train_extras.py's
    rt = setup_runtime(args.device, args.dtype)
    model, enc = load_model(args.checkpoint).to(rt.device), get_encoding()
    for prompt in train_extras.prompts(args):  # --prompt, or with --interactive each line of stdin
        texts = sample_texts(model, enc, prompt, args.num_samples, args.max_new_tokens, rt, args.temperature,
                             args.top_k, args.seed)
        print("".join(f"--- sample {i}\n{text}\n" for i, text in enumerate(texts)), end="", flush=True)


def export_main(argv):
    args = train_extras.export_args(argv)
    train_extras.export(model_from_checkpoint(load_checkpoint(args.checkpoint), args.checkpoint), args.out)


def evaluate_main(argv):
    args = train_extras.evaluate_args(argv, PRESETS)
    rt = setup_runtime(args.device, args.dtype)
    train_extras.evaluate(load_model(args.checkpoint).to(rt.device), args, rt)


@cli  # a mistake as one line and exit code 2, a signal as its exit code, Ctrl-C before training as 130
def main(argv):
    commands = {"sample": sample_main, "export": export_main, "evaluate": evaluate_main,
                "plot": train_extras.plot_main}  # export, plot, evaluate: the work is train_extras.py's
    if argv and argv[0] in commands:
        commands[argv[0]](argv[1:])
    else:
        train_main(argv)


if __name__ == "__main__":
    main()
