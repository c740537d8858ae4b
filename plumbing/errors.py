"""
The errors every command reports the same way: a UserError is one line, `error: ...`, and exit code
2; a run stopped by a signal exits with 128 + its number; Ctrl-C before that with 130."""

import signal
import sys


class UserError(Exception):
    """Bad input from the user: every command's main() (train_gpt2.py's, hellaswag.py's,
    fineweb.py's, the benches') prints the message as one line, `error: ...`, and exits with code 2.
    """


class Stopped(Exception):
    """Training stopped for a signal, after writing a checkpoint: main() exits with 128 + the signal
    number."""

    def __init__(self, signum):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


def cli(main):
    """A command's entry point: main(argv) with a UserError as one line on stderr and exit code 2; a
    signal that stopped training (its checkpoint written) as the signal's exit code; Ctrl-C before
    that as 130, no traceback."""
    def run(argv=None):
        try:
            return main(sys.argv[1:] if argv is None else argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Stopped as e:
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    return run
