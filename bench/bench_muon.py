"""
Muon against AdamW, token for token: the same model, data, schedule and token budget, each side
with a small learning-rate sweep (the best run of each side is compared, never a tuned side against
an untuned one), on Tiny Shakespeare with GPT-2's tokenizer (input.txt; its last 10% is the val
split). Every run is `python train_gpt2.py` itself; the figures are its log.txt and step lines.
Prints each run's val loss against tokens, the tokens each best run needs to reach the other's final
val loss (interpolated on its curve), and the median time of a step (--variants steptime: the
two optimizers' steps in turn in one process, a ratio of one run).

    python bench/bench_muon.py                                   # the two CPU shapes, ~50 minutes
    python bench/bench_muon.py --shape blocks --steps 100
    python bench/bench_muon.py --shape 124M --device cuda        # bench/gpu_check.sh runs it
    python bench/bench_muon.py --shape quickstart --variants qkv # the fused qkv against its parts
    python bench/bench_muon.py --variants steptime               # step times in one process

A benchmark prints figures; it asserts nothing. Runs one at a time: never two benchmarks at once.
"""
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from plumbing import errors, flags  # noqa: E402

# name: (shape and batch flags, the recipe's other flags, steps, AdamW's lrs, Muon's lrs)
SHAPES = {
    # the README's quickstart: 4 layers, 128 wide; 6.4M of its 7.4M weights are the embedding
    "quickstart": (["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--batch_size", "8",
                    "--seq_len", "256", "--total_batch_size", "2048"],
                   ["--weight_decay", "0.5", "--shuffle", "1"], 300, (1e-3, 3e-3, 6e-3),
                   (0.01, 0.02, 0.05)),
    # 20 layers, 256 wide: the blocks hold 15.7M weights, the embedding 12.9M
    "blocks": (["--n_layer", "20", "--n_head", "4", "--n_embd", "256", "--batch_size", "8",
                "--seq_len", "256", "--total_batch_size", "2048"],
               ["--weight_decay", "0.1", "--shuffle", "1"], 100, (6e-4, 1e-3, 3e-3), (0.01, 0.02)),
    # GPT-2 124M on a GPU (85M of its weights in the blocks), 8,192 tokens a step: 100 steps are
    # under 3 epochs of Tiny Shakespeare's 300K training tokens
    "124M": (["--model", "gpt2", "--batch_size", "8", "--seq_len", "1024",
              "--total_batch_size", "8192"],
             ["--weight_decay", "0.1", "--shuffle", "1"], 100, (6e-4, 1.8e-3), (0.02,)),
}
# the fused qkv matrix orthogonalized as its three (C x C) parts, each square: lr scale 1 (not √3)
QKV_APART = """
import sys, torch, train_gpt2 as tg
whole = tg.orthogonalize
def apart(g, dtype, steps=5):
    if g.size(0) == 3 * g.size(1):
        return torch.cat([whole(part, dtype, steps) for part in g.chunk(3)]) / 3 ** 0.5
    return whole(g, dtype, steps)
tg.orthogonalize = apart
tg.main(sys.argv[1:])
"""
STEP_MS = re.compile(r"\| ([\d.]+) ms \|")


