"""
What a run of hours or days needs around the training loop (train_gpt2.train), at the points the
loop calls it: the log (runlog.RunLog), checkpoints written and pruned, a clean stop on SIGTERM or
Ctrl-C, a stop on a diverged loss that names the last good checkpoint, out of memory as one line;
before it starts, the checks of what it will write; while it runs, its --log_dir held."""

import contextlib
import math
import os

import torch

from plumbing import checkpoints, errors, memory, runlog, runtime, signals, token_files


def check_run_outputs(cfg):
    """What the run will show and write, last of the checks (the tokenizer is loaded only once the
    flags are sound): the samples' prompt, the log directory (an earlier run's log is never
    overwritten), wandb's import (missing: said before anything is written)."""
    if cfg.sample_every and not token_files.get_encoding().encode(cfg.prompt,
                                                                   allowed_special="all"):
        raise errors.UserError("--prompt is empty; give some text for the samples (or "
                               "--sample_every 0)")
    runlog.check_log_dir(cfg)
    if cfg.wandb_project is not None:
        runlog.import_wandb()


def guards_the_run(train):
    """train(cfg) with rank 0 holding --log_dir until it ends (a second run there is refused), and
    the caller's SIGTERM and SIGINT handlers back afterwards (a notebook keeps its Ctrl-C)."""
    return runlog.holds_log_dir(signals.keeps_signal_handlers(train))


class LongRun:
    """The loop's machinery, for the training state s (train_gpt2.TrainState): log is the run's
    RunLog; checkpoint(step) writes model_<step>.pt; out_of_memory(step) around a step, after_step
    after it, stop_if_signalled(step) before the next; finish() at the end."""

    def __init__(self, cfg, rt, s):
        self.cfg, self.rt, self.s = cfg, rt, s
        self.log = runlog.RunLog(cfg, rt, s)  # log.txt, W&B, the console
        self.stop = signals.StopSignal(rt.ddp)  # SIGTERM/SIGINT: end the step, checkpoint, exit
        self.stop_for = 0  # the signal all ranks stop for (0: none)
        self.new_ckpt = None  # the newest checkpoint written, until a step shows its loss finite
        # what --data holds now, as the run opened it: what every checkpoint records, so that a file
        # replaced or added during the run is named when a resume finds it (docs/data.md)
        self.data_files = checkpoints.data_files(cfg.data)

    def path(self, step):
        return os.path.join(self.cfg.log_dir, f"model_{step:05d}.pt")

    def checkpoint(self, step):
        """model_<step>.pt: every rank takes part (FSDP gathers the shards), rank 0 writes it, then
        prunes the older ones (--keep_checkpoints)."""
        cfg, s = self.cfg, self.s
        checkpoints.save(self.path(step), s.model, s.optimizer, s.scaler, step, s.loader, cfg,
                         s.wandb_id, cfg.fsdp, self.data_files)
        self.new_ckpt = self.path(step)
        self.prune(step)

    def prune(self, step):
        if self.rt.master and self.cfg.keep_checkpoints:
            checkpoints.prune(self.cfg.log_dir, self.cfg.keep_checkpoints, step, self.s.last_good)

    @contextlib.contextmanager
    def out_of_memory(self, step):
        """Around a step: out of memory becomes one line naming the fixes."""
        try:
            yield
        except torch.OutOfMemoryError:
            raise memory.out_of_memory_error(step, self.s, self.cfg, self.rt) from None

    def after_step(self, step, loss):
        """After step's loss (a float) is known: the ranks agree on a signal any of them got, a
        non-finite loss stops the run, and the newest checkpoint, its weights just seen to give a
        finite loss, becomes the last good one (the one it replaces may be pruned now)."""
        self.stop_for = signals.agree_on_signal(self.stop.signum, self.rt)
        if not math.isfinite(loss):  # diverged: later steps would be wasted
            raise errors.UserError(f"the loss is {loss} at step {step}; stopping. Last good "
                                   f"checkpoint: {self.s.last_good or 'none'}; resume from it with "
                                   "a lower --max_lr")
        if self.new_ckpt and self.new_ckpt != self.s.last_good:
            self.s.last_good = self.new_ckpt
            self.prune(step)

    def stop_if_signalled(self, step):
        """If a signal came during the last step (on any rank): every rank checkpoints at step and
        leaves with the signal's exit code."""
        if not self.stop_for:
            return
        self.checkpoint(step)
        self.log.print(f"stopped by signal at step {step}; wrote {self.path(step)}; continue "
                       "with --resume auto")
        runtime.barrier(self.rt)  # no rank leaves before the checkpoint is written
        raise errors.Stopped(self.stop_for)

    def finish(self):
        """The end: the ranks leave together (a group torn down under others can abort), W&B is
        closed, a GPU's peak memory printed."""
        runtime.barrier(self.rt)
        self.log.finish()
