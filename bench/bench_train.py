"""
Training and sampling speed: runs train_gpt2.py as a user would (no speed flags unless a row says so) and
prints tokens/s, ms/step, MFU and peak memory per configuration, plus the KV-cache vs recompute ratio.

    python bench/bench_train.py                  # the CPU configurations of the README table
    python bench/bench_train.py --device cuda    # the same on a GPU, plus the 124M T=1024 recipe row

A benchmark prints figures; it asserts nothing. Machines are noisy: compare ratios from one run.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt2 as tg  # noqa: E402

STEP_RE = re.compile(r"\| ([\d.]+) ms \| ([\d,]+) tok/s \| MFU ([\d.]+%|n/a)")


def run_train(name, args, steps):
    """One training run as a subprocess; returns a table row from its per-step lines (the median of the
    steps after the first two, which pay for compilation and warm-up)."""
    cmd = [sys.executable, str(ROOT / "train_gpt2.py"), "--data", str(ROOT / "input.txt"), "--max_steps",
           str(steps), "--warmup_steps", "2", "--eval_every", "0", "--sample_every", "0", "--checkpoint_every", "0",
           "--log_dir", str(ROOT / "bench_out" / "log"), *args]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    rows = [m.groups() for m in STEP_RE.finditer(out)]
    if status != 0 or len(rows) < 3:
        return f"| {name} | failed: {out.strip().splitlines()[-1] if out.strip() else status} |"
    ms = statistics.median(float(r[0]) for r in rows[2:])
    tok = statistics.median(float(r[1].replace(",", "")) for r in rows[2:])
    mfu = rows[-1][2]
    first = float(rows[0][0]) / 1000
    peak_mem = usage.ru_maxrss / 2**20  # KiB -> GiB (CPU RSS of the training process)
    return (f"| {name} | {' '.join(args)} | {tok:,.0f} | {ms:,.0f} | {mfu} | {peak_mem:.2f} GiB RSS | "
            f"{first:.1f} s | {wall:.0f} s |")


def kv_cache_ratio(device, new_tokens=256):
    """Greedy generation of new_tokens with and without the KV cache on a GPT-2 124M-shaped model."""
    rt = tg.setup_runtime(device, "auto")
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(**tg.PRESETS["gpt2"])).to(rt.device).eval()
    idx = torch.randint(0, 50257, (1, 8), device=rt.device)
    times, outs = {}, {}
    for use_cache in (True, False):
        t0 = time.perf_counter()
        with rt.autocast():
            outs[use_cache] = tg.generate(model, idx, new_tokens, temperature=0, use_cache=use_cache)
        times[use_cache] = time.perf_counter() - t0
    same = torch.equal(outs[True], outs[False])
    return (f"KV cache, GPT-2 124M, {new_tokens} new tokens greedy ({rt.dtype}): cache {times[True]:.1f} s, "
            f"recompute {times[False]:.1f} s, {times[False] / times[True]:.1f}x faster, identical tokens: {same}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per configuration (default: %(default)s)")
    args = p.parse_args()
    dev = ["--device", args.device]
    gpt2 = ["--model", "gpt2"]
    small = ["--n_layer", "4", "--n_head", "4", "--n_embd", "256"]
    configs = [
        ("124M B4 T256", [*dev, *gpt2, "--batch_size", "4", "--seq_len", "256", "--total_batch_size", "1024"]),
        ("124M B4 T256 eager", [*dev, *gpt2, "--batch_size", "4", "--seq_len", "256", "--total_batch_size", "1024",
                                "--compile", "off"]),
        ("4L-256 B8 T256", [*dev, *small, "--batch_size", "8", "--seq_len", "256", "--total_batch_size", "2048"]),
        ("4L-256 B8 T256 eager", [*dev, *small, "--batch_size", "8", "--seq_len", "256", "--total_batch_size",
                                  "2048", "--compile", "off"]),
    ]
    if args.device == "cuda":
        configs.append(("124M B64 T1024 (recipe)", [*dev, *gpt2, "--batch_size", "64", "--total_batch_size",
                                                    "524288"]))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}")
    print("| config | flags | tok/s | ms/step | MFU | peak memory | first step | wall |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg in configs:
        print(run_train(name, cfg, args.steps), flush=True)
    print(kv_cache_ratio(args.device))


if __name__ == "__main__":
    main()
