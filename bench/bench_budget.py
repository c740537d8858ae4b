"""
What a wall-clock budget buys on this machine, by depth (issue 40's first measurement): GPT-2's
family at depth N (N layers, N heads of 64, 64N wide) on a text file, each depth timed first for a
few steps, then trained for as many steps as the budget holds (the cosine schedule ending there),
with the quickstart's recipe (2,048 tokens a step, --max_lr 3e-3, --weight_decay 0.5, --shuffle 1);
prints each depth's step time, steps, wall-clock and final val loss, and the quickstart's own shape
cut to the same budget beside them.

    python bench/bench_budget.py                          # depths 1-4, 5 minutes each
    python bench/bench_budget.py --depths 2 3 --minutes 2

A benchmark prints figures; it asserts nothing. Run nothing else meanwhile: the budget is wall time.
"""
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from plumbing import errors, flags  # noqa: E402

RECIPE = ["--batch_size", "8", "--seq_len", "256", "--total_batch_size", "2048",
          "--warmup_steps", "30", "--max_lr", "3e-3", "--weight_decay", "0.5", "--shuffle", "1",
          "--sample_every", "0", "--val_tokens", "32768", "--checkpoint_every", "0"]
QUICKSTART = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128"]  # the README's shape
STEP_RE = re.compile(r"step +(\d+) \| loss .* \| ([\d.]+) ms \|")
VAL_RE = re.compile(r"step +(\d+) \| val loss ([\d.]+)")


def train(data, shape, steps, eval_every, log_dir):
    """(stdout, seconds) of one run of train_gpt2.py."""
    cmd = [sys.executable, str(ROOT / "train_gpt2.py"), "--data", data, "--log_dir", log_dir,
           *shape, *RECIPE, "--max_steps", str(steps), "--eval_every", str(eval_every)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise errors.UserError(f"{' '.join(cmd)} failed: {out.stderr.strip().splitlines()[-1]}")
    return out.stdout, time.perf_counter() - t0


def bench(data, depths, minutes):
    rows = [(f"depth {n}", ["--n_layer", str(n), "--n_head", str(n), "--n_embd", str(64 * n)])
            for n in depths] + [("quickstart (4 layers, 128 wide)", QUICKSTART)]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, shape) in enumerate(rows):
            # the probe: 12 steps, the first (compiling) left out of the step time
            out, probe_s = train(data, shape, 12, 0, f"{tmp}/probe{i}")
            step_s = sorted(float(ms) for s, ms in STEP_RE.findall(out) if int(s) > 1)[4] / 1000
            start_s = probe_s - 12 * step_s  # start-up and the first step's compilation
            steps = max(10, int((60 * minutes - start_s) / (step_s * 1.06)))  # 6%: evaluations
            out, run_s = train(data, shape, steps, max(1, steps // 5), f"{tmp}/run{i}")
            val = VAL_RE.findall(out)[-1]
            print(f"{name:32s} | {step_s * 1000:6.0f} ms a step | {steps:5d} steps | "
                  f"{run_s / 60:5.2f} min | val {float(val[1]):.4f} at step {val[0]}", flush=True)


@errors.cli
def main(argv):
    p = flags.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=flags.path("file"), default=str(ROOT / "input.txt"),
                   help="a text file to train on (its last 10%% is val)")
    p.add_argument("--depths", type=flags.POSITIVE, nargs="+", default=[1, 2, 3, 4],
                   help="depths to try: N layers, N heads of 64, 64N wide")
    p.add_argument("--minutes", type=flags.number(float, 0, lo_open=True), default=5.0,
                   help="the wall-clock budget of each run, start-up and compilation included")
    args = p.parse_args(argv)
    print(f"{args.minutes:g} minutes a run on {args.data}")
    bench(args.data, args.depths, args.minutes)


if __name__ == "__main__":
    main()
