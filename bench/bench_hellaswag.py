"""
HellaSwag scoring speed: batched (several examples per forward) vs one example (4 rows) per forward,
same model, same examples; the two must choose the same endings.

    python bench/bench_hellaswag.py       # a small random GPT-2 and a 124M-shaped random one
    python bench/bench_hellaswag.py --device cuda --n 2000 --big_n 2000 --batch_size 32

Random weights: speed does not depend on them, and no download is needed. The examples are the
first --n of the validation set: the 300 in tests/data if that is enough, else the official file.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tiktoken  # noqa: E402

import train_gpt2  # noqa: E402
from plumbing import errors, flags, hellaswag_eval, runtime


def timed(model, rendered, batch_size, rt):
    if rt.device_type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    total, count = hellaswag_eval.ending_losses(model, rendered, rt.device, batch_size, rt.autocast)
    if rt.device_type == "cuda":
        torch.cuda.synchronize()
    return total, count, time.perf_counter() - t0


def bench(name, config, rendered, batch_size, rt):
    torch.manual_seed(0)
    model = train_gpt2.GPT(config).to(rt.device).eval()
    timed(model, rendered[:2], batch_size, rt)  # warm-up: allocator, kernels
    one_total, one_count, one_s = timed(model, rendered, 1, rt)
    bat_total, bat_count, bat_s = timed(model, rendered, batch_size, rt)
    same = ((one_total.argmin(1) == bat_total.argmin(1))
            & ((one_total / one_count).argmin(1) == (bat_total / bat_count).argmin(1))).sum().item()
    n = len(rendered)
    print(f"{name:<22} {n:>5} {n / one_s:>12.1f} {n / bat_s:>16.1f} {one_s / bat_s:>8.2f}x "
          f"{same:>5}/{n} {(one_total - bat_total).abs().max().item():>10.1e}", flush=True)


@errors.cli
def main(argv):
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=flags.number(int, 0, 10042), default=200,
                   help="examples for the small model; 0 skips it (default 200)")
    p.add_argument("--big_n", type=flags.number(int, 0, 10042), default=32,
                   help="examples for the 124M-shaped model; 0 skips it (default 32)")
    p.add_argument("--batch_size", type=flags.POSITIVE, default=16,
                   help="examples per forward, batched run (default 16)")
    p.add_argument("--device", choices=runtime.DEVICES, default="auto",
                   help="auto, cpu, cuda or mps (default auto)")
    p.add_argument("--dtype", choices=runtime.DTYPES, default="fp32",
                   help="auto, bf16, fp16 or fp32 (default fp32)")
    args = p.parse_args(argv)

    rt = runtime.setup(args.device, args.dtype)
    enc = tiktoken.get_encoding("gpt2")
    sample = ROOT / "tests" / "data" / "hellaswag_val_300.jsonl"  # the first 300 val examples
    examples = hellaswag_eval.load_examples(sample if max(args.n, args.big_n) <= 300 else None,
                                            limit=max(args.n, args.big_n))
    rendered = [hellaswag_eval.render_example(e, enc) for e in examples]
    print(f"device {rt.device} "
          f"({torch.cuda.get_device_name() if rt.device_type == 'cuda' else os.cpu_count()} "
          f"{'GPU' if rt.device_type == 'cuda' else 'CPU cores'}), dtype {rt.dtype}, "
          f"torch threads {torch.get_num_threads()}, "
          f"batch_size {args.batch_size} examples = {4 * args.batch_size} rows")
    print(f"{'model':<22} {'n':>5} {'1 ex/fwd ex/s':>12} {'batched ex/s':>16} {'speedup':>9} "
          f"{'same':>9} {'max |dloss|':>10}")
    if args.n:
        bench("small (2L, 64d)",
              train_gpt2.GPTConfig(block_size=256, n_layer=2, n_head=4, n_embd=64),
              rendered[:args.n], args.batch_size, rt)
    if args.big_n:
        bench("124M-shaped (12L,768d)", train_gpt2.GPTConfig(), rendered[:args.big_n],
              args.batch_size, rt)


if __name__ == "__main__":
    main()