def train(name, shape_args, recipe, steps, device, extra, apart=False):
    """One run of train_gpt2.py: ([(tokens, val loss)], median ms of a step after the first 3)."""
    log_dir = ROOT / "bench_out" / "muon" / name
    if (log_dir / "log.txt").exists():
        (log_dir / "log.txt").unlink()
    every = max(1, steps // 10)
    program = ["-c", QKV_APART] if apart else [str(ROOT / "train_gpt2.py")]
    cmd = [sys.executable, *program]
    cmd += ["--data", str(ROOT / "input.txt"), "--log_dir", str(log_dir), "--device", device,
            *shape_args, *recipe, "--max_steps", str(steps), "--warmup_steps", str(every),
            "--eval_every", str(every), "--val_tokens", "32768", "--sample_every", "0",
            "--checkpoint_every", "0", *extra]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise errors.UserError(f"{name} failed: {out.stderr.strip().splitlines()[-1:]}")
    per_step = int(shape_args[shape_args.index("--total_batch_size") + 1])
    curve = [(int(s) * per_step, float(v)) for s, kind, v in
             (ln.split() for ln in (log_dir / "log.txt").read_text().splitlines()) if kind == "val"]
    ms = [float(m) for m in STEP_MS.findall(out.stdout)][3:]
    return curve, statistics.median(ms) if ms else float("nan")


def tokens_to_reach(curve, loss):
    """The tokens at which a val curve first reaches loss, interpolated linearly between its
    points; None if it never does."""
    for (t0, v0), (t1, v1) in zip(curve, curve[1:]):
        if v1 <= loss:
            return t0 + (t1 - t0) * (v0 - loss) / (v0 - v1) if v0 > loss else t0
    return None


def compare(best, budget):
    """The lines that compare the best AdamW and Muon runs."""
    (a_name, (a_curve, a_ms)), (m_name, (m_curve, m_ms)) = best["adamw"], best["muon"]
    a_final, m_final = a_curve[-1][1], m_curve[-1][1]
    lines = [f"best AdamW: {a_name}, final val {a_final:.4f}; best Muon: {m_name}, final val "
             f"{m_final:.4f} ({budget:,} tokens each)"]
    for who, curve, target, other in (("AdamW", a_curve, m_final, "Muon"),
                                      ("Muon", m_curve, a_final, "AdamW")):
        t = tokens_to_reach(curve, target)
        lines.append(f"{who} reaches {other}'s final val {target:.4f} at " +
                     (f"{t:,.0f} tokens: {budget / t:.2f}x {'fewer' if t < budget else 'more'} "
                      f"than {other}'s {budget:,}" if t else f"no point of its {budget:,} tokens"))
    lines.append(f"step time: Muon {m_ms:.1f} ms, AdamW {a_ms:.1f} ms: {m_ms / a_ms:.2f}x (each "
                 "in its own process: --variants steptime compares them in one)")
    return lines


def bench(shape, steps, device, variants):
    """The runs of one shape, each printed as it ends, then the comparison of the best of each."""
    shape_args, recipe, default_steps, adamw_lrs, muon_lrs = SHAPES[shape]
    steps = steps or default_steps
    budget = steps * int(shape_args[shape_args.index("--total_batch_size") + 1])
    print(f"\n## {shape}: {' '.join(shape_args)} {' '.join(recipe)}, {steps} steps, "
          f"{budget:,} tokens, {device}\n", flush=True)
    results = {}

    def run(name, extra, apart=False):
        results[name] = train(f"{shape}-{name.replace(' ', '-')}", shape_args, recipe, steps,
                              device, extra, apart)
        curve, ms = results[name]
        marks = [curve[len(curve) // 3], curve[2 * len(curve) // 3], curve[-1]]
        print(f"| {name} | " + " | ".join(f"{v:.4f} @ {t:,}" for t, v in marks) +
              f" | {ms:.1f} ms/step |", flush=True)

    if variants == "qkv":
        run("muon qkv whole", ["--optimizer", "muon"])
        run("muon qkv apart", ["--optimizer", "muon"], apart=True)
        return
    for lr in adamw_lrs:
        run(f"adamw lr {lr:g}", ["--max_lr", str(lr)])
    # Muon's side: AdamW for the embeddings and 1-D tensors at the best AdamW run's lr
    best_lr = min(adamw_lrs, key=lambda lr: results[f"adamw lr {lr:g}"][0][-1][1])
    for lr in muon_lrs:
        run(f"muon lr {lr:g}", ["--optimizer", "muon", "--max_lr", str(best_lr),
                                "--muon_lr", str(lr)])
    best = {side: min(((n, r) for n, r in results.items() if n.startswith(side)),
                      key=lambda nr: nr[1][0][-1][1]) for side in ("adamw", "muon")}
    print("\n".join(["", *compare(best, budget)]), flush=True)


def step_times(shape, device, rounds=10):
    """Muon's step against AdamW's in one process, a ratio of one run (a run's step time varies
    from process to process): train_gpt2.py's own step (train_step) on the shape's model, compiled,
    with the two optimizers stepping in turn on the same weights, at the shape's tokens a step and
    at four times them (gradient accumulation). The median of each, and its optimizer step's."""
    import dataclasses
    import time

    import torch

    import train_gpt2 as tg
    from plumbing import runtime, train_flags
    shape_args, recipe = SHAPES[shape][:2]
    tokens = int(shape_args[shape_args.index("--total_batch_size") + 1])
    print(f"\n## {shape}: step time in one process, {device}\n", flush=True)
    for n in (tokens, 4 * tokens):
        cfg = train_flags.parse(["--data", str(ROOT / "input.txt"), "--device", device,
                                 *shape_args, *recipe, "--total_batch_size", str(n),
                                 "--optimizer", "muon", "--eval_every", "0"])
        rt = runtime.setup(device, cfg.dtype)
        muon = tg.build_state(cfg, rt)
        adamw = dataclasses.replace(muon, optimizer=tg.configure_optimizer(
            muon.model, cfg.max_lr, cfg.weight_decay, rt.device_type))
        model = tg.wrap_model(muon.model, cfg, rt, muon.compile)
        sync = torch.cuda.synchronize if rt.device_type == "cuda" else (lambda: None)
        ms = {"adamw": [], "muon": []}
        for i in range(rounds + 2):  # the first two: compiling, first allocations
            for name, state in sorted((("adamw", adamw), ("muon", muon)), reverse=i % 2 == 1):
                sync()
                t0 = time.perf_counter()
                tg.train_step(model, state, cfg.max_lr, cfg.grad_clip, rt)
                sync()
                if i >= 2:
                    ms[name].append(1000 * (time.perf_counter() - t0))
        a, m = (statistics.median(ms[k]) for k in ("adamw", "muon"))
        micro = f"{muon.grad_accum} micro-step" + "s" * (muon.grad_accum > 1)
        print(f"{n:,} tokens a step ({micro}): AdamW {a:.1f} ms, Muon {m:.1f} ms: {m / a:.3f}x",
              flush=True)


@errors.cli
def main(argv):
    p = flags.Parser(prog="bench_muon.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("both", *SHAPES), default="both",
                   help="quickstart, blocks (most weights in the blocks), 124M (a GPU), "
                   "or both CPU shapes")
    p.add_argument("--steps", type=flags.COUNT, default=0,
                   help="optimizer steps of every run (0: the shape's own)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu or cuda")
    p.add_argument("--variants", choices=("lr", "qkv", "steptime"), default="lr",
                   help="lr: the learning-rate sweeps; "
                   "qkv: Muon at its default lr with the fused qkv against its three parts; "
                   "steptime: Muon's step time against AdamW's, in one process")
    args = p.parse_args(argv)
    for shape in ("quickstart", "blocks") if args.shape == "both" else (args.shape,):
        if args.variants == "steptime":
            step_times(shape, args.device)
        else:
            bench(shape, args.steps, args.device, args.variants)

if __name__ == "__main__":
    main()
