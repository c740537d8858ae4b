"""
--fsdp 1: the model sharded over the ranks with FSDP2 (each of N ranks keeps 1/N of the weights,
gradients and AdamW state), in torchtitan's order: activation checkpointing, then compile, then
sharding."""

import contextlib

import torch

from plumbing import compiling, errors, runtime


def check_fsdp(cfg, rt):
    """--fsdp against the runtime that runtime.setup chose (world and dtype)."""
    if cfg.fsdp and not rt.ddp:
        raise errors.UserError("--fsdp 1 shards over the ranks that torchrun starts: launch with "
                               "torchrun --nproc_per_node=N (in one process, leave --fsdp off)")
    if cfg.fsdp and rt.dtype == "fp16":
        raise errors.UserError("--fsdp 1 trains in bf16 or fp32, not fp16 (no loss scaling for "
                               "shards here); use --dtype fp32, or DDP")
    if cfg.fsdp and runtime.torch_version() < (2, 6):
        raise errors.UserError("--fsdp 1 needs PyTorch 2.6 or newer (FSDP2's fully_shard), this is "
                               f"{torch.__version__}; pip install -U torch (requirements.txt)")


def shard_model(model, rt, compile_blocks):
    """--fsdp 1: shards the model in place over the ranks. Each block is one FSDP unit: its weights
    are all-gathered just before its forward (and again in backward) and freed after, so only about
    one block is ever whole. The root unit holds the rest, among them wte and lm_head: one tied
    matrix, which must live in one unit to stay one tensor. On bf16 hardware the gathered weights
    are bf16 for compute, while the shards (the master weights AdamW updates) and the gradient
    reduction stay fp32.

    Each block in torchtitan's order: activation checkpointing (--grad_checkpoint) innermost,
    compiled around it (one graph that every layer reuses), and FSDP's communication outside the
    compiled code. The blocks compiled in place are what evaluation calls too: train() runs it under
    torch.compiler.set_stance ("force_eager"), so that its other shapes never meet the compiled
    code."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if rt.dtype == "bf16" else MixedPrecisionPolicy())
    # the loss stays eager here: the root unit is not compiled
    compiling.compile_blocks(model, compile_blocks, loss=False)
    for block in model.transformer.h:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    assert model.transformer.wte.weight is model.lm_head.weight  # still tied


def fsdp_sync_once(cfg, model, rt, grad_accum):
    """--fsdp_sync: whether FSDP reduces the gradients once per optimizer step (True), as DDP does,
    or in every micro-step. Once saves grad_accum - 1 reduce-scatters and as many all-gathers of the
    whole model per step; it costs each rank, between the micro-steps, the whole gradient in fp32
    and the gathered weights (4 + 2 bytes per parameter in bf16, 4 + 4 in fp32; AdamW's state and
    the master weights stay sharded). auto: once where that is at most a quarter of the GPU's
    memory, the rest left for activations (GPT-2 124M in bf16: 0.7 GB; gpt2-xl: 9.4 GB, so every
    micro-step on 24 GB cards), and always on a CPU."""
    n = sum(p.numel() for p in model.parameters())  # a DTensor's numel() is the whole tensor's
    need = n * (4 + (2 if rt.dtype == "bf16" else 4))
    once = cfg.fsdp_sync == "step" or (cfg.fsdp_sync == "auto" and (
        rt.device_type != "cuda"
        or need <= torch.cuda.get_device_properties(rt.device).total_memory / 4))
    if rt.master and grad_accum > 1:
        print("fsdp: gradients reduced "
              f"{'once per optimizer step' if once else 'in every micro-step'} "
              f"(--fsdp_sync {cfg.fsdp_sync}; whole gradient and weights per rank: "
              f"{need / 2**30:.2f} GiB)")
    return once


@contextlib.contextmanager
def gathered_root(model, rt, fsdp):
    """Under FSDP, the root unit's weights (wte/lm_head, ln_f) whole for the duration."""
    if fsdp:
        # FSDP sets itself up in the first forward(), which a resumed run may not have had
        with torch.no_grad():
            model(torch.zeros(1, 1, dtype=torch.long, device=rt.device))
        model.unshard()
    try:
        yield
    finally:
        if fsdp:
            model.reshard()
