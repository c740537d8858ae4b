"""
--batch_size auto: the largest micro-batch that fits in memory, for training and the evaluations in
between (by trial on one GPU, by estimate on a CPU and under FSDP); and the out-of-memory line that
names the fixes."""

import os

import torch
import torch.distributed as dist

from plumbing import errors, sharding


def auto_batch_size(model, cfg, rt):
    """The largest micro-batch that fits on every rank and divides the sequences one rank processes
    per step: its training step, and evaluation and HellaSwag (--hellaswag_every) at the same batch,
    which run in between."""
    max_batch = cfg.total_batch_size // (cfg.seq_len * rt.world_size)  # sequences per rank, step
    hellaswag = bool(getattr(cfg, "hellaswag_every", 0))
    # compiled or eager (use_compile's rule; a GPU's trial runs eagerly, which keeps the more; under
    # FSDP the loss, in the root, runs eagerly)
    sharded = bool(getattr(cfg, "fsdp", 0))
    compiled = (cfg.compile == "on"
                or (cfg.compile == "auto" and rt.device_type == "cpu")) and not sharded
    # FSDP: the whole gradient and weights between micro-steps, or not (fsdp_sync_once; asked
    # without its report)
    fsdp = (rt.world_size, sharding.fsdp_sync_once(cfg, model, rt, 1)) if sharded else None
    batch_size = pick_batch_size(max_batch, lambda b: batch_fits(
        model, b, cfg.seq_len, rt, cfg.grad_checkpoint, compiled, hellaswag, fsdp))
    if rt.ddp:  # every rank must use the same: the smallest that fits everywhere
        agreed = torch.tensor(batch_size, device=rt.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        batch_size = int(agreed.item())
    return batch_size


def pick_batch_size(max_batch, fits):
    """The largest micro-batch that divides max_batch (so accumulation makes up the rest exactly),
    at most 64, for which fits(b) says it fits in memory."""
    for b in range(min(max_batch, 64), 0, -1):
        if max_batch % b == 0 and fits(b):
            return b
    raise errors.UserError("not even --batch_size 1 fits in memory; "
                           "use --grad_checkpoint 1, a smaller --seq_len or a smaller model")


# HellaSwag's longest row, context and ending (hellaswag.py's validation set: 166 tokens), and its
# rows per example
HELLASWAG_TOKENS, HELLASWAG_ROWS = 166, 4


# of the RAM available that the CPU estimate lets training use: the rest for what it misses
CPU_FREE_SHARE = 0.6


def activation_bytes_per_token(config, dtype, grad_checkpoint=False):
    """Rough training memory per token beyond weights and optimizer: 34*E bytes per layer in 16-bit
    with flash attention (Korthikanti et al. 2022, "Reducing Activation Recomputation", section 4),
    double in fp32; with checkpointing only each block's input (2*E) plus one block's activations;
    and the loss's fp32 gradient of the final hidden states (4*E). The logits are not kept per
    token: see loss_bytes."""
    scale = 1 if dtype in ("bf16", "fp16") else 2
    per_layer = 34 * config.n_embd * scale
    layers = (config.n_layer * 2 * config.n_embd * scale + per_layer if grad_checkpoint
              else config.n_layer * per_layer)
    return layers + 4 * config.n_embd


def inference_bytes_per_token(config, dtype):
    """Memory per token of a forward without gradients (evaluation, HellaSwag): nothing is kept for
    backward, so one block's activations at a time (as training's, 34*E in 16-bit) and the residual
    stream (fp32, 4*E)."""
    return 34 * config.n_embd * (1 if dtype in ("bf16", "fp16") else 2) + 4 * config.n_embd


def loss_bytes(model, n, dtype, device, grad=True, compiled=False):
    """What the loss of n rows holds at once beyond its inputs (GPT.loss_block_rows,
    ChunkedCrossEntropy), as tests/test_memory.py measures it: one block of rows x V fp32 logits 1.5
    times eager in 16-bit (once in fp32), twice compiled (the compiler's own buffers), twice without
    gradients (token_losses, whose blocks are NO_GRAD_BLOCK times the rows on a CPU); with gradients
    also the weight's fp32 gradient (V, C), its 16-bit product per block and, on a CPU, that
    product's fp32 copy to be added."""
    V, C = model.config.padded_vocab_size, model.config.n_embd
    half = dtype in ("bf16", "fp16")
    copies = (2.0 if compiled else 1.5 if half else 1.0) if grad else 2.0
    need = copies * model.loss_block_rows(n, device, grad) * V * 4
    if grad:
        need += V * C * (4 + (2 + (4 if torch.device(device).type == "cpu" else 0) if half else 0))
    return need


def state_bytes(model, dtype, fsdp=None):
    """(training, evaluation): the bytes a rank holds for the weights beyond its fp32 weights (in
    memory already). Training: the gradients (4 bytes a parameter) and AdamW's moments (8), and
    under autocast the 16-bit copies of the weights (2); evaluation in between: AdamW's moments and
    the copies (the gradients are freed). Under FSDP (fsdp = (ranks, sync_once), shard_model)
    gradients and moments are 1/ranks of that, and the weights are gathered (2 bytes a parameter in
    bf16, 4 in fp32): with sync_once the whole gradient (fp32) and the whole gathered model stay
    between micro-steps; without, the root unit (wte, lm_head, ln_f, wpe) and two blocks (one
    prefetched) are gathered at a time, and the root's and one block's fp32 gradients are whole
    until reduced."""
    P = model.num_params()
    if fsdp is None:
        casts = 2 * P if dtype in ("bf16", "fp16") else 0
        return 12 * P + casts, 8 * P + casts
    ranks, sync_once = fsdp
    # a DTensor counts as whole
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.transformer.h]
    root, block, g = P - sum(blocks), max(blocks), 2 if dtype == "bf16" else 4
    gathered = g * (root + 2 * block)
    train = 12 * P / ranks + ((4 + g) * P if sync_once else gathered + 4 * (root + block))
    return train, 8 * P / ranks + gathered


