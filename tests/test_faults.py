"""Faults during a run, injected at a chosen step (issue 41): here the token files changed underneath a run.
A train shard truncated or rewritten in place ends the run with one line naming it, its last checkpoint intact
(a memory-mapped shard died of SIGBUS, or mixed old and new tokens); one replaced by a new file renamed over it
is read as it was, to the same weights as an undisturbed run, and the resume check names the change later."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "2", "--seq_len", "32",
        "--total_batch_size", "64", "--warmup_steps", "2", "--val_tokens", "256", "--sample_every", "0",
        "--device", "cpu", "--compile", "off", "--max_steps", "6", "--eval_every", "3", "--checkpoint_every", "2"]


def train_args(data, log_dir, *extra):
    return ["train_gpt2.py", "--data", data, "--log_dir", log_dir, *TINY, *extra]


def run_and_act(args, pattern, act):
    """Starts training, waits until stdout prints a line with pattern, then calls act() while the run goes on.
    Returns (exit code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if pattern in line:
            act()
            break
    rest, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + rest, err


@pytest.fixture(scope="module")
def undisturbed(tiny_shards, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("undisturbed")
    out = run_cli(*train_args(tiny_shards, log_dir))
    assert out.returncode == 0, out.stderr
    return log_dir


def copy_of(shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    return data, sorted(data.glob("*_train_*.npy"))


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def truncate(paths):  # as `> file` or a writer that opens with "wb" and has written nothing yet
    for p in paths:
        os.truncate(p, 128)


def rewrite(paths):  # np.save onto the same path: the same size, other tokens
    for p in paths:
        np.save(p, np.load(p)[::-1].copy())


@pytest.mark.parametrize("fault", [truncate, rewrite], ids=["truncated in place", "rewritten in place"])
def test_a_shard_changed_in_place_ends_the_run_in_one_line(tiny_shards, undisturbed, tmp_path, fault):
    data, train = copy_of(tiny_shards, tmp_path)
    rc, out, err = run_and_act(train_args(data, tmp_path / "log"), "step     2 | loss", lambda: fault(train))
    assert rc == 2, (rc, err[-2000:])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "changed while this run read it" in lines[0]
    assert any(str(p) in lines[0] for p in train), lines[0]
    # the checkpoint written before the fault is whole: the undisturbed run's, bit for bit
    assert same_weights(weights(tmp_path / "log" / "model_00002.pt"), weights(undisturbed / "model_00002.pt"))


def test_a_shard_replaced_by_rename_is_read_as_it_was(tiny_shards, undisturbed, tmp_path):
    data, train = copy_of(tiny_shards, tmp_path)

    def replace():  # a new file written beside, then renamed over the old one (fineweb.py writes so)
        for p in train:
            np.save(p.with_suffix(".tmp.npy"), np.load(p)[: len(np.load(p)) // 2])
            os.replace(p.with_suffix(".tmp.npy"), p)
    rc, _, err = run_and_act(train_args(data, tmp_path / "log"), "step     2 | loss", replace)
    assert rc == 0, err
    assert same_weights(weights(tmp_path / "log" / "model_00006.pt"), weights(undisturbed / "model_00006.pt"))
    # resuming on the new files is refused in one line, naming the data
    out = run_cli(*train_args(data, tmp_path / "log", "--resume", "auto", "--max_steps", "8"))
    assert out.returncode == 2 and "holds other files" in out.stderr, out.stderr
