"""
The run's log: log.txt (one "<step> <kind> <value>" line per event, the format `plot` and users'
scripts read), Weights & Biases with --wandb_project, and the console, all from rank 0, with each
step's MFU and the time left; and one run a --log_dir."""

import dataclasses
import functools
import os

import numpy as np
import torch

from plumbing import checkpoints, errors, files, mfu, runtime, train_flags


def holds_log_dir(train):
    """train(cfg) with rank 0 holding --log_dir (files.DirLock: a second run there is refused, the
    temporaries of an interrupted one go) until it returns or raises, from before anything in the
    folder is read; the flags' own checks first, so that a bad --log_dir is said as such."""
    @functools.wraps(train)
    def wrapper(cfg):
        if runtime.launched_rank() != 0:
            return train(cfg)
        train_flags.check(cfg)
        with files.DirLock(cfg.log_dir, "--log_dir", checkpoints.LOG_DIR_FILES):
            return train(cfg)
    return wrapper


def check_log_dir(cfg):
    """A new run never overwrites an earlier run's log.txt (rank 0 holds the folder meanwhile:
    holds_log_dir). Where the earlier run wrote checkpoints, a new run is refused
    (resume.to_resume); where it wrote none (stopped before its first), too, unless it is --resume
    auto, which keeps the log under another name (RunLog, set_aside)."""
    log_file = os.path.join(cfg.log_dir, "log.txt")
    if (
        not cfg.resume
        and os.path.isfile(log_file)
        and os.path.getsize(log_file)
        and not checkpoints.find(cfg.log_dir)
    ):
        raise errors.UserError(
            f"{log_file} holds the log of an earlier run that wrote no checkpoint; move it away "
            "or choose another --log_dir (--resume auto keeps it as log.1.txt and starts fresh)"
        )


class RunLog:
    """What a run reports, from rank 0 only: events to log.txt, one "<step> <kind> <value>" per line
    (the format `plot` and users' scripts read); the same to W&B with more numbers
    (--wandb_project); lines to the console."""

    def __init__(self, cfg, rt, s):
        self.rt, self.file, self.tracker = rt, os.path.join(cfg.log_dir, "log.txt"), None
        self.first_step, self.step_times = s.step, []  # the recent steps' seconds: the time left
        self.tokens, self.max_steps = cfg.total_batch_size, cfg.max_steps  # a step's, the last
        # MFU (PaLM paper, appendix B): the model's FLOP/s over the hardware's peak; 40-50% is good
        self.flops, self.peak = mfu.flops_per_token(s.model.config, cfg.seq_len), mfu.peak_flops(rt)
        if not rt.master:
            return
        try:  # the folder exists: check_log_dir holds it
            if not s.step and os.path.isfile(self.file) and os.path.getsize(self.file):
                # --resume auto found nothing to resume: the earlier run's log is kept, not
                # overwritten
                print(
                    "kept the log of an earlier run that wrote no checkpoint as "
                    f"{set_aside(self.file)}"
                )
            rewrite_log(self.file, s.step)
        except OSError as e:
            raise errors.UserError(
                f"cannot write to --log_dir {cfg.log_dir} ({e.strerror}); choose a writable "
                "directory"
            ) from None
        config = dataclasses.asdict(s.model.config)
        print(f"model: {s.model.num_params() / 1e6:.2f}M parameters, {config}")
        print(
            f"device {rt.device} ({rt.dtype}), world size {rt.world_size}, {cfg.total_batch_size} "
            "tokens/step = "
            f"{s.batch_size} x {cfg.seq_len} x {rt.world_size} ranks x {s.grad_accum} "
            "accumulation steps"
        )
        if s.step:
            print(
                f"{'resumed' if cfg.resume else 'continuing the learning-rate schedule'} at step "
                f"{s.step}"
            )
        if cfg.wandb_project is not None:
            self.tracker = start_wandb(
                cfg,
                s.wandb_id,
                {
                    **dataclasses.asdict(cfg),
                    "model_config": config,
                    "world_size": rt.world_size,
                    "batch_size": s.batch_size,
                    "grad_accum": s.grad_accum,
                    "num_params": s.model.num_params(),
                },
            )
            # saved in checkpoints: a resumed run continues this W&B run
            s.wandb_id = self.tracker.id

    def __call__(self, event, line=None, extra=None):
        """event for log.txt and W&B, with the extra numbers for W&B (None: not known); line for the
        console."""
        if not self.rt.master:
            return
        try:
            with open(self.file, "a") as f:
                f.write(event + "\n")
        except OSError as e:
            raise errors.UserError(
                f"cannot append to {self.file} ({e.strerror}); free some disk space and continue "
                "with --resume auto"
            ) from None
        if self.tracker is not None:
            step, kind, value = event.split()
            kind = {"train": "train/loss", "val": "val/loss", "hella": "hellaswag/acc_norm"}[kind]
            self.tracker.log({"step": int(step), kind: float(value),
                              **{k: v for k, v in (extra or {}).items() if v is not None}})
        self.print(line)

    def step(self, step, loss, lr, norm, dt):
        """The line of one optimizer step that took dt seconds: its tokens a second, MFU, and the
        time left: the median of the recent steps' times (one slow step moves it little) times the
        steps left; n/a at a run's first step, whose time is mostly compilation."""
        max_steps, tok_s = self.max_steps, self.tokens / dt
        util, self.peak = mfu.mfu_percent(tok_s, self.flops, self.peak, self.rt)
        self.step_times = self.step_times[-19:] + [dt] if step > self.first_step else []
        step_times = self.step_times
        left = float(np.median(step_times)) * (max_steps - step - 1) if step_times else None
        self(
            f"{step} train {loss:.6f}",
            f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | {1000 * dt:.1f} "
            f"ms | {tok_s:,.0f} tok/s | MFU "
            + (f"{util:.1f}%" if util is not None else "n/a")
            + (
                " (above 100%: the CPU's measured peak is too low; was it busy?)"
                if util and util > 100
                else ""
            )
            + f" | ETA {'n/a' if left is None else format_duration(left)}",
            {"train/lr": lr, "train/grad_norm": norm, "train/tok_per_s": tok_s, "train/mfu": util},
        )
        if len(step_times) == 4 and step + 1 < max_steps:  # after the 5th step
            self.print(
                f"at {float(np.median(step_times)):.3g} s a step, the {max_steps - step - 1} "
                "steps left take "
                f"about {format_duration(left)} (evaluations, samples and checkpoints come on top)"
            )

    def print(self, line):
        """A console line, from rank 0 only."""
        if self.rt.master and line is not None:
            print(line)

    def finish(self):
        """The end of the run: W&B closed; on a GPU, its peak memory printed."""
        if self.tracker is not None:
            self.tracker.finish()
        if self.rt.master and self.rt.device_type == "cuda":
            print(
                f"peak GPU memory {torch.cuda.max_memory_allocated(self.rt.device) / 2**30:.2f} GiB"
            )


