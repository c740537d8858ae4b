"""
What each flag of every command accepts, in argparse's own terms: a `type=` that turns the text into
the value or says in one line why it cannot (number, path, text), `choices=` for fixed words; and
Parser, whose errors are one UserError line. Every value is checked before any device or
process-group setup, so that a typo costs nothing."""

import argparse
import dataclasses
import math
import os
import re

from plumbing import errors

INT64_MAX = 2**63 - 1  # every integer flag ends up in a tensor or a C long somewhere


def number(kind, lo, hi=math.inf, lo_open=False, hi_open=False, also=(), hint=""):
    """The type of an int or a (finite) float in [lo, hi] (lo_open/hi_open: without that bound; an
    int is at most INT64_MAX), or one of the words `also` ("auto") as it is; hint ends its
    errors."""
    hi = min(hi, INT64_MAX) if kind is int else hi
    alt = "".join(f" or {word}" for word in also)
    if kind is int and (lo, hi) == (0, 1):
        low = high = "be 0 or 1"
    elif hi < math.inf and kind is float:
        low = high = f"be in {'[('[lo_open]}{lo}, {hi}{'])'[hi_open]}"
    else:
        high = f"be {'below' if hi_open else 'at most'} {hi}"
        positive = lo == 0 if lo_open else (kind, lo) == (int, 1)
        low = "be positive" if positive else "not be negative" if lo == 0 else f"be at least {lo}"

    def parse(text):
        if text in also:
            return text
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or kind is float and not math.isfinite(value):
            kind_words = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"must be {kind_words}{alt}, got {text!r}{hint}")
        too_low = value <= lo if lo_open else value < lo
        if too_low or (value >= hi if hi_open else value > hi):
            must = low if too_low else high
            raise argparse.ArgumentTypeError(f"must {must}{alt}, got {value}{hint}")
        return value
    return parse


POSITIVE, COUNT, BIT = number(int, 1), number(int, 0), number(int, 0, 1)  # COUNT: 0 or more
SEED = number(int, 0, 2**32 - 1)  # numpy's and torch's seeds


def text(value):
    """The type of text that is not empty."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def path(kind, also=(), hint=""):
    """The type of a path of this kind (see path_problem), or one of the words `also` as it is."""
    def parse(value):
        if value not in also and (problem := path_problem(value, kind)):
            raise argparse.ArgumentTypeError(problem + hint)
        return value
    return parse


def path_problem(path, kind):
    """What is wrong with path as a `kind` path, or None; nothing is created. kind: "file", "dir",
    "exists" (either), "out_dir" (a directory to write into: one that is writable, or one that can
    be created), "out_file" (a file to write: its folder exists and is writable), "name" (a part of
    file names: no folders)."""
    if not path:
        return "must not be empty"
    if kind in ("file", "dir", "exists"):
        if not os.path.exists(path):
            return f"{path} does not exist"
        if kind == "file" and os.path.isdir(path):
            return f"{path} is a directory, not a file"
        if kind == "dir" and not os.path.isdir(path):
            return f"{path} is not a directory"
        return None
    if kind == "name":  # a part of a file name: no folders in it
        return (f"{path} must be a plain name, without / or .."
                if os.sep in path or path in (".", "..") else None)
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


class Parser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a missing value, a value its type or choices refuse)
    are one UserError line naming the flag, pointing at --help where it names no fix itself;
    --help shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        message = re.sub(r"^argument (--\w+)(/-\w+)?: ", r"\1 ", message)
        message = re.sub(  # Python 3.11 quotes the choices, 3.12.8 does not
            r"^(--\w+) invalid choice: (.*) \(choose from (.*)\)$",
            lambda m: f"unknown {m[1]} {m[2]}; use {m[3].replace(chr(39), '')}", message)
        if "; " not in message:
            message += f"; see {self.prog} --help"
        # one line, whatever was typed
        raise errors.UserError("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


def arg(default, accepts, help):
    """A config field that is a flag: its default, what it accepts (a type, choices, or None: any
    text) and its help, kept as add_argument's keywords: they build the parser, and they check a
    config built in Python."""
    kind = "choices" if isinstance(accepts, tuple) else "type"
    return dataclasses.field(default=default, metadata={kind: accepts, "help": help})


def check_seq_len(seq_len, block_size):
    """--seq_len against the model's block size (its position table has no row past it)."""
    if seq_len > block_size:
        raise errors.UserError(f"--seq_len {seq_len} is larger than the model's block size "
                               f"{block_size}; use --seq_len {block_size} or less")
