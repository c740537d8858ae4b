"""
FSDP against DDP: 2 CPU ranks (gloo, fp32) under torchrun, the same run with DDP and with --fsdp 1,
its gradients reduced once per optimizer step (--fsdp_sync step) or in each of the 4 micro-steps
(micro), for a tiny and a small model; prints the median tokens/s (steps after the first two) and
the peak RSS of one rank.

    python bench/bench_fsdp.py              # 2 repeats of each, alternating the modes
    python bench/bench_fsdp.py --model small --repeats 1

A benchmark prints figures; it asserts nothing. Machines are noisy: compare numbers from one run.
"""
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from plumbing import errors, flags

TOK_RE = re.compile(r"\| ([\d,]+) tok/s \|")
MODELS = {
    "tiny (2L, 32 wide, T=64)": ["--n_layer", "2", "--n_head", "2", "--n_embd", "32",
                                 "--batch_size", "4", "--seq_len", "64",
                                 "--total_batch_size", "2048", "--max_steps", "30"],  # 4 micro
    "small (4L, 256 wide, T=256)": ["--n_layer", "4", "--n_head", "4", "--n_embd", "256",
                                    "--batch_size", "8", "--seq_len", "256",
                                    "--total_batch_size", "16384", "--max_steps", "8"],  # 4 micro
}
MODES = {"DDP": [], "FSDP, sync once per step": ["--fsdp", "1", "--fsdp_sync", "step"],
         "FSDP, sync every micro-step": ["--fsdp", "1", "--fsdp_sync", "micro"]}


def run(model_args, mode_args):
    """(median tok/s, peak RSS of one rank in MiB) of one 2-rank run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_gpt2.py"), "--data", str(ROOT / "input.txt"), "--device", "cpu",
           "--dtype", "fp32", "--compile", "off", "--warmup_steps", "2", "--eval_every", "0",
           "--sample_every", "0", "--checkpoint_every", "0",
           "--log_dir", str(ROOT / "bench_out" / "fsdp"), *model_args, *mode_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: the largest of torchrun and its ranks
    toks = [float(t.replace(",", "")) for t in TOK_RE.findall(out)][2:]
    if status != 0 or not toks:
        return None, None
    return statistics.median(toks), usage.ru_maxrss / 1024


@errors.cli
def main(argv):
    p = flags.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=flags.number(int, 1, 1000), default=2,
                   help="runs of each configuration (default: %(default)s)")
    p.add_argument("--model", choices=("", "tiny", "small"), default="",
                   help="only the models whose names start with this (tiny, small; empty: both)")
    args = p.parse_args(argv)
    print("| model | mode | tok/s (each repeat) | peak RSS of a rank |")
    print("|---|---|---|---|")
    for name, model_args in MODELS.items():
        if not name.startswith(args.model):
            continue
        results = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            # alternating, so that load from elsewhere hits all alike
            for mode, mode_args in MODES.items():
                results[mode].append(run(model_args, mode_args))
        for mode, rs in results.items():
            toks = ", ".join(f"{t:,.0f}" if t else "failed" for t, _ in rs)
            rss = max((m for _, m in rs if m), default=0)
            print(f"| {name} | {mode} | {toks} | {rss:,.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