def format_duration(seconds):
    """3725.0 -> '1h02m', 125.0 -> '2m05s', 7.3 -> '7s': the time left, as the step line shows it.
    """
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def import_wandb():
    """The wandb module, or one line saying how to install it: checked before a run writes anything.
    """
    try:
        import wandb  # optional: only runs with --wandb_project need it installed
    except ImportError:
        raise errors.UserError(
            "--wandb_project needs the wandb package: pip install wandb (or drop --wandb_project)"
        ) from None
    return wandb


def start_wandb(cfg, run_id, config):
    """--wandb_project: a W&B run (on rank 0) that gets the events of log.txt and the per-step
    numbers of stdout. run_id (from the checkpoint) continues that run; None starts a new one. Its
    files go to --log_dir/wandb."""
    wandb = import_wandb()
    try:
        run = wandb.init(
            project=cfg.wandb_project, id=run_id, resume="allow", dir=cfg.log_dir, config=config
        )
    except Exception as e:  # no API key, no network, a bad project name...
        raise errors.UserError(
            f"could not start the W&B run ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "run `wandb login`, set WANDB_MODE=offline, or drop --wandb_project"
        ) from None
    # The x axis is our step, not W&B's own counter: a resumed run logs again the steps after its
    # checkpoint.
    run.define_metric("*", step_metric="step")
    return run


def set_aside(path):
    """Renames path (log.txt) to the first free log.1.txt, log.2.txt, ... beside it; returns the new
    name."""
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(f"{stem}.{n}{ext}"):
        n += 1
    os.rename(path, f"{stem}.{n}{ext}")
    return f"{stem}.{n}{ext}"


def rewrite_log(log_file, start_step):
    """On resume, keep only the log lines of the steps before start_step: the run repeats the rest.
    """
    lines = []
    if start_step > 0 and os.path.exists(log_file):
        with open(log_file) as f:
            lines = [
                ln
                for ln in f
                if ln.split()[:1] and ln.split()[0].isdigit() and int(ln.split()[0]) < start_step
            ]
    files.write_atomic(log_file, lambda f: f.writelines(lines), mode="w")
