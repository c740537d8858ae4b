"""Docs that cannot drift from the code.

- docs/flags.md is every command's flags, defaults and help texts, generated from the parsers themselves
  (`python tests/test_docs.py` rewrites it); the test fails when it differs from what the code declares.
- Every command line in the README's and the docs' shell blocks (train_gpt2.py and its subcommands,
  hellaswag.py, fineweb.py, the benches, under python or torchrun) is parsed by the command's own parser and
  its values checked against their flags' domains (paths excepted: the docs name files of the reader's), and
  a training command's batch arithmetic against its world size. A renamed or mistyped flag fails here.
- The README's first command, the quickstart, runs as written but for fewer steps (it is the one command
  every newcomer runs).
- The lecture keeps the shape docs/training.md promises, as bench/lecture_metrics.py measures it."""
import argparse
import importlib
import os
import re
import shlex
import sys

import pytest

from conftest import ROOT, run_cli
from plumbing import flags

sys.path.insert(0, str(ROOT / "bench"))

COMMANDS = {  # name: (module, the argv prefix its main() takes)
    "train_gpt2.py": ("train_gpt2", []), "train_gpt2.py sample": ("train_gpt2", ["sample"]),
    "train_gpt2.py export": ("train_gpt2", ["export"]), "train_gpt2.py plot": ("train_gpt2", ["plot"]),
    "train_gpt2.py evaluate": ("train_gpt2", ["evaluate"]), "hellaswag.py": ("hellaswag", []),
    "fineweb.py": ("fineweb", []), "bench/bench_train.py": ("bench_train", []),
    "bench/bench_fsdp.py": ("bench_fsdp", []), "bench/bench_hellaswag.py": ("bench_hellaswag", []),
    "bench/bench_fineweb.py": ("bench_fineweb", []), "bench/bench_muon.py": ("bench_muon", []),
    "bench/bench_budget.py": ("bench_budget", []),
}
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


class Parsed(Exception):
    """Raised instead of running the command: its parser and the parsed flags."""

    def __init__(self, parser, args):
        self.parser, self.flags = parser, args


def parse(command, argv):
    """(parser, args) of `command argv`, the command stopped right after its parser ran: each value checked by its
    flag's type and choices, but for paths (the docs name files of the reader's)."""
    module, prefix = COMMANDS[command]
    original, path_problem = flags.Parser.parse_args, flags.path_problem

    def stop(self, args=None, namespace=None):
        raise Parsed(self, original(self, args, namespace))
    flags.Parser.parse_args, flags.path_problem = stop, lambda path, kind: None
    try:
        importlib.import_module(module).main([*prefix, *argv])
    except Parsed as p:
        return p.parser, p.flags
    finally:
        flags.Parser.parse_args, flags.path_problem = original, path_problem
    raise AssertionError(f"{command} ran without parsing its flags")


def default_text(value):
    if value is None or value is argparse.SUPPRESS:
        return "(none)" if value is None else "(required)"
    if value == os.cpu_count() and not isinstance(value, bool):
        return "number of cores"
    if isinstance(value, str) and value.startswith(str(ROOT) + os.sep):  # a file of the clone, wherever it is
        value = os.path.relpath(value, ROOT)
    return f"`{value}`" if value != "" else '`""`'


def flags_markdown():
    out = ["# Every flag of every command\n",
           "Generated from the parsers (`python tests/test_docs.py` rewrites this page; `tests/test_docs.py` fails "
           "when it differs from the code). What each flag accepts is checked before anything starts: a value "
           "outside it is one `error:` line and exit 2.\n"]
    for command in COMMANDS:
        parser = capture_parser(command)
        out.append(f"\n## `{command}`\n\n{parser.description or ''}\n\n| flag | default | meaning |\n|---|---|---|")
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = " ".join((action.help or "").replace("%%", "%").replace("(default: %(default)s)", "").split())
            out.append(f"| `{action.option_strings[0]}` | {default_text(action.default)} | {text.replace('|', '/')} |")
    return "\n".join(out) + "\n"


def capture_parser(command):
    """The command's parser, built as the command builds it (a valid command line is not needed: the parser is
    taken before it parses)."""
    module, prefix = COMMANDS[command]
    original = flags.Parser.parse_args

    def stop(self, args=None, namespace=None):
        raise Parsed(self, None)
    flags.Parser.parse_args = stop
    try:
        importlib.import_module(module).main([*prefix])
    except Parsed as p:
        return p.parser
    finally:
        flags.Parser.parse_args = original
    raise AssertionError(f"{command} has no flags.Parser")


