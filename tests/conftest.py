"""Shared test setup: the repository's paths, its small real data (tests/data), and a runner for the real CLIs.

The GPT-2 tokenizer comes from tiktoken, which downloads it once; offline, point TIKTOKEN_CACHE_DIR at a
folder that holds its files (.ci/run does)."""
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
