"""
SIGTERM and SIGINT (a preemption, Ctrl-C) as a clean stop: the step in progress finishes, every rank
agrees on the same step, a checkpoint is written, and the program exits with the signal's code."""

import functools
import os
import signal

import torch
import torch.distributed as dist


class StopSignal:
    """SIGTERM/SIGINT (preemption, Ctrl-C) ask for a clean stop: the step in progress finishes, a
    checkpoint is written, and the program exits with 128 + the signal number (143 for SIGTERM, 130
    for SIGINT), which schedulers tell from success. A second signal gets the default behaviour:
    exit at once. Under torchrun a repeated SIGTERM is expected (the scheduler signals every process
    and torchrun forwards its own), so there only a second Ctrl-C exits at once."""

    def __init__(self, ddp=False):
        self.signum = 0
        self.ddp = ddp
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        """The signal handler: note the signal; the loop stops after its step."""
        if self.signum:
            return  # a repeated SIGTERM under torchrun: already stopping
        self.signum = signum
        for s in (signal.SIGINT,) if self.ddp else (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
        # os.write, not print: a handler may interrupt a print in progress
        os.write(2, f"{signal.Signals(signum).name}: finishing this step, then writing a "
                    "checkpoint (signal again to exit at once)\n".encode())


def keeps_signal_handlers(fn):
    """fn (train), with the SIGTERM and SIGINT handlers put back as they were when it returns or
    raises: a notebook or a sweep that calls train() keeps its Ctrl-C."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return fn(*args, **kwargs)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return wrapper


def agree_on_signal(signum, rt):
    """The signal that stops every rank (0: none): the largest any rank received, so that all ranks
    stop at the same step and exit with the same code, whichever of them got it."""
    if not rt.ddp:
        return signum
    agreed = torch.tensor(signum, device=rt.device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return int(agreed.item())
