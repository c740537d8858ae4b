"""
Training and sampling speed: runs train_gpt2.py as a user would (no speed flags unless a row says
so) and prints tokens/s, ms/step, MFU and peak memory per configuration, plus the KV-cache vs
recompute ratio. Then our training step against the reference one (full logits + F.cross_entropy,
the default AdamW: what train_gpt2.py did before the chunked loss), each in its own process, steps
interleaved: the loss path's share of each step, the time of its three matmuls alone (the floor no
loss code can go under), and the page faults of a step (memory the kernel handed out and zeroed).

    python bench/bench_train.py                 # the CPU rows of docs/speed-and-memory.md's table
    python bench/bench_train.py --device cuda   # the same on a GPU, plus the 124M T=1024 recipe row
    python bench/bench_train.py --only compare  # only the reference comparison
    python bench/bench_train.py --only compare --dtype fp32    # both in fp32 (an AVX2 laptop's)
    python bench/bench_train.py --only compare --compile both  # compiled, then both eager
    python bench/bench_train.py --only blocks   # the loss path at several block sizes
    python bench/bench_train.py --only eval     # the loss without gradients against the plain one
    python bench/bench_train.py --device cuda --only compare --shape 4L-128,T1024  # some shapes

A benchmark prints figures; it asserts nothing. Machines are noisy: compare ratios from one run.
"""
import argparse
import multiprocessing as mp
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train_gpt2 as tg  # noqa: E402
from plumbing import chunked_loss, errors, flags, mfu, runtime

STEP_RE = re.compile(r"\| ([\d.]+) ms \| ([\d,]+) tok/s \| MFU ([\d.]+%|n/a)")


# train_gpt2.py with deterministic mode left off: what bit-reproducibility on CPU costs (see
# docs/checkpoints.md)
NONDETERMINISTIC = ("import runpy, sys, torch; "
                    "torch.use_deterministic_algorithms = lambda *a, **k: None; "
                    "sys.argv[0] = sys.argv[1]; del sys.argv[1]; "
                    "runpy.run_path(sys.argv[0], run_name='__main__')")


def run_train(name, args, steps, deterministic=True):
    """One training run as a subprocess; returns a table row from its per-step lines (the median of
    the steps after the first two, which pay for compilation and warm-up)."""
    launch = [] if deterministic else ["-c", NONDETERMINISTIC]
    cmd = [sys.executable, *launch, str(ROOT / "train_gpt2.py"), "--data", str(ROOT / "input.txt"),
           "--max_steps", str(steps), "--warmup_steps", "2", "--eval_every", "0",
           "--sample_every", "0", "--checkpoint_every", "0",
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
    gpu = re.search(r"peak GPU memory ([\d.]+) GiB", out)  # printed at the end of a CUDA run
    # KiB -> GiB
    peak_mem = f"{gpu[1]} GiB GPU" if gpu else f"{usage.ru_maxrss / 2**20:.2f} GiB RSS"
    return (f"| {name} | {' '.join(args)} | {tok:,.0f} | {ms:,.0f} | {mfu} | {peak_mem} | "
            f"{first:.1f} s | {wall:.0f} s |")


def kv_cache_ratio(device, new_tokens=256):
    """Greedy generation of new_tokens with and without the KV cache on a GPT-2 124M-shaped
    model."""
    rt = runtime.setup(device, "auto")
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(**tg.PRESETS["gpt2"])).to(rt.device).eval()
    idx = torch.randint(0, 50257, (1, 8), device=rt.device)
    times, outs = {}, {}
    for use_cache in (True, False):  # warm-up: the first kernels of each path pay for their set-up
        with rt.autocast():
            tg.generate(model, idx, 4, temperature=0, use_cache=use_cache)
    for use_cache in (True, False):
        t0 = time.perf_counter()
        with rt.autocast():
            outs[use_cache] = tg.generate(model, idx, new_tokens, temperature=0,
                                          use_cache=use_cache)
        times[use_cache] = time.perf_counter() - t0
    same = torch.equal(outs[True], outs[False])
    return (f"KV cache, GPT-2 124M, {new_tokens} new tokens greedy ({rt.dtype}): "
            f"cache {times[True]:.1f} s, recompute {times[False]:.1f} s, "
            f"{times[False] / times[True]:.1f}x faster, identical tokens: {same}")


