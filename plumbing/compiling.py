"""
--compile: torch.compile a block at a time. Each transformer block is compiled in place (one graph
that every layer reuses) and the loss's blocks of rows by one compiled function, where compiling
the model whole would unroll every layer and every block of the loss into one graph: about twice
the compile time for the same steps (docs/speed-and-memory.md).
"""

import torch
import torch.utils.checkpoint


def compile_blocks(model, compile=True, loss=True):
    """Compiles model's blocks in place, in torchtitan's order: activation checkpointing
    (--grad_checkpoint) innermost, compiled around it (compile=False: the checkpointing alone, as
    FSDP with --compile off needs it); with loss, the loss's blocks too (model.compile_loss). The
    compiled blocks are what evaluation calls too: train() runs it under
    torch.compiler.set_stance("force_eager"), so that its other shapes never meet compiled code."""
    for block in model.transformer.h:
        if model.grad_checkpoint:
            checkpoint_block(block)
        if compile:
            block.compile()
    model.grad_checkpoint = False  # the blocks checkpoint themselves, inside their compiled code
    model.compile_loss = compile and loss


def checkpoint_block(block):
    """--grad_checkpoint inside the block: its forward keeps only its input and runs again in
    backward (with the same dropout masks: the checkpoint restores the random state); as
    GPT.features does from outside."""
    forward = block.forward

    def checkpointed(x, cache=None, dropout=0.0):
        """The block, recomputed in backward when training (not when sampling with a cache or
        evaluating)."""
        if block.training and cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                forward, x, cache, dropout, use_reentrant=False)
        return forward(x, cache, dropout)
    block.forward = checkpointed
