"""--wandb_project in W&B's offline mode (no network): the run's files, read back, hold what log.txt holds plus
lr, grad norm and tok/s, and the config; a run killed and resumed continues the same W&B run."""
import json
import re
import signal
import struct

import pytest
import torch
from test_train import run_until, train_args

from conftest import run_cli

OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def wandb_records(path):
    """The records of a .wandb file: W&B's LevelDB-style log (a 7-byte header, then 32 KiB blocks of
    chunks, each with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # no room for a chunk header: the block is padded
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos: pos + 7])
        chunk += data[pos + 7: pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            records.append(pb.Record.FromString(chunk))
            chunk = b""
    return records


def offline_runs(log_dir):
    """[(run id, config dict, [history dicts])] of the offline runs in log_dir/wandb, oldest first."""
    runs = []
    for f in sorted((log_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run_id, config, history = None, {}, []
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run_id = rec.run.run_id
                config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        runs.append((run_id, config, history))
    return runs


def logged(history):
    """{(step, log.txt kind): value} of the W&B history: what log.txt would say."""
    kinds = {"train/loss": "train", "val/loss": "val", "hellaswag/acc_norm": "hella"}
    return {(h["step"], kinds[k]): v for h in history for k, v in h.items() if k in kinds}


def read_log(path):
    return {(int(s), k): float(v) for s, k, v in (ln.split() for ln in path.read_text().splitlines())}


def test_wandb_offline_logs_what_log_txt_logs_and_a_resumed_run_continues_it(small_text, tmp_path):
    pytest.importorskip("wandb")
    log_dir = tmp_path / "run"
    # preempted (SIGTERM: W&B flushes its files at exit; after kill -9 the offline files of that life are empty)
    rc, out, err = run_until(train_args(small_text, log_dir, "--wandb_project", "gpt2-test"), "step     4 | loss",
                             signal.SIGTERM, env=OFFLINE)
    assert rc == 143, err
    # the step in progress when the signal came finishes, then the checkpoint: step 6 if the signal came during
    # step 5, later on a machine too slow to deliver it by then; the line and the file name the same step
    stopped = int(re.search(r"stopped by signal at step (\d+)", out)[1])
    assert 6 <= stopped < 8, out
    run_id = torch.load(log_dir / f"model_{stopped:05d}.pt", weights_only=True)["wandb_id"]
    assert [r[0] for r in offline_runs(log_dir)] == [run_id]
    out = run_cli(*train_args(small_text, log_dir, "--resume", "auto", "--wandb_project", "gpt2-test"), env=OFFLINE)
    assert out.returncode == 0, out.stderr
    assert f"resumed at step {stopped}" in out.stdout
    runs = offline_runs(log_dir)
    assert [r[0] for r in runs] == [run_id, run_id]  # the resumed run continues the same W&B run
    assert torch.load(log_dir / "model_00008.pt", weights_only=True)["wandb_id"] == run_id
    config, history = runs[1][1], runs[0][2] + runs[1][2]
    assert config["max_steps"] == 8 and config["model_config"]["n_embd"] == 32 and config["world_size"] == 1
    # the W&B history of both lives is log.txt exactly
    assert logged(history) == read_log(log_dir / "log.txt")
    train_rows = [h for h in runs[1][2] if "train/loss" in h]
    assert [h["step"] for h in train_rows] == list(range(stopped, 8))
    for h in train_rows:  # and what stdout prints each step
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith(f"step {h['step']:5d} | loss"))
        assert f"lr {h['train/lr']:.4e}" in line and f"norm {h['train/grad_norm']:.4f}" in line
        # MFU is a measured CPU peak's share: above 100% only where that peak was measured low, and then the
        # line says so
        assert h["train/tok_per_s"] > 0 and h["train/mfu"] > 0
        assert h["train/mfu"] <= 100 or "above 100%: the CPU's measured peak is too low" in line, line


def test_wandb_missing_is_one_clear_line(small_text, tmp_path):
    hide = "import sys, train_gpt2; sys.modules['wandb'] = None; train_gpt2.main(sys.argv[1:])"
    out = run_cli("-c", hide, *train_args(small_text, tmp_path / "log", "--wandb_project", "x")[1:])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == "error: --wandb_project needs the wandb package: pip install wandb (or drop " \
                                 "--wandb_project)"
    assert not (tmp_path / "log").exists()  # refused before anything was written