def timed(fn, rt):
    """Wall time of fn() in seconds, the device's queue drained."""
    sync = torch.cuda.synchronize if rt.device_type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def compare_reference(device, dtype, name, shape, B, T, steps, compiled=True):
    """Ours vs the reference step (plain head, full logits, F.cross_entropy, default AdamW),
    compiled (or both eager: compiled=False, what old GPUs and MPS run), autocast, one micro-batch
    per step. Each runs in its own process, as each program would: ours after runtime.setup
    (deterministic mode, the CPU allocator's reuse of freed memory), the reference with PyTorch's
    and the C library's defaults; and the reference once more with only the allocator setting
    (keep_freed_memory), to tell what that setting buys from what the rest of ours does. Steps
    interleave, one process waiting while another runs, so that all see the same machine load. Then
    the loss path alone (hidden states -> loss, forward and backward): plain vs
    chunked_loss.cross_entropy, its share of each step, and its three matmuls alone. MFU of each
    side is against the peak of `dtype` measured here (mfu.peak_flops), after the steps."""
    # the dtype ours trains in (auto: as train_gpt2.py picks); the reference too
    rt = runtime.setup(device, dtype)
    dtype = rt.dtype
    ctx = mp.get_context("spawn")
    workers = {}
    kinds = (("reference", "reference, freed memory kept", "ours") if device == "cpu"
             else ("reference", "ours"))
    for kind in kinds:
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=compare_worker,
                           args=(kind, child, device, dtype, shape, B, T, compiled), daemon=True)
        proc.start()
        workers[kind] = (proc, conn)
    for _, conn in workers.values():
        conn.recv()  # built, and compiled by a first step
    times = {k: {} for k in workers}
    losses = {k: [] for k in workers}
    for _ in range(steps):
        for kind, (_, conn) in workers.items():
            for part in {"reference": ("step", "loss"),
                         "ours": ("step", "loss", "floor")}.get(kind, ("step",)):
                conn.send(part)
                seconds, loss, faults = conn.recv()
                times[kind].setdefault(part, []).append(seconds)
                if part == "step":
                    losses[kind].append(loss)
                    times[kind].setdefault("faults", []).append(faults)
    for proc, conn in workers.values():
        conn.send(None)
        proc.join()
    med = {k: {part: statistics.median(v[2:]) for part, v in t.items()} for k, t in times.items()}
    same = max(abs(a - b) for a, b in zip(losses["reference"], losses["ours"]))
    tok = {k: B * T / m["step"] for k, m in med.items()}
    kept = tok.get("reference, freed memory kept")  # CPU only: the setting is about CPU memory
    kept = f"{kept:,.0f} = {tok['ours'] / kept:.2f}x" if kept else "n/a"
    peak = mfu.peak_flops(rt)  # measured now, the workers gone: the machine's best in this dtype
    flops = mfu.flops_per_token(tg.GPTConfig(**shape), T)
    mfus = (" / ".join(f"{100 * tok[k] * flops / peak:.0f}%" for k in ("reference", "ours"))
            if peak else "n/a")
    return (f"| {name}{'' if compiled else ' eager'} | {dtype} | {tok['reference']:,.0f} | "
            f"{tok['ours']:,.0f} | **{tok['ours'] / tok['reference']:.2f}x** | "
            f"{mfus} (peak {peak / 1e9:,.0f} GFLOP/s) | {kept} | "
            f"{1000 * med['reference']['loss']:,.0f} ms = "
            f"{100 * med['reference']['loss'] / med['reference']['step']:.0f}% | "
            f"{1000 * med['ours']['loss']:,.0f} ms = "
            f"{100 * med['ours']['loss'] / med['ours']['step']:.0f}% | "
            f"{1000 * med['ours']['floor']:,.0f} ms = "
            f"{100 * med['ours']['floor'] / med['ours']['loss']:.0f}% | "
            f"{med['reference']['faults']:,.0f} / {med['ours']['faults']:,.0f} | {same:.1e} |")