def test_the_lecture_keeps_the_shape_the_docs_promise():
    # docs/training.md: the lecture light (bytes), every product file at most 100 columns wide, each
    # plumbing module small, train() short, and at least 0.25 comment lines per line of code in the
    # model and in the training loop (issue 33's bounds)
    import lecture_metrics as lm
    m = lm.measure(ROOT / "train_gpt2.py")
    assert m["bytes"] <= lm.LECTURE_BYTES, f"train_gpt2.py: {m['bytes']:,} bytes"
    assert 0 < m["plumbing modules imported"] <= lm.LECTURE_IMPORTS, m  # issue 39: 21 before
    assert int(m["longest function"].split()[1]) <= 80, m["longest function"]  # "train() 72 lines"
    model = next((v for k, v in m.items() if k.strip().startswith("1. The model")), None)
    assert model is not None, f"no '1. The model' section header in train_gpt2.py: {list(m)}"
    assert model >= 0.25 and m["in the training loop"] >= 0.25, m
    for path in lm.product_files():
        f = lm.measure(path)
        assert f["widest line"] <= lm.WIDTH, f"{path.name}: a line of {f['widest line']} columns"
        if path.parent.name == "plumbing":
            assert f["bytes"] <= lm.MODULE_BYTES and f["lines"] <= lm.MODULE_LINES, (path.name, f)


def test_flags_page_is_what_the_parsers_declare():
    page = (ROOT / "docs" / "flags.md").read_text()
    assert page == flags_markdown(), "docs/flags.md is stale: run python tests/test_docs.py"


def documented_commands():
    """(file, line, command, argv, nproc) of every command line in the docs' shell blocks."""
    found = []
    for path in DOCS:
        fence = False
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                fence = line.strip() in ("```bash", "```sh")
                continue
            if not fence or not line.strip() or line.lstrip().startswith("#"):
                continue
            for part in re.split(r"\s&&\s", line):
                words = shlex.split(part, comments=True)
                if not words or words[0] not in ("python", "python3", "torchrun") or "..." in words:
                    continue  # not a command, or one with its flags elided
                nproc = next((int(w.split("=")[1]) for w in words if w.startswith("--nproc_per_node=")), 1)
                nnodes = next((int(w.split("=")[1]) for w in words if w.startswith("--nnodes=")), 1)
                script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
                if script is None:
                    continue
                rest = words[script + 1:]
                name = words[script]
                if name == "train_gpt2.py" and rest and rest[0] in ("sample", "export", "plot", "evaluate"):
                    name, rest = f"{name} {rest[0]}", rest[1:]
                if name in COMMANDS:
                    found.append((path.name, n, name, rest, nproc * nnodes))
    return found


CASES = documented_commands()


def test_the_docs_show_every_command():
    assert {c for _, _, c, _, _ in CASES} >= {"train_gpt2.py", "train_gpt2.py sample", "train_gpt2.py export",
                                               "train_gpt2.py plot", "train_gpt2.py evaluate", "hellaswag.py",
                                               "fineweb.py", "bench/bench_train.py"}


@pytest.mark.parametrize("where, line, command, argv, world", CASES,
                         ids=[f"{w}:{n}" for w, n, _, _, _ in CASES])
def test_documented_command_parses_and_its_values_are_in_their_domains(where, line, command, argv, world):
    import train_gpt2 as tg
    _, args = parse(command, argv)  # a value outside its flag's domain is a UserError here
    if command == "train_gpt2.py":
        batch = None if args.batch_size == "auto" else int(args.batch_size)
        tg.grad_accum_steps(args.total_batch_size, batch, args.seq_len, world)  # a UserError if it does not divide


def test_the_quickstart_runs_as_written(tmp_path):
    """The README's first command, as written, but for 2 steps and every periodic event in them."""
    first = next(c for c in CASES if c[0] == "README.md" and c[2] == "train_gpt2.py")
    argv = [*first[3], "--max_steps", "2", "--eval_every", "2", "--sample_every", "2", "--checkpoint_every", "2",
            "--log_dir", tmp_path / "log"]
    out = run_cli("train_gpt2.py", *argv)
    assert out.returncode == 0, out.stderr
    assert "step     2 | val loss" in out.stdout and "sample 0:" in out.stdout
    assert (tmp_path / "log" / "model_00002.pt").is_file()


if __name__ == "__main__":
    (ROOT / "docs" / "flags.md").write_text(flags_markdown())
    print("wrote docs/flags.md")
