"""Nothing silently wrong: what a resumed run may change, files that are never lost, signal handlers that are put
back, and input files refused at load. In-process (train_gpt2.main(argv)) on a tiny model, so the whole file
takes seconds; the subprocess runs of tests/test_train.py cover the same paths end to end."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt2 as tg
from conftest import ROOT
from plumbing import checkpoints, errors, files, mfu, runlog, token_files, train_flags

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--batch_size", "2", "--seq_len", "32",
        "--total_batch_size", "128", "--warmup_steps", "2", "--max_lr", "1e-3", "--val_tokens", "256",
        "--sample_every", "0", "--device", "cpu", "--compile", "off", "--eval_every", "0"]


def run(argv, capsys):
    """train_gpt2.main(argv) in this process: (exit code, stdout, stderr)."""
    try:
        tg.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text((ROOT / "input.txt").read_text()[:30000])
    return path


@pytest.fixture(scope="module")
def run4(text, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4: what the resumes below continue."""
    log_dir = tmp_path_factory.mktemp("run4")
    try:
        tg.main([*TINY, "--data", str(text), "--log_dir", str(log_dir), "--max_steps", "4", "--checkpoint_every", "2"])
    except SystemExit as e:
        raise AssertionError(f"exit {e.code}") from None
    return log_dir