def compare_worker(kind, conn, device, dtype, shape, B, T, compiled):
    """One side of compare_reference, in its own process: builds the model, then times what conn
    asks for ("step", "loss", "floor") and sends back (seconds, loss, page faults), until it gets
    None."""
    if kind == "ours":
        rt = runtime.setup(device, dtype)
    else:
        # none of our process-wide settings: only the device and the dtype (and, if asked, the
        # allocator's)
        if kind == "reference, freed memory kept":
            runtime.keep_freed_memory()
        rt = runtime.Runtime(False, 0, 0, 1, True, device if device != "cuda" else "cuda:0",
                             device, dtype)
    maybe_compile = torch.compile if compiled else (lambda fn: fn)
    torch.manual_seed(0)
    config = tg.GPTConfig(**shape)
    x = torch.randint(0, config.vocab_size, (B, T), device=rt.device)
    y = torch.randint(0, config.vocab_size, (B, T), device=rt.device)
    torch.manual_seed(1337)
    model = tg.GPT(config).to(rt.device)
    if kind == "ours":
        opt = tg.configure_optimizer(model, 1e-4, 0.1, rt.device_type)
        fwd = maybe_compile(lambda: model(x, y)[1])
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        fwd = maybe_compile(lambda: F.cross_entropy(
            model.head(model.features(x)).float().flatten(0, 1), y.flatten()))

    def step():
        with rt.autocast():
            loss = fwd()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    # final hidden states
    h = torch.randn(B * T, config.n_embd, device=rt.device, requires_grad=True)
    w = model.lm_head.weight
    if kind == "ours":
        loss_fn = maybe_compile(lambda: chunked_loss.cross_entropy(
            h, w, y.flatten(), config.vocab_size, model.loss_block_rows(B * T, rt.device_type)))
    else:
        loss_fn = maybe_compile(lambda: F.cross_entropy(model.head(h).float(), y.flatten()))

    def loss_path():
        with rt.autocast():
            loss = loss_fn()
        loss.backward()
        h.grad = w.grad = None

    # The floor under any loss path: its three matmuls alone (logits = h W^T, then d h = g W and
    # d W = g^T h, with g the (N, V) gradient of the logits) in the training dtype, with no softmax,
    # no casts and no memory traffic beyond the matmuls' own.
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(rt.dtype, torch.float32)
    hb, wb = h.detach().to(dt), w.detach().to(dt)
    gb = torch.randn(B * T, config.padded_vocab_size, device=rt.device).to(dt)
    parts = {"step": step, "loss": loss_path, "floor": lambda: (hb @ wb.t(), gb @ wb, gb.t() @ hb)}
    step(), loss_path()  # compile both before the first timed call
    conn.send("ready")
    while (part := conn.recv()) is not None:
        out, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = timed(lambda: out.append(parts[part]()), rt)
        # pages the kernel had to zero
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        conn.send((seconds, out[0] if part == "step" else None, faults))


