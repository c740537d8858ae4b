"""
`train_gpt2.py plot`: log.txt's losses and HellaSwag accuracy as a PNG, with GPT-2's reference
lines; with --compare, two runs on one chart.
"""

import os

from plumbing import errors, files, flags


def read_log(log_dir):
    """{kind: (steps, values)} of a run's log.txt ("<step> <kind> <value>" lines)."""
    log_file = os.path.join(log_dir, "log.txt")
    if not os.path.isfile(log_file):
        raise errors.UserError(f"{log_file} does not exist; give the --log_dir of a training run")
    series = {"train": ([], []), "val": ([], []), "hella": ([], [])}
    with open(log_file) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[1] in series:
                series[parts[1]][0].append(int(parts[0]))
                series[parts[1]][1].append(float(parts[2]))
    return series


def figure(log_dir, compare=None):
    """log.txt's curves as a matplotlib figure, with the GPT-2 reference lines (notebooks/play.ipynb
    shows it); compare: another run's log_dir, whose curves are drawn on the same axes (each run
    named by its directory)."""
    runs = {d: read_log(d) for d in [log_dir] + ([compare] if compare else [])}
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise errors.UserError("plot needs matplotlib: pip install matplotlib") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    for d, series in runs.items():
        name = f"{os.path.basename(os.path.normpath(d))}: " if compare else ""
        ax1.plot(*series["train"], label=f"{name}train loss", alpha=0.6)
        ax1.plot(*series["val"], label=f"{name}val loss", marker="o", markersize=3)
        ax2.plot(*series["hella"], label=name[:-2] or "ours", marker="o", markersize=3)
    # reference: OpenAI's GPT-2 124M on the FineWeb-Edu val shard, as measured in
    # Karpathy's build-nanogpt
    ax1.axhline(3.2924, color="r", linestyle="--", label="OpenAI GPT-2 124M val (3.2924)")
    ax1.set(xlabel="step", ylabel="loss", title="loss")
    ax1.legend()
    ax2.axhline(0.2955, color="r", linestyle="--", label="OpenAI GPT-2 124M (0.2955)")
    ax2.axhline(0.337, color="g", linestyle="--", label="GPT-3 124M (0.337)")
    ax2.axhline(0.25, color="gray", linestyle=":", label="chance (0.25)")
    hella = any(series["hella"][0] for series in runs.values())
    title = "HellaSwag" if hella else "HellaSwag (not in this log: train with --hellaswag_every)"
    ax2.set(xlabel="step", ylabel="acc_norm", title=title, xlim=ax1.get_xlim(), ylim=(0.2, 0.4))
    ax2.legend()
    return fig


def main(argv):
    """`train_gpt2.py plot`: log.txt's losses and HellaSwag accuracy as a PNG."""
    p = flags.Parser(prog="train_gpt2.py plot", description="Plot log.txt: losses and HellaSwag.")
    p.add_argument("--log_dir", type=flags.path("dir"), default="log",
                   help="directory holding log.txt")
    p.add_argument("--out", type=flags.path("out_file"),
                   help="PNG to write (None: <log_dir>/plot.png)")
    p.add_argument("--compare", type=flags.path("dir"), help="another run's log directory, "
                   "drawn on the same chart (muon beside adamw, say)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.log_dir, "plot.png")
    if problem := flags.path_problem(out, "out_file"):
        raise errors.UserError(f"cannot write the plot: {problem}")
    try:
        import matplotlib
        matplotlib.use("Agg")  # a file, no window
    except ImportError:
        raise errors.UserError("plot needs matplotlib: pip install matplotlib") from None
    fig = figure(args.log_dir, args.compare)
    files.write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    print(f"wrote {out}")