REFUSED = {  # flag changed on resume: the one line it must get
    "seq_len": (["--seq_len", "16", "--total_batch_size", "64"],
                "{ck} was trained with --seq_len 32, not 16 (the data position counts seq_len-token blocks, and a "
                "shuffled epoch permutes them); resume with --seq_len 32, or start a new run from its weights: "
                "--init_from {ck} and another --log_dir"),
    "seed": (["--seed", "5"], "{ck} was trained with --seed 1337, not 5 (the data order and the samples come from "
             "it); resume with --seed 1337, or start a new run from its weights: --init_from {ck} and another "
             "--log_dir"),
    "model": (["--model", "gpt2-medium"], "{ck} was trained with --model gpt2, not gpt2-medium (the model's shape "
              "comes from it); resume with --model gpt2, or start a new run from its weights: --init_from {ck} and "
              "another --log_dir"),
    "data": (["--data", "{other}"], "{ck} was trained on --data {text}, and --data {other} holds other files (the "
             "data position counts tokens of these files); resume with --data {text}, or start a new run from its "
             "weights: --init_from {ck} and another --log_dir"),
    "max_steps behind": (["--max_steps", "1"], "{ck} is at step 2, past --max_steps 1; give --max_steps 2 or more"),
    "data changed in place": (["--data", "{changed}"], "{ck} was trained on --data {text}, and --data {changed} "
                              "holds other files (the data position counts tokens of these files); resume with "
                              "--data {text}, or start a new run from its weights: --init_from {ck} and another "
                              "--log_dir"),
    "shuffle": (["--shuffle", "1"], "{ck} was trained with --shuffle 0; resume with --shuffle 0 or without the flag"),
    "optimizer": (["--optimizer", "muon"], "{ck} was trained with --optimizer adamw, not muon (the checkpoint "
                  "holds that optimizer's state); resume with --optimizer adamw, or start a new run from its "
                  "weights: --init_from {ck} and another --log_dir"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_resume_refuses_a_change_that_repeats_or_skips_data_or_changes_the_model(case, run4, text, tmp_path,
                                                                                 capsys):
    other = tmp_path / "other.txt"
    other.write_text(text.read_text() + "more text")  # the same name elsewhere would pass: names and sizes count
    ck = run4 / "model_00002.pt"
    if case == "data changed in place":  # the checkpoint's --data, rewritten since: a copy of both, in one place
        ck = tmp_path / "model_00002.pt"
        ckpt = torch.load(run4 / "model_00002.pt", weights_only=True)
        ckpt["train_config"]["data"] = str(tmp_path / "changed.txt")
        torch.save(ckpt, ck)
    changed = tmp_path / "changed.txt"
    changed.write_text(text.read_text()[:-100])
    extra, message = REFUSED[case]
    fill = dict(ck=ck, text=changed if case == "data changed in place" else text, other=other, changed=changed)
    code, out, err = run([*TINY, "--data", text, "--log_dir", tmp_path / "log", "--max_steps", "4",
                          "--resume", ck, *[a.format(**fill) for a in extra]], capsys)
    assert (code, err.strip()) == (2, "error: " + message.format(**fill))
    assert not (tmp_path / "log").exists()


def test_resume_checks_the_bin_token_files_of_llmc_and_nanogpt(tmp_path, capsys):
    """A directory of .bin token files (nanoGPT's train.bin and val.bin here) counts as its files do:
    the same files continue, a rewritten one is refused. A checkpoint from before .bin files counted
    recorded none: it continues on its path, as any checkpoint from before data_files."""
    from plumbing import resume
    d = tmp_path / "owt"
    d.mkdir()
    for split in ("train", "val"):  # nanoGPT's prepare.py: raw uint16 ids
        np.arange(1000, dtype=np.uint16).tofile(d / f"{split}.bin")
    cfg = train_flags.TrainConfig(data=str(d))
    ckpt = dict(path="model_00002.pt", step=2, train_config=dict(data=str(d)),
                data_files=checkpoints.data_files(str(d)))
    resume.check(cfg, ckpt, master=True)
    np.arange(999, dtype=np.uint16).tofile(d / "val.bin")  # rewritten in place since the checkpoint
    with pytest.raises(errors.UserError, match=f"--data {d} holds other files"):
        resume.check(cfg, ckpt, master=True)
    old = dict(ckpt, data_files=[], train_config=dict(data="/elsewhere/owt"))
    resume.check(cfg, old, master=True)
    assert f"does not record its data files; continuing on --data {d}" in capsys.readouterr().out


def test_resume_on_the_same_files_elsewhere_continues(run4, text, tmp_path, capsys):
    moved = tmp_path / "moved" / text.name
    moved.parent.mkdir()
    moved.write_bytes(text.read_bytes())
    code, out, err = run([*TINY, "--data", moved, "--log_dir", tmp_path / "log", "--max_steps", "4",
                          "--checkpoint_every", "2", "--resume", run4 / "model_00002.pt"], capsys)
    assert code == 0, err
    for k, v in torch.load(run4 / "model_00004.pt", weights_only=True)["model"].items():
        assert torch.equal(v, torch.load(tmp_path / "log" / "model_00004.pt", weights_only=True)["model"][k]), k


def test_resume_applies_a_new_weight_decay_and_says_so(run4, text, tmp_path, capsys):
    code, out, err = run([*TINY, "--data", text, "--log_dir", tmp_path / "log", "--max_steps", "4",
                          "--checkpoint_every", "2", "--weight_decay", "0.5", "--max_lr", "2e-3",
                          "--resume", run4 / "model_00002.pt"], capsys)
    assert code == 0, err
    assert "resume: --weight_decay 0.5 (the checkpoint's was 0.1) applies from step 2" in out.splitlines()
    assert "resume: --max_lr 0.002 (the checkpoint's was 0.001) applies from step 2" in out.splitlines()
    ckpt = torch.load(tmp_path / "log" / "model_00004.pt", weights_only=True)
    # load_state_dict had put the saved 0.1 back: the optimizer must step with 0.5 (and no decay on biases)
    assert [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]] == [0.5, 0.0]
    assert ckpt["train_config"]["weight_decay"] == 0.5


def test_old_checkpoint_without_train_config_keys_still_resumes(run4, text, tmp_path, capsys):
    ckpt = torch.load(run4 / "model_00002.pt", weights_only=True)
    del ckpt["data_files"]
    for k in ("seq_len", "seed", "model", "data", "weight_decay", "optimizer"):
        del ckpt["train_config"][k]
    (tmp_path / "log").mkdir()
    torch.save(ckpt, tmp_path / "log" / "model_00002.pt")
    # from before --optimizer: AdamW's state, which Muon cannot continue
    code, out, err = run([*TINY, "--data", text, "--log_dir", tmp_path / "log", "--max_steps", "4",
                          "--resume", "auto", "--optimizer", "muon"], capsys)
    assert code == 2 and "was trained with --optimizer adamw, not muon" in err, err
    code, out, err = run([*TINY, "--data", text, "--log_dir", tmp_path / "log", "--max_steps", "4",
                          "--checkpoint_every", "2", "--resume", "auto"], capsys)
    assert code == 0, err
    for k, v in torch.load(run4 / "model_00004.pt", weights_only=True)["model"].items():
        assert torch.equal(v, torch.load(tmp_path / "log" / "model_00004.pt", weights_only=True)["model"][k]), k


def test_a_log_without_checkpoint_is_never_overwritten(text, tmp_path, capsys):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    earlier = "0 train 10.950000\n1 train 10.800000\n"  # a run killed before its first checkpoint
    (log_dir / "log.txt").write_text(earlier)
    args = [*TINY, "--data", text, "--log_dir", log_dir, "--max_steps", "1", "--checkpoint_every", "0"]
    code, out, err = run(args, capsys)
    assert code == 2 and err.strip() == (f"error: {log_dir}/log.txt holds the log of an earlier run that wrote no "
                                         "checkpoint; move it away or choose another --log_dir (--resume auto keeps "
                                         "it as log.1.txt and starts fresh)")
    assert (log_dir / "log.txt").read_text() == earlier
    code, out, err = run([*args, "--resume", "auto"], capsys)
    assert code == 0, err
    assert f"kept the log of an earlier run that wrote no checkpoint as {log_dir}/log.1.txt" in out
    assert (log_dir / "log.1.txt").read_text() == earlier
    assert [ln.split()[:2] for ln in (log_dir / "log.txt").read_text().splitlines()] == [["0", "train"]]


def test_train_puts_back_the_signal_handlers_and_the_log_dir_and_leaves_by_an_exception(text, tmp_path, monkeypatch, capsys):
    mine = {s: (lambda *a: None) for s in (signal.SIGTERM, signal.SIGINT)}  # a notebook's or a sweep's own
    before = {s: signal.getsignal(s) for s in mine}
    for s, handler in mine.items():
        signal.signal(s, handler)
    real_step = tg.train_step

    def step_then_sigterm(*args, **kwargs):  # the signal arrives during the first step
        os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)
    monkeypatch.setattr(tg, "train_step", step_then_sigterm)
    cfg = train_flags.TrainConfig(data=str(text), log_dir=str(tmp_path / "log"), n_layer=2, n_head=2, n_embd=32, batch_size=2,
                         seq_len=32, total_batch_size=128, max_steps=5, val_tokens=256, sample_every=0,
                         eval_every=0, device="cpu", compile="off")
    try:
        with pytest.raises(errors.Stopped) as stopped:
            tg.train(cfg)
        assert stopped.value.exit_code == 143 and (tmp_path / "log" / "model_00001.pt").exists()
        assert {s: signal.getsignal(s) for s in mine} == mine
        # its hold on --log_dir ended with it: a second train() in this process continues there
        code, out, err = run([*TINY, "--data", text, "--log_dir", tmp_path / "log", "--max_steps", "5", "--resume",
                              "auto"], capsys)
        assert code == 143 and {s: signal.getsignal(s) for s in mine} == mine, err
        assert sorted(p.name for p in (tmp_path / "log").iterdir()) == ["log.txt", "model_00001.pt", "model_00002.pt"]
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_second_run_on_a_log_dir_in_use_is_refused_in_one_line_and_touches_nothing(text, tmp_path, monkeypatch,
                                                                                      capsys):
    log_dir, second = tmp_path / "log", []
    real_step = tg.train_step

    def step_while_a_second_run_starts(*args, **kwargs):  # the same command started again, by hand or a scheduler
        if not second:
            (log_dir / "model_00009.pt.0123456789ab.tmp").write_bytes(b"a leftover the second run must not remove")
            before = {p.name: p.read_bytes() for p in log_dir.iterdir()}
            # in this process (flock locks belong to the open file: it contends with itself as another would)
            second.append(run([*TINY, "--data", text, "--log_dir", log_dir, "--max_steps", "2", "--resume", "auto"],
                              capsys))
            second.append(before == {p.name: p.read_bytes() for p in log_dir.iterdir()})
        return real_step(*args, **kwargs)
    monkeypatch.setattr(tg, "train_step", step_while_a_second_run_starts)
    code, out, err = run([*TINY, "--data", text, "--log_dir", log_dir, "--max_steps", "2", "--checkpoint_every", "1"],
                         capsys)
    assert code == 0, err
    (code, out, err), untouched = second
    assert code == 2 and untouched and err == (f"error: {log_dir} is in use by another run (pid {os.getpid()} on "
                                               f"host {socket.gethostname()}); wait for it to finish or choose "
                                               "another --log_dir\n")
    assert sorted(p.name for p in log_dir.iterdir()) == ["log.txt", "model_00001.pt", "model_00002.pt",
                                                         "model_00009.pt.0123456789ab.tmp"]