def loss_blocks(device, steps):
    """The loss path alone (forward and backward, compiled, autocast) of 2048 rows at several block
    sizes, for three widths: what loss_block_budget (a CPU's block) is chosen from."""
    rt = runtime.setup(device, "auto")
    rows_all = 2048
    print("| width | " + " | ".join(f"{r} rows" for r in (128, 256, 512, 1024, 2048))
          + " | the model's choice |")
    print("|---|---|---|---|---|---|---|")
    for width in (128, 256, 768):
        torch.manual_seed(0)
        model = tg.GPT(tg.GPTConfig(n_layer=1, n_head=1, n_embd=width))
        h = torch.randn(rows_all, width, device=rt.device, requires_grad=True)
        w = model.lm_head.weight.detach().to(rt.device).requires_grad_()
        y = torch.randint(0, 50257, (rows_all,), device=rt.device)
        cells = []
        for rows in (128, 256, 512, 1024, 2048):
            # a fresh compile per block size (one lambda would hit the recompile limit)
            torch._dynamo.reset()
            fn = torch.compile(
                lambda rows=rows: chunked_loss.ChunkedCrossEntropy.apply(h, w, y, 50257, rows))

            def run():
                with rt.autocast():
                    loss = fn()
                loss.backward()
                h.grad = w.grad = None
            times = [timed(run, rt) for _ in range(steps)]
            cells.append(f"{1000 * statistics.median(times[2:]):,.0f} ms")
        print(f"| {width} | {' | '.join(cells)} | "
              f"{model.loss_block_rows(rows_all, rt.device_type)} rows |", flush=True)


def eval_loss(device, dtype, steps):
    """The loss without gradients (evaluation: model(x, y) under no_grad, eagerly, as evaluate_loss
    runs it) against the plain full logits + F.cross_entropy, interleaved in one process, at several
    block sizes and the model's choice: evaluation's loss must cost no more than the plain one."""
    rt = runtime.setup(device, dtype)
    sizes = (256, 1024, 4096)
    print(f"| width | rows | plain | {' | '.join(f'{r} rows' for r in sizes)} | "
          "the model's choice | ours / plain |")
    print("|---|---|---|" + "---|" * len(sizes) + "---|---|")
    for width, n in ((128, 4096), (768, 4096)):
        torch.manual_seed(0)
        model = tg.GPT(tg.GPTConfig(n_layer=1, n_head=1, n_embd=width)).to(rt.device)
        h = torch.randn(n, width, device=rt.device)
        w, y, V = (model.lm_head.weight.detach(), torch.randint(0, 50257, (n,), device=rt.device),
                   50257)
        choice = model.loss_block_rows(n, rt.device_type, grad=False)

        def plain():
            return F.cross_entropy((h @ w.t())[:, :V].float(), y)
        runs = {"plain": plain,
                **{r: (lambda r=r: chunked_loss.cross_entropy(h, w, y, V, r)) for r in sizes},
                "choice": lambda: chunked_loss.cross_entropy(h, w, y, V, choice)}
        times = {k: [] for k in runs}
        with torch.no_grad(), rt.autocast():
            for _ in range(steps):
                for k, fn in runs.items():
                    times[k].append(timed(fn, rt))
        ms = {k: 1000 * statistics.median(v[1:]) for k, v in times.items()}
        print(f"| {width} | {n} | {ms['plain']:,.0f} ms | "
              + " | ".join(f"{ms[r]:,.0f} ms" for r in sizes)
              + f" | {choice}: {ms['choice']:,.0f} ms | {ms['choice'] / ms['plain']:.2f} |",
              flush=True)


