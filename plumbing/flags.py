"""
What each flag of every command accepts, declared beside it (Flag), and argparse with its errors as
one line (FlagParser). Every value is checked before any device or process-group setup, so that a
typo costs nothing."""

import argparse
import dataclasses
import math
import os
import re

from plumbing import errors

INT64_MAX = 2**63 - 1  # every integer flag ends up in a tensor or a C long somewhere


class Flag:
    """What a flag accepts, declared next to it: its type, range, choices, or what kind of path it
    must be. parse() is argparse's type (text -> value, so that text that is no number is one line
    too); problem() says what is wrong with a value, for check_flags, which runs before any device
    or process-group setup.

    kind int or float (always finite), with lo/hi bounds (lo_open/hi_open: excluded), `also` other
    words it takes ("auto"); kind str with choices, or path: "file", "dir", "exists" (either),
    "out_dir" (a directory to write into: one that is writable, or one that can be created),
    "out_file" (a file to write: its folder exists and is writable), "name" (a part of file names:
    no folders). empty: whether "" is a value (never for paths). hint: appended to the message."""

    def __init__(self, kind=str, lo=None, hi=None, lo_open=False, hi_open=False, choices=None,
                 path=None, also=(), empty=False, hint=""):
        if kind is int and hi is None:
            hi = INT64_MAX
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.choices, self.path, self.also, self.empty, self.hint = choices, path, also, empty, hint

    def parse(self, text):
        """argparse's type: the text as the flag's kind (its extra words, such as auto, as they
        are)."""
        if self.kind is str or text in self.also:
            return text
        try:
            return self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if self.kind is int else 'a number'}"
                f"{' or ' + ' or '.join(self.also) if self.also else ''}, got {text!r}"
            ) from None

    def problem(self, name, value):
        """The message for flag --name with this value, or None where the value is in its domain."""
        message = self._problem(value)
        if message is None:
            return None
        if self.choices is not None and value not in self.choices and value != "":
            message = f"unknown --{name} {value}; use {', '.join(self.choices)}{self.hint}"
        else:
            message = f"--{name} {message}{self.hint}"
        # one line, whatever was typed
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)

    def _problem(self, value):
        """What is wrong with value, without the flag's name (problem() adds it), or None."""
        if value in self.also:
            return None
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(
                value, (int, float) if self.kind is float else int
            ):
                return f"must be {'an integer' if self.kind is int else 'a number'}, got {value!r}"
            if self.kind is float and not math.isfinite(value):
                return f"must be a finite number, got {value}"
            low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
            high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
            if (self.lo, self.hi) == (0, 1) and self.kind is int and (low or high):
                return f"must be 0 or 1, got {value}"
            if low or high:
                if self.kind is float and self.lo is not None and self.hi is not None:
                    left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
                    what = f"be in {left}{self.lo}, {self.hi}{right}"
                elif high:
                    what = f"be {'below' if self.hi_open else 'at most'} {self.hi}"
                elif self.lo == 0:
                    what = "be positive" if self.lo_open else "not be negative"
                else:
                    what = (
                        "be positive"
                        if self.lo == 1 and self.kind is int
                        else f"be at least {self.lo}"
                    )
                also = " or " + " or ".join(self.also) if self.also else ""
                return f"must {what}{also}, got {value}"
            return None
        if value == "" and not self.empty:
            return "must not be empty"
        if self.choices is not None and value not in self.choices:
            return "unknown"
        return path_problem(value, self.path) if self.path else None


def path_problem(path, kind):
    """What is wrong with path as a `kind` path (see Flag), or None. Nothing is created."""
    if kind in ("file", "dir", "exists"):
        if not os.path.exists(path):
            return f"{path} does not exist"
        if kind == "file" and os.path.isdir(path):
            return f"{path} is a directory, not a file"
        if kind == "dir" and not os.path.isdir(path):
            return f"{path} is not a directory"
        return None
    if kind == "name":  # a part of a file name: no folders in it
        return (
            f"{path} must be a plain name, without / or .."
            if os.sep in path or path in (".", "..")
            else None
        )
    folder = path if kind == "out_dir" else os.path.dirname(os.path.abspath(path))
    if kind == "out_file" and os.path.isdir(path):
        return f"{path} is a directory; give a file name"
    if kind == "out_file" and not os.path.isdir(folder):
        return f"{path}: its folder does not exist; create it or choose another"
    if kind == "out_dir":
        if os.path.exists(folder) and not os.path.isdir(folder):
            return f"{path} is a file, not a directory"
        # the directory is created later, inside the nearest one that exists
        while not os.path.exists(folder):
            folder = os.path.dirname(os.path.abspath(folder))
        if not os.path.isdir(folder):
            return f"{path} cannot be created: {folder} is a file"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{path} is not writable ({folder}); choose a writable place"
    return None


def check_flags(values, flags):
    """Each value against its Flag ({name: Flag}); values is an object with the flags as attributes.
    None is "not given" (the flags whose default is None). The first problem is the error."""
    for name, flag in flags.items():
        value = getattr(values, name)
        if value is not None and (message := flag.problem(name, value)):
            raise errors.UserError(message)


class FlagParser(argparse.ArgumentParser):
    """argparse with its errors (unknown flags, missing values, a value that is no number) as one
    UserError line instead of the usage text and exit 2; flag(name, Flag, default, help) adds a flag
    and notes its Flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.flags = {}

    def flag(self, name, flag, default=None, help="", **kwargs):
        """--name, parsed by its Flag and checked against it by parse()."""
        self.flags[name] = flag
        self.add_argument(f"--{name}", type=flag.parse, default=default, help=help, **kwargs)

    def error(self, message):
        """argparse's errors as one UserError line that points at --help (instead of the usage and
        exit 2)."""
        message = re.sub(r"^argument --(\w+)(/-\w+)?: ", r"--\1 ", message)
        raise errors.UserError(f"{message}; see {self.prog} --help")

    def parse(self, argv):
        """The flags, parsed and checked."""
        args = self.parse_args(argv)
        check_flags(args, self.flags)
        return args

    @classmethod
    def dataclass(cls, config_class, argv, **kwargs):
        """A config_class (whose fields are arg()s) from the command line argv, parsed, not yet
        checked: its own check (train_gpt2.check_config) runs once the world size is known."""
        parser = cls(**kwargs)
        for f in dataclasses.fields(config_class):
            parser.flag(f.name, f.metadata["flag"], f.default, f.metadata["help"])
        return config_class(**vars(parser.parse_args(argv)))


def arg(default, flag, help):
    """A config field with the one-line help that --help shows and the Flag that says what it
    accepts."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


def check_seq_len(seq_len, block_size):
    """--seq_len against the model's block size (its position table has no row past it)."""
    if seq_len > block_size:
        raise errors.UserError(
            f"--seq_len {seq_len} is larger than the model's block size {block_size}; use "
            f"--seq_len {block_size} or less"
        )