def memory_needs(model, b, seq_len, dtype, device, grad_checkpoint=False, compiled=False,
                 hellaswag=False, fsdp=None):
    """Bytes a micro-batch of b sequences needs on a rank beyond its weights (4 bytes a parameter,
    in memory already; under FSDP its shards), for what may run: training (state_bytes, the
    activations, the loss), evaluation at the same batch (state_bytes) and HellaSwag (4 rows of up
    to HELLASWAG_TOKENS per example, b examples per forward)."""
    config = model.config
    n = b * seq_len
    train_state, eval_state = state_bytes(model, dtype, fsdp)
    needs = {"train": train_state + n * activation_bytes_per_token(config, dtype, grad_checkpoint)
             + loss_bytes(model, n, dtype, device, True, compiled)}
    evaluations = {"eval": n}
    if hellaswag:
        evaluations["hellaswag"] = HELLASWAG_ROWS * b * min(config.block_size, HELLASWAG_TOKENS)
    for kind, tokens in evaluations.items():  # evaluation runs eagerly (the uncompiled model)
        needs[kind] = eval_state + tokens * inference_bytes_per_token(config, dtype) \
            + loss_bytes(model, tokens, dtype, device, False)
    return needs


def available_memory(rt):
    """RAM this process may use: MemAvailable (which counts the page cache that the kernel can
    reclaim, such as the memory-mapped shards), shared by the processes on this machine."""
    try:
        with open("/proc/meminfo") as f:
            free = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux: assume half of the RAM is free
        free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    return free // rt.local_world_size


def batch_fits(model, b, seq_len, rt, grad_checkpoint, compiled=False, hellaswag=False, fsdp=None):
    """Does a micro-batch of b sequences fit, for training and for the evaluations in between? On
    CUDA by trial (forward and backward, then the evaluations' forwards without gradients, plus room
    for the AdamW state that is not allocated yet); elsewhere, and under FSDP (fsdp = (ranks,
    sync_once): a trial that runs out of memory on one rank would leave the others waiting in its
    collectives), from memory_needs and the memory free."""
    n_params = model.num_params()
    if rt.device_type == "cuda" and fsdp is not None:
        # net of the shards, the CUDA context and other processes
        free, _ = torch.cuda.mem_get_info(rt.device)
        needs = memory_needs(model, b, seq_len, rt.dtype, rt.device, grad_checkpoint, False,
                             hellaswag, fsdp)
        return max(needs.values()) < free - cuda_margin(free, True)
    if rt.device_type == "cuda":
        torch.cuda.empty_cache()
        # net of the CUDA context and of other processes
        free, _ = torch.cuda.mem_get_info(rt.device)
        base = torch.cuda.memory_reserved(rt.device)  # the weights, already on the card
        torch.cuda.reset_peak_memory_stats(rt.device)
        shapes = [(b, seq_len)] + (
            [(HELLASWAG_ROWS * b, min(model.config.block_size, HELLASWAG_TOKENS))] if hellaswag
            else [])
        # the eager model: compiled training keeps fewer intermediates: this errs on the safe side
        try:
            x = torch.randint(0, model.config.vocab_size, (b, seq_len), device=rt.device)
            with rt.autocast():
                loss = model(x, x)[1]
            loss.backward()
            model.zero_grad(set_to_none=True)  # evaluation runs with the gradients freed
            with torch.no_grad(), rt.autocast():
                for shape in shapes:
                    x = torch.randint(0, model.config.vocab_size, shape, device=rt.device)
                    model(x, x)
            # reserved: the allocator's cache counts
            peak = torch.cuda.max_memory_reserved(rt.device) - base
        except torch.cuda.OutOfMemoryError:
            peak = float("inf")
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        return cuda_batch_fits(peak, n_params, free, rt.ddp)
    needs = memory_needs(model, b, seq_len, rt.dtype, rt.device, grad_checkpoint, compiled,
                         hellaswag, fsdp)
    return max(needs.values()) < CPU_FREE_SHARE * available_memory(rt)


def cuda_batch_fits(trial_peak, n_params, free, ddp):
    """Decides from a trial step's peak memory (gradients and activations, bytes reserved) whether
    training fits in `free` bytes of the card: plus AdamW's two fp32 moments (8 bytes per parameter,
    allocated at the first step), and a margin of 10% and 512 MiB for what a trial cannot see
    (NCCL's buffers under DDP, fragmentation, the optimizer's temporaries). DDP's buckets hold the
    gradients themselves (gradient_as_bucket_view)."""
    return trial_peak + 8 * n_params < free - cuda_margin(free, ddp)


def cuda_margin(free, ddp):
    """What a GPU's estimate leaves free: 10% and 512 MiB (twice under torchrun: NCCL's buffers)."""
    return 0.1 * free + (512 << 20) * (2 if ddp else 1)


def out_of_memory_error(step, s, cfg, rt):
    """The one-line error for an out-of-memory step, naming the fixes."""
    max_batch = cfg.total_batch_size // (cfg.seq_len * rt.world_size)
    smaller = next((f"--batch_size {b}, " for b in range(s.batch_size - 1, 0, -1)
                    if max_batch % b == 0), "")
    return errors.UserError(
        f"out of memory on {rt.device} at step {step} with --batch_size {s.batch_size} and "
        f"--seq_len {cfg.seq_len}; use {smaller}--grad_checkpoint 1 or a smaller --seq_len "
        "(gradient accumulation keeps --total_batch_size)")