@errors.cli
def main(argv):
    p = flags.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="the training dtype of every run, both sides of the comparison included "
                   "(auto: what train_gpt2.py picks; "
                   "fp32 on a CPU with AVX512-BF16 stands in for an AVX2 laptop)")
    p.add_argument("--steps", type=flags.number(int, 3, hint="; the first two steps are not timed"),
                   default=10, help="optimizer steps per configuration (default: %(default)s)")
    p.add_argument("--only", choices=("table", "compare", "blocks", "eval"),
                   help="run only one part (blocks: the loss's block size; "
                   "eval: the loss without gradients against the plain one; "
                   "both only when asked for)")
    p.add_argument("--compile", choices=("on", "off", "both"), default="on",
                   help="the comparison compiled (on), eager (off: what old GPUs and MPS run) "
                   "or both, each side the same (default: %(default)s)")
    p.add_argument("--shape", default="",
                   help="compare only the shapes whose names hold one of these (comma-separated), "
                   "e.g. 4L-128,T1024")
    args = p.parse_args(argv)
    dev = ["--device", args.device, "--dtype", args.dtype]
    gpt2 = ["--model", "gpt2"]
    small = ["--n_layer", "4", "--n_head", "4", "--n_embd", "256"]
    configs = [
        ("124M B4 T256", [*dev, *gpt2, "--batch_size", "4", "--seq_len", "256",
                          "--total_batch_size", "1024"]),
        ("124M B4 T256 eager", [*dev, *gpt2, "--batch_size", "4", "--seq_len", "256",
                                "--total_batch_size", "1024", "--compile", "off"]),
        ("4L-256 B8 T256", [*dev, *small, "--batch_size", "8", "--seq_len", "256",
                            "--total_batch_size", "2048"]),
        ("4L-256 B8 T256 eager", [*dev, *small, "--batch_size", "8", "--seq_len", "256",
                                  "--total_batch_size", "2048", "--compile", "off"]),
    ]
    quickstart = [*dev, "--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--batch_size", "8",
                  "--seq_len", "256", "--total_batch_size", "2048"]
    if args.device == "cuda":
        configs.append(("124M B64 T1024 (recipe)",
                        [*dev, *gpt2, "--batch_size", "64", "--total_batch_size", "524288"]))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}, load average "
          f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")
    if args.only == "blocks":
        return loss_blocks(args.device, args.steps)
    if args.only == "eval":
        return eval_loss(args.device, args.dtype, args.steps)
    if args.only != "compare":
        print("| config | flags | tok/s | ms/step | MFU | peak memory | first step | wall |")
        print("|---|---|---|---|---|---|---|---|")
        for name, cfg in configs:
            print(run_train(name, cfg, args.steps), flush=True)
        if args.device == "cpu":  # interleaved, so that both see the same load
            for _ in range(2):
                print(run_train("4L-128 B8 T256 (deterministic, the default)", quickstart,
                                args.steps), flush=True)
                print(run_train("4L-128 B8 T256, deterministic mode off", quickstart, args.steps,
                                False), flush=True)
        print(kv_cache_ratio(args.device))
    if args.only != "table":
        print("\nOurs vs the reference step (full logits + F.cross_entropy, default AdamW), "
              "compiled (eager where the row says), one micro-batch per step; "
              "loss path = hidden states -> loss, forward + backward, and its share of the step")
        print("| shape | dtype | reference tok/s | ours tok/s | ours/reference | "
              "MFU reference / ours | reference with freed memory kept: tok/s, ours/it | "
              "loss path, reference | loss path, ours | its 3 matmuls alone, share of ours | "
              "page faults a step, reference / ours | max loss difference |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        shapes = [("4L-128 B8 T256", dict(n_layer=4, n_head=4, n_embd=128), 8, 256),
                  ("4L-256 B8 T256", dict(n_layer=4, n_head=4, n_embd=256), 8, 256),
                  ("124M B4 T256", tg.PRESETS["gpt2"], 4, 256)]
        if args.device == "cuda":  # a batch that fills a GPU: the recipe's micro-batch
            shapes.append(("124M B64 T1024", tg.PRESETS["gpt2"], 64, 1024))
        for name, shape, B, T in [s for s in shapes
                                  if any(k in s[0] for k in args.shape.split(","))]:
            for compiled in {"on": (True,), "off": (False,), "both": (True, False)}[args.compile]:
                print(compare_reference(args.device, args.dtype, name, shape, B, T, args.steps,
                                        compiled), flush=True)


if __name__ == "__main__":
    main()