def test_write_atomic_gives_each_writer_its_own_temporary_file(tmp_path):
    target = tmp_path / "log.txt"
    temps = []

    def outer(f):  # a second writer of the same file starts while the first one is still writing
        temps.append(f.name)
        files.write_atomic(str(target), lambda g: (temps.append(g.name), g.write("second\n")), mode="w")
        f.write("first\n")
    files.write_atomic(str(target), outer, mode="w")
    assert len(set(temps)) == 2 and all(os.path.dirname(t) == str(tmp_path) for t in temps)
    assert target.read_text() == "first\n" and sorted(p.name for p in tmp_path.iterdir()) == ["log.txt"]

    def fails(f):
        f.write("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        files.write_atomic(str(target), fails, mode="w")
    assert target.read_text() == "first\n" and sorted(p.name for p in tmp_path.iterdir()) == ["log.txt"]


HOLD_AND_WRITE = """
import sys
from plumbing import checkpoints, files
files.DirLock(sys.argv[1], "--log_dir", checkpoints.LOG_DIR_FILES)  # held until this process ends
def write(f):  # a checkpoint half written when the process is killed
    f.write(b"half")
    f.flush()
    print("writing", flush=True)
    sys.stdin.readline()
files.write_atomic(sys.argv[1] + "/model_00007.pt", write)
"""
TARGETS = checkpoints.LOG_DIR_FILES


def test_a_held_folder_refuses_a_second_holder_and_its_next_holder_removes_the_leftovers(tmp_path, capsys):
    names = {  # name: whether it is a temporary of ours that no write will finish
        "model_00002.pt.0123456789ab.tmp": True,
        "model_00003.pt.other-node.0123456789ab.tmp": True,  # an earlier version's name, which said the machine
        "log.txt.0123456789ab.tmp": True,
        "notes.txt.0123456789ab.tmp": False,  # not a file this program writes there
        "model_00006.pt.bak": False,
        "model_00004.pt": False,
    }
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_WRITE, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "writing\n"
        for name in names:  # (earlier runs' leftovers, as far as the next holder can tell)
            (tmp_path / name).write_bytes(b"x" * 10)
        (tmp_path / "model_00008.pt.0123456789ab.tmp").mkdir()  # not a file: left alone
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
        with pytest.raises(errors.UserError) as refused:
            files.DirLock(str(tmp_path), "--log_dir", TARGETS)
        assert str(refused.value) == (f"{tmp_path} is in use by another run (pid {holder.pid} on host "
                                      f"{socket.gethostname()}); wait for it to finish or choose another --log_dir")
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing touched
    finally:
        holder.kill()  # kill -9, mid-write: the kernel drops its lock, its half file stays
        holder.wait()
    gone = sorted([n for n, go in names.items() if go] + [p.name for p in tmp_path.glob("model_00007.pt.*.tmp")])
    assert len(gone) == 4 and capsys.readouterr().out == ""
    with files.DirLock(str(tmp_path), "--log_dir", TARGETS):
        assert capsys.readouterr().out == (f"removed 4 temporary files that interrupted writes left in {tmp_path} "
                                           f"(34 bytes): {', '.join(gone[:3])} and 1 more\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [n for n, go in names.items() if not go] + ["model_00008.pt.0123456789ab.tmp"])


@pytest.mark.parametrize("why", ["no fcntl (Windows)", "ENOLCK (a file system without locks)"])
def test_without_locks_a_folder_is_used_unheld_and_nothing_is_removed(tmp_path, monkeypatch, capsys, why):
    # whether a temporary is a write in progress cannot be known: it stays
    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, "No locks available")
    if why.startswith("ENOLCK"):
        monkeypatch.setattr(files.fcntl, "flock", no_locks)
    else:
        monkeypatch.setattr(files, "fcntl", None)
    leftover = tmp_path / "log" / "model_00002.pt.0123456789ab.tmp"
    with files.DirLock(str(tmp_path / "log"), "--log_dir", TARGETS):
        leftover.write_bytes(b"x")
        with files.DirLock(str(tmp_path / "log"), "--log_dir", TARGETS):  # a second run is not refused
            files.write_atomic(str(tmp_path / "log" / "log.txt"), lambda f: f.write("ok\n"), mode="w")
    line = (f"cannot lock {tmp_path / 'log'} (no file locks here): a second run there is not refused, and the "
            "temporaries of interrupted writes there are left\n")
    assert capsys.readouterr().out == 2 * line
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == ["log.txt", leftover.name]


def test_only_rank_0_holds_the_log_dir_and_only_while_train_runs(text, tmp_path, monkeypatch):
    cfg, seen = train_flags.TrainConfig(data=str(text), log_dir=str(tmp_path / "log")), []
    held = runlog.holds_log_dir(lambda c: seen.append((tmp_path / "log" / ".lock").exists()))
    for rank in ("1", "0"):  # torchrun's RANK
        monkeypatch.setenv("RANK", rank)
        held(cfg)
    assert seen == [False, True] and not (tmp_path / "log").exists()  # released; the folder it made, gone


def test_a_text_file_is_tokenized_once(text, monkeypatch):
    enc, calls = token_files.get_encoding(), []

    class Counting:
        def encode_ordinary(self, t):
            calls.append(len(t))
            return enc.encode_ordinary(t)
    monkeypatch.setattr(token_files, "get_encoding", Counting)
    train, val = token_files.load_splits(str(text))
    assert len(calls) == 1
    tokens = enc.encode_ordinary(text.read_text())  # tiktoken directly: the splits are its tokens, 90/10
    assert np.array_equal(np.concatenate([train[0], val[0]]), tokens) and len(val[0]) == len(tokens) // 10


def test_a_shard_of_another_tokenizer_is_refused_at_load(tmp_path, capsys):
    d = tmp_path / "shards"
    d.mkdir()
    np.save(d / "x_val_000000.npy", np.arange(5000, dtype=np.uint16))
    ids = np.arange(5000, dtype=np.uint16)
    ids[1234] = 50300  # e.g. a shard of a tokenizer with a larger vocabulary
    np.save(d / "x_train_000001.npy", ids)
    code, out, err = run([*TINY, "--data", d, "--log_dir", tmp_path / "log", "--max_steps", "1"], capsys)
    assert (code, err.strip()) == (2, f"error: {d}/x_train_000001.npy holds token id 50300, but GPT-2's ids end at "
                                      "50256: it was made with another tokenizer; re-create it with fineweb.py")


def test_a_truncated_hugging_face_directory_is_one_line(tmp_path, capsys):
    from safetensors.torch import save_file
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(n_positions=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=32)))
    save_file({"wte.weight": torch.zeros(50257, 32)}, d / "model.safetensors")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000])  # a cut-off download
    code, out, err = run(["sample", "--checkpoint", d, "--device", "cpu"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {d}/model.safetensors cannot be read")


@pytest.mark.parametrize("remeasured", [1e15, 1.0])
def test_mfu_never_prints_above_100_percent_without_saying_why(text, tmp_path, monkeypatch, capsys, remeasured):
    # the start-up measurement of the CPU's peak undercut (another process was running): 1 FLOP/s
    first = iter([1.0])  # then measured again: now right, or still too low
    monkeypatch.setattr(mfu, "peak_flops", lambda rt: next(first, remeasured))
    code, out, err = run([*TINY, "--data", text, "--log_dir", tmp_path / "log", "--max_steps", "2",
                          "--checkpoint_every", "0"], capsys)
    assert code == 0, err
    steps = [ln for ln in out.splitlines() if "| MFU " in ln]
    mfus = [float(ln.split("| MFU ")[1].split("%")[0]) for ln in steps]
    assert len(steps) == 2
    if remeasured > 1:
        assert all(m <= 100 for m in mfus) and not any("above 100%" in ln for ln in steps)
    else:
        assert all(m > 100 and "% (above 100%: the CPU's measured peak is too low; was it busy?) |" in ln
                   for m, ln in zip(mfus, steps))
