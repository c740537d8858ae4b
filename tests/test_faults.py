"""Faults during a run, injected at a chosen step (issue 41).
- Token files changed underneath a run: a train shard truncated or rewritten in place ends the run with one line
  naming it, its last checkpoint intact (a memory-mapped shard died of SIGBUS, or mixed old and new tokens); one
  replaced by a new file renamed over it is read as it was, to the same weights as an undisturbed run, and the
  resume check names the change later.
- A rank killed (-9) under torchrun with restarts allowed: torchrun restarts the group, which resumes from the
  last checkpoint and ends bit-equal to an uninterrupted run (before runtime.rendezvous, the restarted group read
  the previous round's addresses in torchrun's store and failed or hung in init_process_group)."""
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_ddp import torchrun
from test_train import assert_same_weights, weights

from conftest import ROOT, run_cli

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "2", "--seq_len", "32",
        "--total_batch_size", "64", "--warmup_steps", "2", "--val_tokens", "256", "--sample_every", "0",
        "--device", "cpu", "--compile", "off", "--max_steps", "6", "--eval_every", "3", "--checkpoint_every", "2"]


def train_args(data, log_dir, *extra):
    return ["train_gpt2.py", "--data", data, "--log_dir", log_dir, *TINY, *extra]


def run_and_act(args, pattern, act):
    """Starts training, waits until stdout prints a line with pattern, then stops the run (SIGSTOP), calls act()
    and lets it go on (SIGCONT): the fault lands while the run is under way, however slow the machine.
    Returns (exit code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if pattern in line:
            proc.send_signal(signal.SIGSTOP)
            act()
            proc.send_signal(signal.SIGCONT)
            break
    rest, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + rest, err


def test_a_token_file_reads_what_the_array_holds(tmp_path):
    # TokenFile against numpy's own indexing of the same tokens: slices (empty, past the end, stepped, reversed),
    # single tokens (negative, numpy integers), and IndexError past either end
    from plumbing import token_files
    tokens = np.random.default_rng(0).integers(0, 50257, 1000, dtype=np.uint16)
    np.save(tmp_path / "x_train_000001.npy", tokens)
    f = token_files.load_tokens(str(tmp_path / "x_train_000001.npy"))
    for index in (slice(None), slice(10, 20), slice(990, 2000), slice(5, 2), slice(None, None, 3),
                  slice(None, None, -1), slice(-7, None)):
        assert np.array_equal(f[index], tokens[index]), index
    for i in (0, 999, -1, -1000, np.uint16(999), np.int32(-3)):
        assert f[i] == tokens[i], i
    for i in (1000, -1001):
        with pytest.raises(IndexError):
            f[i]
    assert np.array_equal(np.asarray(f), tokens) and len(f) == len(tokens)


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
    assert_same_weights(weights(tmp_path / "log" / "model_00002.pt"), weights(undisturbed / "model_00002.pt"))


def test_a_shard_replaced_by_rename_is_read_as_it_was(tiny_shards, undisturbed, tmp_path):
    data, train = copy_of(tiny_shards, tmp_path)

    def replace():  # a new file written beside, then renamed over the old one (fineweb.py writes so)
        for p in train:
            np.save(p.with_suffix(".tmp.npy"), np.load(p)[: len(np.load(p)) // 2])
            os.replace(p.with_suffix(".tmp.npy"), p)
    rc, _, err = run_and_act(train_args(data, tmp_path / "log"), "step     2 | loss", replace)
    assert rc == 0, err
    assert_same_weights(weights(tmp_path / "log" / "model_00006.pt"), weights(undisturbed / "model_00006.pt"))
    # resuming on the new files is refused in one line, naming the data
    out = run_cli(*train_args(data, tmp_path / "log", "--resume", "auto", "--max_steps", "8"))
    assert out.returncode == 2 and "holds other files" in out.stderr, out.stderr


KILL = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import train_gpt2 as tg
real, steps = tg.train_step, []
def step(*args, **kwargs):  # rank KILL_RANK kills itself (-9) after its KILL_AT-th step, in the first round only
    out = real(*args, **kwargs)
    steps.append(1)
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == os.environ["KILL_RANK"] \
            and len(steps) == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return out
tg.train_step = step
tg.main(sys.argv[2:])
"""
RANKS = ["--max_steps", "10", "--eval_every", "5", "--checkpoint_every", "2", "--total_batch_size", "128",
         "--resume", "auto"]


@pytest.fixture(scope="module")
def two_ranks(tiny_shards, tmp_path_factory):
    """An uninterrupted 2-rank run, and the script that kills a rank."""
    d = tmp_path_factory.mktemp("two_ranks")
    (d / "kill.py").write_text(KILL)
    out = torchrun(2, d / "kill.py", ROOT, *train_args(tiny_shards, d / "whole", *RANKS)[1:],
                   env={**os.environ, "KILL_RANK": "-1", "KILL_AT": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    return d


@pytest.mark.parametrize("rank", [0, 1])
def test_a_killed_rank_restarts_under_torchrun_and_ends_as_an_uninterrupted_run(tiny_shards, two_ranks, tmp_path,
                                                                                 rank):
    out = torchrun(2, "--max-restarts=1", two_ranks / "kill.py", ROOT,
                   *train_args(tiny_shards, tmp_path / "log", *RANKS, "--dist_timeout", "1")[1:],
                   env={**os.environ, "KILL_RANK": str(rank), "KILL_AT": "5"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed at step 4" in out.stdout  # the last checkpoint before the kill at step 5
    assert_same_weights(weights(tmp_path / "log" / "model_00010.pt"), weights(two_ranks / "whole" / "model_00010.pt"))


def test_rendezvous_gives_each_round_of_restarts_its_own_corner_of_torchruns_store(monkeypatch, capsys):
    # one node: keys written through the store rendezvous gives land under the round's prefix in torchrun's store
    # (a TCPStore server stands in for torchrun's); several nodes: env:// and, with restarts allowed, one line
    import datetime

    import torch.distributed as dist

    from plumbing import runtime
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=datetime.timedelta(seconds=30))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    kw = runtime.rendezvous(0, 2, 5)
    assert (kw["rank"], kw["world_size"], kw["timeout"]) == (0, 2, datetime.timedelta(minutes=5))
    kw["store"].set("addr", "here")
    assert server.get("round3/addr") == b"here" and not server.check(["addr"])
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert runtime.rendezvous(0, 4, 5) == dict(timeout=datetime.timedelta(minutes=5))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in err[0]
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # the variable set: torchrun's stores are new
    assert runtime.rendezvous(0, 4, 5) == dict(timeout=datetime.timedelta(minutes=5))
    assert capsys.readouterr().err == ""
