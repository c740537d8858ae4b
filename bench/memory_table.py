"""
The README's memory arithmetic, from the rule the code uses (GPT.loss_block_rows,
memory.memory_needs): per GPU for each preset under DDP and FSDP, and the two cases the README works
through (GPT-2 124M on a 4 GB GTX 960 with --batch_size auto --grad_checkpoint 1; gpt2-xl on
8 x 24 GB with FSDP). Arithmetic, no device:

    python bench/memory_table.py
"""
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt2 as tg  # noqa: E402
from plumbing import memory  # noqa: E402

GB, GiB, MiB = 1e9, 2 ** 30, 2 ** 20


def on_card(total_bytes):
    """loss_block_budget's view of a card of total_bytes (it reads the card's memory)."""
    props = type("Props", (), {"total_memory": int(total_bytes)})
    return mock.patch.object(torch.cuda, "get_device_properties", lambda device: props)


def fsdp_root_and_two_blocks(model):
    """FSDP's gathered whole tensors at a time: the root unit (embeddings, ln_f) and two blocks (one
    computing, one prefetched), bf16 weights plus fp32 gradients before their reduce-scatter:
    6 bytes a parameter."""
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    return 6 * (model.num_params() - model.config.n_layer * block + 2 * block)


def main():
    print("| preset | params | DDP: weights, gradients, AdamW on each GPU | FSDP shards, N=8 | "
          "FSDP gathered at a time | activations per token | with --grad_checkpoint 1 | "
          "eager loss, B4 x T1024 on a 24 GB card |")
    print("|---|---|---|---|---|---|---|---|")
    models = {}
    for name, shape in tg.PRESETS.items():
        with torch.device("meta"):
            model = models[name] = tg.GPT(tg.GPTConfig(**shape))
        P = model.num_params()
        with on_card(24 * GB):
            loss = memory.loss_bytes(model, 4 * 1024, "bf16", "cuda")
        print(f"| {name} | {P / 1e6:.1f}M | {16 * P / GB:.2f} GB | {16 * P / 8 / GB:.2f} GB | "
              f"{fsdp_root_and_two_blocks(model) / GB:.2f} GB | "
              f"{memory.activation_bytes_per_token(model.config, 'bf16') / MiB:.2f} MiB | "
              f"{memory.activation_bytes_per_token(model.config, 'bf16', True) / MiB:.3f} MiB | "
              f"{loss / GB:.2f} GB |")

    print("\nGTX 960, 4 GB (4 GiB), GPT-2 124M, fp16, eager, T=1024, --grad_checkpoint 1. "
          "The trial's rule (cuda_batch_fits): the step's peak + AdamW (8 bytes a parameter) "
          "< free - 10% - 512 MiB")
    model = models["gpt2"]
    P = model.num_params()
    free = 4 * GiB - 0.3 * GiB - 4 * P  # less the CUDA context (~0.3 GiB) and the fp32 weights
    room = 0.9 * free - 512 * MiB
    for b in (4, 8, 16):
        with on_card(4 * GiB):
            rows = model.loss_block_rows(b * 1024, "cuda")
            needs = memory.memory_needs(model, b, 1024, "fp16", "cuda", grad_checkpoint=True)
        print(f"B={b}: loss blocks of {rows} rows; training {needs['train'] / GiB:.2f} GiB, "
              f"evaluation {needs['eval'] / GiB:.2f} GiB, room {room / GiB:.2f} GiB: "
              f"{'fits' if needs['train'] < room else 'no'}")

    print("\n8 x 24 GB, gpt2-xl, FSDP over 8, bf16, T=1024 "
          "(about 2 GB of CUDA context and allocator slack)")
    model = models["gpt2-xl"]
    P = model.num_params()
    fixed = 16 * P / 8 + fsdp_root_and_two_blocks(model) + 2 * GB
    for ckpt, batches in ((False, (4, 8)), (True, (16, 32))):
        for b in batches:
            with on_card(24 * GB):
                rows = model.loss_block_rows(b * 1024, "cuda")
                loss = memory.loss_bytes(model, b * 1024, "bf16", "cuda")
            act = b * 1024 * memory.activation_bytes_per_token(model.config, "bf16", ckpt)
            total = fixed + act + loss
            print(f"--batch_size {b}{' --grad_checkpoint 1' if ckpt else ''}: "
                  f"shards + gathered + slack {fixed / GB:.2f} GB, activations {act / GB:.2f} GB, "
                  f"loss ({rows} rows) {loss / GB:.2f} GB: "
                  f"{total / GB:.1f} GB: {'fits' if total < 24 * GB else 'does not fit'}")


if __name__ == "__main__":
    main()
