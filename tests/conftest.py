"""Shared test setup: the repository's paths, its small real data (tests/data), and a runner for the real CLIs.

The GPT-2 tokenizer comes from tiktoken, which downloads it once; offline, point TIKTOKEN_CACHE_DIR at a
folder that holds its files (.ci/run does)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"  # small real samples with their sources and licenses (see its README)
HELLASWAG = DATA / "hellaswag_val_300.jsonl"
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (python -m pytest -m cuda tests); skipped without one")
    # Inductor compiles in one process here and in every program the tests start: on 2 cores its pool of compile
    # workers costs each compiled run more to start (~0.7 s) than it saves; the code it generates is the same
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Runs `python <args>` from the repo root as a real subprocess; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


IN_ONE_PROCESS = """
import hashlib, importlib, io, json, os, pathlib, sys, tempfile, traceback, warnings
commands, watched, results = json.loads(pathlib.Path(sys.argv[1]).read_text()), sys.argv[2], {}
for name, command in commands.items():
    script, *argv = command["argv"]
    main = importlib.import_module(pathlib.Path(script).stem).main
    # what `python <script> <argv>` writes to stdout and stderr (file descriptors 1 and 2: C libraries'
    # output too), and its exit code; each command sees Python's warnings afresh, as a new process would
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, warnings.catch_warnings():
        sys.stdin = io.StringIO(command.get("stdin", ""))
        saved = {}
        for fd, f in ((1, out), (2, err)):
            (sys.stdout, sys.stderr)[fd - 1].flush()
            saved[fd] = os.dup(fd)
            os.dup2(f.fileno(), fd)
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code or 0
        except BaseException:
            traceback.print_exc()  # as the interpreter would
            code = 1
        finally:
            for fd in (1, 2):
                (sys.stdout, sys.stderr)[fd - 1].flush()
                os.dup2(saved[fd], fd)
                os.close(saved[fd])
        results[name] = {"code": code, **{k: (f.seek(0), f.read().decode())[1]
                                          for k, f in (("stdout", out), ("stderr", err))}}
    if watched:
        results[name]["tree"] = {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
                                 for p in pathlib.Path(watched).rglob("*") if p.is_file()}
pathlib.Path(sys.argv[3]).write_text(json.dumps(results))
"""


def run_in_one_process(commands, tmp_dir, watched=""):
    """Runs command lines that train nothing, {name: ["train_gpt2.py", *argv], or {"argv": [...], "stdin": text}},
    each as `python <script> <argv>` would run it (its main(argv)), one after the other in one Python process: one
    interpreter start and torch import instead of one a command. Returns {name: {"code", "stdout", "stderr"}}, with
    "tree" (watched's files and their hashes after the command) where watched is given."""
    commands = {k: {"argv": [str(a) for a in v]} if isinstance(v, list) else v for k, v in commands.items()}
    (tmp_dir / "commands.json").write_text(json.dumps(commands))
    out = run_cli("-c", IN_ONE_PROCESS, tmp_dir / "commands.json", watched, tmp_dir / "results.json")
    assert out.returncode == 0, out.stderr
    return json.loads((tmp_dir / "results.json").read_text())


@pytest.fixture(scope="session")
def small_text(tmp_path_factory):
    """The first 60k characters of Tiny Shakespeare: real text, quick to tokenize."""
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text((ROOT / "input.txt").read_text()[:60000])
    return path


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """A shard directory (fineweb.py's layout) of Tiny Shakespeare: one val shard and three train shards of a
    few hundred tokens, so that a few training steps go through several epochs."""
    import numpy as np
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    text = (ROOT / "input.txt").read_text()
    d = tmp_path_factory.mktemp("shards")
    pieces = [("val", text[:20000]), ("train", text[20000:21200]), ("train", text[21200:22000]),
              ("train", text[22000:23000])]
    for i, (split, chunk) in enumerate(pieces):
        np.save(d / f"edufineweb_{split}_{i:06d}.npy", np.array(enc.encode_ordinary(chunk), dtype=np.uint16))
    return d


# Runs that tests in several files check (each is a process start and training steps; CI has 2 cores)


@pytest.fixture(scope="session")
def reference(small_text, tmp_path_factory):
    """test_train.py's uninterrupted 8-step run of its tiny model: the run its killed and resumed runs must
    reproduce bit for bit, and the tiny model test_notebook.py plays with."""
    import test_train
    return test_train.uninterrupted(tmp_path_factory, "reference", small_text)


@pytest.fixture(scope="session")
def one_process(small_text, tmp_path_factory):
    """test_ddp.py's ARGS trained by one process, in the directory "one" of a folder of its own: what 2 ranks
    (test_ddp.py, which adds its runs beside it) and 2 nodes of 2 ranks (test_multinode.py) must log."""
    import test_ddp
    log_dir = tmp_path_factory.mktemp("ddp") / "one"
    out = run_cli("train_gpt2.py", "--data", small_text, "--log_dir", log_dir, *test_ddp.ARGS)
    assert out.returncode == 0, out.stderr
    assert "1 ranks x 4 accumulation steps" in out.stdout
    return log_dir
