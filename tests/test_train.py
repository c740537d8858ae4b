"""train_gpt2.py as users run it: real subprocesses that train, get killed, resume, sample and export.
The references are independent: an uninterrupted run, transformers' forward pass, brute-force hashes."""
import dataclasses
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt2 as tg
from conftest import ROOT, run_cli, run_in_one_process
from plumbing import checkpoints, errors, hellaswag_eval, train_flags

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--batch_size", "2", "--seq_len", "32",
        "--total_batch_size", "128", "--warmup_steps", "3", "--max_lr", "1e-3", "--val_tokens", "256",
        "--sample_every", "0", "--device", "cpu", "--compile", "off"]


def train_args(data, log_dir, *extra, steps=8, tiny=TINY):
    return ["train_gpt2.py", "--data", data, "--log_dir", log_dir, *tiny, "--max_steps", str(steps),
            "--eval_every", "3", "--checkpoint_every", "2", *extra]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def uninterrupted(tmp_path_factory, name, data, tiny=TINY):
    """An uninterrupted 8-step run: the reference every interrupted run must reproduce bit for bit."""
    log_dir = tmp_path_factory.mktemp(name)
    out = run_cli(*train_args(data, log_dir, tiny=tiny))
    assert out.returncode == 0, out.stderr
    return log_dir


def test_log_format_and_checkpoints(reference):
    lines = (reference / "log.txt").read_text().splitlines()
    kinds = [(int(s), kind) for s, kind, _ in (ln.split() for ln in lines)]
    assert kinds == [(0, "val"), (0, "train"), (1, "train"), (2, "train"), (3, "val"), (3, "train"),
                     (4, "train"), (5, "train"), (6, "val"), (6, "train"), (7, "train"), (8, "val")]
    assert all(len(ln.split()[2].split(".")[1]) >= 6 for ln in lines)
    assert sorted(p.name for p in reference.glob("model_*.pt")) == [f"model_{s:05d}.pt" for s in (2, 4, 6, 8)]
    ckpt = torch.load(reference / "model_00008.pt", weights_only=True)
    assert ckpt["step"] == 8 and {"optimizer", "config", "loader", "rng", "scaler"} <= ckpt.keys()
    first, last = float(lines[0].split()[2]), float(lines[-1].split()[2])
    assert last < first  # it learns


def run_until(args, pattern, sig, cwd=ROOT, env=None):
    """Starts training, waits until stdout prints a line containing pattern, then sends sig.
    Returns (exit code, stdout so far)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if pattern in line:
            proc.send_signal(sig)
            break
    rest, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + rest, err


def test_sigkill_at_every_seam_then_resume_is_bit_identical(reference, small_text, tmp_path):
    """One run's lives, each killed (-9) at another seam and resumed with --resume auto: at step 1, before
    the first checkpoint or in its write (the next life finds none and starts over), right after a
    checkpoint and a step (step 4's), and at an evaluation pass that writes one (step 6's val: the kill
    lands in the write). The last life ends the run: the weights and log.txt are the uninterrupted run's,
    bit for bit."""
    log_dir = tmp_path / "run"
    for i, kill_after in enumerate(["step     1 | loss", "step     4 | loss", "step     6 | val"]):
        resume = ["--resume", "auto"] if i else []
        rc, _, err = run_until(train_args(small_text, log_dir, *resume), kill_after, signal.SIGKILL)
        assert rc == -signal.SIGKILL, (kill_after, err)
        assert not [p for p in log_dir.iterdir() if p.name.startswith("model_")
                    and not checkpoints.CHECKPOINT_RE.match(p.name) and not p.name.endswith(".tmp")]
    out = run_cli(*train_args(small_text, log_dir, "--resume", "auto"))
    assert out.returncode == 0, out.stderr
    assert_same_weights(weights(reference / "model_00008.pt"), weights(log_dir / "model_00008.pt"))
    assert (log_dir / "log.txt").read_text() == (reference / "log.txt").read_text()


# The flags users run: compiled (--compile auto), --dtype auto (bf16 on a CPU with AVX512-BF16, else fp32), all
# cores. Only --device cpu is pinned: bitwise reproducibility is promised on CPU, not on GPUs.
DEFAULTS = [a for a in TINY if a not in ("--compile", "off")]
assert len(DEFAULTS) == len(TINY) - 2


@pytest.fixture(scope="module")
def reference_defaults(small_text, tmp_path_factory):
    return uninterrupted(tmp_path_factory, "reference_defaults", small_text, tiny=DEFAULTS)


def assert_same_checkpoints(ref_dir, log_dir):
    """Every checkpoint in log_dir is ref_dir's of its step: the weights and the optimizer's state (AdamW's
    moments, Muon's momentum). Returns their names."""
    names = sorted(p.name for p in log_dir.glob("model_*.pt"))
    for name in names:
        a, b = (torch.load(d / name, weights_only=True) for d in (ref_dir, log_dir))
        assert_same_weights(a["model"], b["model"])
        parts = a["optimizer"] if "muon" in a["optimizer"] else {"adamw": a["optimizer"]}
        theirs = b["optimizer"] if "muon" in b["optimizer"] else {"adamw": b["optimizer"]}
        for part, opt in parts.items():
            for i, state in opt["state"].items():
                assert all(torch.equal(state[k], theirs[part]["state"][i][k]) for k in state), (name, part, i)
    return names


@pytest.mark.parametrize("kill_after", ["step     1 | loss", "step     6 | val"])
def test_same_command_twice_and_sigkill_then_resume_are_bit_identical_with_default_flags(
        reference_defaults, small_text, tmp_path, kill_after):
    """The killed run is the reference's command: what it wrote before the kill (its checkpoints, AdamW's
    moments included, and its log) is the reference's, so the same command twice gives the same run. Then
    --resume auto: after a kill at step 1 (before the first checkpoint, or in its write) it runs the whole
    command again from nothing; after one at step 6's evaluation it continues from the newest whole
    checkpoint. Either way every checkpoint and log.txt are the reference's."""
    log_dir = tmp_path / "run"
    ref_log = (reference_defaults / "log.txt").read_text()
    rc, _, err = run_until(train_args(small_text, log_dir, tiny=DEFAULTS), kill_after, signal.SIGKILL)
    assert rc == -signal.SIGKILL, err
    first_life = (log_dir / "log.txt").read_text()
    assert first_life and ref_log.startswith(first_life)
    written = assert_same_checkpoints(reference_defaults, log_dir)
    assert kill_after == "step     1 | loss" or written[:2] == ["model_00002.pt", "model_00004.pt"]
    out = run_cli(*train_args(small_text, log_dir, "--resume", "auto", tiny=DEFAULTS))
    assert out.returncode == 0, out.stderr
    assert {"model_00004.pt", "model_00008.pt"} <= set(assert_same_checkpoints(reference_defaults, log_dir))
    assert (log_dir / "log.txt").read_text() == ref_log


MUON_DROPOUT = ["--optimizer", "muon", "--dropout", "0.1"]


@pytest.fixture(scope="module")
def muon_reference(small_text, tmp_path_factory):
    """Muon, and dropout, with the flags users run: an uninterrupted 8-step run."""
    log_dir = tmp_path_factory.mktemp("muon_reference")
    out = run_cli(*train_args(small_text, log_dir, *MUON_DROPOUT, tiny=DEFAULTS))
    assert out.returncode == 0, out.stderr
    return log_dir


def test_sigkill_then_resume_with_muon_and_dropout_is_bit_identical(muon_reference, small_text, tmp_path):
    """With the flags users run (compiled, --dtype auto). The checkpoint holds both optimizers' states:
    Muon's momentum and AdamW's moments. Dropout draws from the global random generator: the checkpoint's
    random state must be the one the next step uses (nothing else may draw from it between the restore and
    the step; the CPU's MFU peak once did)."""
    ckpt = torch.load(muon_reference / "model_00008.pt", weights_only=True)
    assert ckpt["optimizer"].keys() == {"adamw", "muon"} and ckpt["train_config"]["optimizer"] == "muon"
    assert ckpt["train_config"]["dropout"] == 0.1
    # Muon took the steps of the blocks' matrices: a momentum buffer each, not zero
    muon = ckpt["optimizer"]["muon"]
    assert len(muon["state"]) == sum(len(g["params"]) for g in muon["param_groups"]) > 0
    assert all(s["momentum_buffer"].abs().sum() > 0 for s in muon["state"].values())
    args = lambda *extra: train_args(small_text, tmp_path / "run", *MUON_DROPOUT, *extra, tiny=DEFAULTS)  # noqa: E731
    rc, _, err = run_until(args(), "step     4 | loss", signal.SIGKILL)
    assert rc == -signal.SIGKILL, err
    out = run_cli(*args("--resume", "auto"))  # at step 4 (or 6), and 2 (or 4) steps to go
    assert out.returncode == 0, out.stderr
    assert "model_00008.pt" in assert_same_checkpoints(muon_reference, tmp_path / "run")
    assert (tmp_path / "run" / "log.txt").read_text() == (muon_reference / "log.txt").read_text()


def test_sigterm_writes_a_checkpoint_and_exits_143(reference, small_text, tmp_path):
    log_dir = tmp_path / "run"
    rc, out, err = run_until(train_args(small_text, log_dir), "step     2 | loss", signal.SIGTERM)
    assert rc == 143, err
    assert "stopped by signal" in out
    steps = sorted(int(checkpoints.CHECKPOINT_RE.match(p.name)[1]) for p in log_dir.glob("model_*.pt"))
    # the step in progress finished, then a checkpoint at the step it names (4 if the signal came during step 3,
    # later where the machine was too slow to deliver it by then)
    stopped = int(re.search(r"stopped by signal at step (\d+)", out)[1])
    assert steps and steps[-1] == stopped >= 3, (steps, out)
    out = run_cli(*train_args(small_text, log_dir, "--resume", "auto"))
    assert out.returncode == 0, out.stderr
    assert_same_weights(weights(reference / "model_00008.pt"), weights(log_dir / "model_00008.pt"))


def test_resume_auto_skips_a_bad_newest_checkpoint(reference, small_text, tmp_path):
    log_dir = tmp_path / "run"
    shutil.copytree(reference, log_dir)
    for s in (6, 8):
        (log_dir / f"model_{s:05d}.pt").unlink()
    data = (log_dir / "model_00004.pt").read_bytes()
    (log_dir / "model_00006.pt").write_bytes(data[: len(data) // 2])  # truncated, as a crash could leave it
    out = run_cli(*train_args(small_text, log_dir, "--resume", "auto"))
    assert out.returncode == 0, out.stderr
    assert "model_00006.pt" in out.stderr and "warning" in out.stderr
    # training passed step 6 again, so the truncated file was replaced by the checkpoint it should have been
    assert_same_weights(weights(reference / "model_00006.pt"), weights(log_dir / "model_00006.pt"))
    assert_same_weights(weights(reference / "model_00008.pt"), weights(log_dir / "model_00008.pt"))


def test_short_last_shard_is_skipped_with_a_warning(tmp_path):
    # fineweb.py's last shard is short by design: it is skipped, named in one warning, and training goes on
    d = tmp_path / "shards"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("x_val_000000", 3000), ("x_train_000001", 3000), ("x_train_000002", 40)):
        np.save(d / f"{name}.npy", rng.integers(0, 50257, n, dtype=np.uint16))
    out = run_cli(*train_args(d, tmp_path / "log", steps=2))
    assert out.returncode == 0, out.stderr
    warnings = [ln for ln in out.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "x_train_000002.npy (40 tokens)" in warnings[0], out.stderr


def test_flags_are_checked_before_any_device_or_distributed_setup(monkeypatch, tmp_path):
    def no_setup(*args, **kwargs):
        raise AssertionError("device or process-group setup ran before the flags were checked")
    monkeypatch.setenv("RANK", "0")  # as under torchrun with 2 ranks
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(tg.dist, "init_process_group", no_setup)
    monkeypatch.setattr(tg.torch.cuda, "is_available", no_setup)
    for bad, words in ((dict(max_lr=-1.0), "--max_lr must be positive"), (dict(compile="yes"), "unknown --compile"),
                       (dict(total_batch_size=1000, seq_len=32), "world_size = 16 * 32 * 2 = 1024"),
                       (dict(model="gpt5"), "unknown --model")):
        with pytest.raises(errors.UserError, match=words.replace("*", r"\*")):
            tg.train(train_flags.TrainConfig(log_dir=str(tmp_path), **bad))


def tree_hashes(path):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(path).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, reference):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("  \n")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (d / "int32").mkdir()
    np.save(d / "int32" / "x_train_000001.npy", np.arange(5000, dtype=np.int32))
    np.save(d / "int32" / "x_val_000000.npy", np.arange(5000, dtype=np.int32))
    (d / "noval").mkdir()
    np.save(d / "noval" / "x_train_000001.npy", np.arange(5000, dtype=np.uint16))
    (d / "trunc").mkdir()
    np.save(d / "trunc" / "x_val_000000.npy", np.arange(5000, dtype=np.uint16))
    (d / "trunc" / "x_train_000001.npy").write_bytes((d / "trunc" / "x_val_000000.npy").read_bytes()[:500])
    (d / "other_shape").mkdir()
    shutil.copy(reference / "model_00002.pt", d / "other_shape" / "model_00002.pt")
    (d / "garbage").mkdir()
    (d / "garbage" / "model_00001.pt").write_bytes(b"not a checkpoint")
    ckpt = torch.load(reference / "model_00002.pt", weights_only=True)
    torch.save({**ckpt, "format_version": 99}, d / "newer.pt")
    torch.save({"weights": torch.zeros(3)}, d / "foreign.pt")
    (d / "a_file").write_text("this is not a directory")
    (d / "short").mkdir()
    np.save(d / "short" / "x_val_000000.npy", np.arange(5000, dtype=np.uint16))
    np.save(d / "short" / "x_train_000001.npy", np.arange(64, dtype=np.uint16))  # < batch_size*seq_len+1 = 65
    return d


BAD = {  # name: (extra args replacing defaults, words the one-line message must contain)
    "missing data": (["--data", "{d}/nope.txt"], "does not exist"),
    "empty text": (["--data", "{d}/empty.txt"], "empty"),
    "non-utf8 text": (["--data", "{d}/latin1.txt"], "UTF-8"),
    "int32 shard": (["--data", "{d}/int32"], "uint16"),
    "no val shard": (["--data", "{d}/noval"], "val"),
    "truncated shard": (["--data", "{d}/trunc"], "not a readable"),
    "unknown preset": (["--model", "gpt5"], "unknown --model"),
    "indivisible batch": (["--total_batch_size", "100"], "not a multiple"),
    "indivisible batch, auto": (["--batch_size", "auto", "--total_batch_size", "100"],
                                "not a multiple of seq_len * world_size = 32 * 1 = 32; change --total_batch_size"),
    "every train shard too short": (["--data", "{d}/short"], "no train data fills one micro-batch"),
    "seq_len > block": (["--seq_len", "2048", "--total_batch_size", "4096"], "block size"),
    "unknown device": (["--device", "tpu"], "unknown --device"),
    "cuda without gpu": (["--device", "cuda"], "CUDA"),
    "fp16 on cpu": (["--dtype", "fp16"], "fp16"),
    "resume nowhere": (["--resume", "{d}/none.pt"], "does not exist"),
    "checkpoint of another shape": (["--resume", "auto", "--log_dir", "{d}/other_shape", "--n_embd", "64"],
                                    "shape"),
    "no valid checkpoint": (["--resume", "auto", "--log_dir", "{d}/garbage"], "none of the 1 checkpoints"),
    "unreadable checkpoint": (["--resume", "{d}/garbage/model_00001.pt"], "not a valid checkpoint"),
    "unknown init_from": (["--init_from", "gpt7"], "--init_from gpt7 does not exist; give a checkpoint"),
    "corrupted hellaswag file": (["--hellaswag_every", "1", "--hellaswag_data", "{d}/empty.txt"], "hellaswag"),
    "newer checkpoint format": (["--resume", "{d}/newer.pt"], "newer than"),
    "not our checkpoint": (["--resume", "{d}/foreign.pt"], "not a checkpoint of train_gpt2.py"),
    "log_dir is a file": (["--log_dir", "{d}/a_file"], "--log_dir"),
    "resume with init_from": (["--resume", "auto", "--init_from", "gpt2"], "exclude each other"),
    "muon under fsdp": (["--fsdp", "1", "--optimizer", "muon"], "--optimizer muon orthogonalizes each matrix "
                        "whole, which --fsdp 1 keeps in shards; train with DDP (drop --fsdp) or --optimizer adamw"),
    "init_step without init_from": (["--init_step", "5"], "--init_step needs --init_from"),
    "init_step past max_steps": (["--init_from", "gpt2", "--init_step", "2"], "--init_step must be in [0, --max_steps)"),
    "zero batch size": (["--batch_size", "0"], "--batch_size must be positive or auto, got 0"),
    "negative grad_clip": (["--grad_clip", "-1"], "must not be negative"),
    "empty prompt": (["--sample_every", "1", "--prompt", ""], "--prompt is empty"),
    "fresh run beside checkpoints": (["--log_dir", "{d}/other_shape"], "already holds checkpoints"),
    "not a GPT-2 directory": (["--init_from", "{d}/int32"], "no config.json"),
    "negative keep_checkpoints": (["--keep_checkpoints", "-1"], "--keep_checkpoints"),
    "shuffle not 0/1": (["--shuffle", "2"], "--shuffle must be 0 or 1"),
    "negative seed to shuffle": (["--shuffle", "1", "--seed", "-3"], "--seed must not be negative"),
    "fsdp not 0/1": (["--fsdp", "2"], "--fsdp must be 0 or 1"),
    "dropout out of range": (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    "zero dist_timeout": (["--dist_timeout", "0"], "--dist_timeout must be positive"),
    "fsdp without torchrun": (["--fsdp", "1"], "torchrun"),
}


@pytest.fixture(scope="module")
def commands(bad_files, reference, small_text, tmp_path_factory):
    """This file's commands that train nothing, in one process (conftest.run_in_one_process): the cases of BAD
    (with bad_files' tree after each), a hostile pickle's, another data order's, sample, export and plot."""
    d = tmp_path_factory.mktemp("commands")
    runs = {case: [*train_args(small_text, d / f"log{i}", steps=2), *(a.format(d=bad_files) for a in extra)]
            for i, (case, (extra, _)) in enumerate(BAD.items())}  # argparse: the last occurrence of a flag wins
    (d / "hostile").mkdir()
    torch.save({"model": Payload(str(d / "pwned")), "config": {}, "step": 1}, d / "hostile" / "model_00001.pt")
    for name, resume in (("auto", "auto"), ("it", d / "hostile" / "model_00001.pt")):
        runs[f"hostile, --resume {name}"] = train_args(small_text, d / "hostile", "--resume", resume, steps=2)
    runs["hostile, sample"] = ["train_gpt2.py", "sample", "--checkpoint", d / "hostile" / "model_00001.pt"]
    runs["another data order"] = train_args(small_text, d / "order", "--resume", reference / "model_00004.pt",
                                            "--shuffle", "1")
    last = reference / "model_00008.pt"
    runs["sample"] = ["train_gpt2.py", "sample", "--checkpoint", last, "--prompt", "ROMEO:", "--max_new_tokens",
                      "8", "--num_samples", "2", "--device", "cpu"]
    runs["sample, interactive"] = {"argv": ["train_gpt2.py", "sample", "--checkpoint", str(last), "--interactive",
                                            "--max_new_tokens", "4", "--num_samples", "1", "--temperature", "0"],
                                   "stdin": "First prompt\nSecond prompt\n"}
    runs["export"] = ["train_gpt2.py", "export", "--checkpoint", last, "--out", d / "hf"]
    config = tg.GPTConfig(block_size=256, n_layer=1, n_head=2, n_embd=32)
    torch.save({"model": tg.GPT(config).state_dict(), "config": dataclasses.asdict(config), "step": 0},
               d / "small_context.pt")
    runs["export, small context"] = ["train_gpt2.py", "export", "--checkpoint", d / "small_context.pt", "--out",
                                     d / "hf_small_context"]
    runs["plot"] = ["train_gpt2.py", "plot", "--log_dir", reference, "--out", d / "p.png"]
    before = tree_hashes(bad_files)
    results = run_in_one_process(runs, d, watched=bad_files)
    for out in results.values():  # the tree before each command: the one after the command before it
        out["tree before"], before = before, out["tree"]
    return results, d


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.skipif(
    c == "cuda without gpu" and torch.cuda.is_available(), reason="this case expects a machine without a GPU"))
    for c in BAD], ids=list(BAD))
def test_bad_input_one_line_exit_2(commands, case):
    out = commands[0][case]
    assert out["code"] == 2, (out["code"], out["stderr"][-2000:])
    lines = [ln for ln in out["stderr"].splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), out["stderr"]
    assert BAD[case][1] in lines[0] and "Traceback" not in out["stderr"]
    assert out["tree"] == out["tree before"]


def test_sample_cli_checkpoint_and_interactive(commands, reference):
    # the texts are what generate() gives for the checkpoint in this process: seeded (--seed 1337), and greedy
    # (--temperature 0) for each line of stdin
    results, _ = commands
    model, enc = tg.load_model(str(reference / "model_00008.pt")), tg.token_files.get_encoding()
    rt = tg.runtime.resolve("cpu", "auto", ranks=(False, 0, 0, 1))
    out = results["sample"]
    assert out["code"] == 0, out["stderr"]
    texts = tg.sample_texts(model, enc, "ROMEO:", 2, 8, rt, 1.0, 50, 1337)
    assert out["stdout"] == "".join(f"--- sample {i}\n{t}\n" for i, t in enumerate(texts))
    out = results["sample, interactive"]  # the prompts come from stdin
    assert out["code"] == 0, out["stderr"]
    greedy = [tg.sample_texts(model, enc, p, 1, 4, rt, temperature=0)[0] for p in ("First prompt", "Second prompt")]
    assert out["stdout"] == "".join(f"--- sample 0\n{t}\n" for t in greedy)


@pytest.fixture(scope="module")
def exported(commands):
    """The reference's last checkpoint exported as a transformers GPT-2 directory."""
    results, d = commands
    assert results["export"]["code"] == 0, results["export"]["stderr"]
    return d / "hf"


def test_export_round_trip_through_transformers(reference, exported):
    import transformers
    hf = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    ours = tg.load_model(str(reference / "model_00008.pt")).eval()
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(idx)[0][..., :50257] - hf(idx).logits).abs().max().item()
    assert diff < 1e-4, diff
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    import tiktoken
    text = "Hello, I'm a language model, and 2 + 2 = 4 <|endoftext|> ünïcödé"
    assert tok(text)["input_ids"] == tiktoken.get_encoding("gpt2").encode(text, allowed_special="all")
    back = tg.GPT.from_pretrained(str(exported))
    real_vocab = lambda sd: {k: v[:50257] if k in ("transformer.wte.weight", "lm_head.weight") else v  # noqa: E731
                             for k, v in sd.items()}  # export drops the padding rows
    assert_same_weights(real_vocab(ours.state_dict()), real_vocab(back.state_dict()))


def test_export_tokenizer_max_length_is_the_models_block_size(commands):
    results, d = commands
    out = results["export, small context"]  # a model of block_size 256
    assert out["code"] == 0, out["stderr"]
    import transformers
    assert transformers.AutoTokenizer.from_pretrained(d / "hf_small_context").model_max_length == 256
    assert transformers.GPT2Config.from_pretrained(d / "hf_small_context").n_positions == 256


def test_init_from_local_hf_directory(reference, exported, small_text, tmp_path):
    args = train_args(small_text, tmp_path / "ft", "--init_from", exported, "--eval_every", "1", steps=1)
    args.remove("--n_layer"), args.remove("2")  # shape comes from the weights; the flags are optional
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr
    first_val = float((tmp_path / "ft" / "log.txt").read_text().split()[2])
    ref_val = float([ln for ln in (reference / "log.txt").read_text().splitlines() if ln.startswith("8 val")][0].split()[2])
    assert abs(first_val - ref_val) < 1e-6  # step 0 of fine-tuning evaluates the exported weights


def test_plot(commands):
    pytest.importorskip("matplotlib")
    results, d = commands
    assert results["plot"]["code"] == 0, results["plot"]["stderr"]
    assert (d / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_draws_two_runs_on_one_chart(reference, muon_reference, tmp_path):
    pytest.importorskip("matplotlib")
    out = run_cli("train_gpt2.py", "plot", "--log_dir", reference, "--compare", muon_reference, "--out",
                  tmp_path / "both.png")
    assert out.returncode == 0, out.stderr
    import matplotlib
    matplotlib.use("Agg")
    from plumbing import plot
    loss = plot.figure(str(reference), str(muon_reference)).axes[0]
    drawn = {line.get_label(): list(line.get_ydata()) for line in loss.get_lines()}
    for run in (reference, muon_reference):  # each run's val curve, as its log.txt holds it
        logged = [float(v) for s, kind, v in (ln.split() for ln in (run / "log.txt").read_text().splitlines())
                  if kind == "val"]
        assert drawn[f"{run.name}: val loss"] == logged


class Payload:
    """A pickle that, if unpickled, would create a marker file: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_pickle_is_refused_and_never_run(commands):
    results, d = commands
    for run in ("hostile, --resume auto", "hostile, --resume it", "hostile, sample"):
        out = results[run]
        assert out["code"] == 2 and "Traceback" not in out["stderr"], out["stderr"]
        assert "not a valid checkpoint" in out["stderr"]
    assert not (d / "pwned").exists()


KILL_IN_SAVE = """
import os, signal, sys, torch, train_gpt2
real_save = torch.save
def save_half_then_die(obj, f):
    if isinstance(obj, dict) and obj.get("step") == 4:
        real_save(obj, f)
        f.flush()
        f.truncate(f.tell() // 2)  # half the bytes are on disk, then the power goes
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f)
torch.save = save_half_then_die
train_gpt2.main(sys.argv[1:])
"""


def test_kill_in_the_middle_of_a_checkpoint_write(reference, small_text, tmp_path):
    log_dir = tmp_path / "run"
    args = train_args(small_text, log_dir)[1:]
    out = run_cli("-c", KILL_IN_SAVE, *args)
    assert out.returncode == -signal.SIGKILL
    temps = [p.name for p in log_dir.glob("model_00004.pt.*.tmp")]
    assert temps and not (log_dir / "model_00004.pt").exists()
    assert_same_weights(weights(reference / "model_00002.pt"), weights(log_dir / "model_00002.pt"))
    out = run_cli(*train_args(small_text, log_dir, "--resume", "auto"))
    assert out.returncode == 0, out.stderr
    # the killed write's temporary file is gone, and the run said so
    assert not list(log_dir.glob("*.tmp")) and "removed 1 temporary file" in out.stdout and temps[0] in out.stdout
    assert_same_weights(weights(reference / "model_00008.pt"), weights(log_dir / "model_00008.pt"))


def test_nan_loss_stops_with_a_clear_message(reference, small_text, tmp_path):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    shutil.copy(reference / "model_00002.pt", log_dir)
    out = run_cli(*train_args(small_text, log_dir, "--resume", "auto", "--max_lr", "1e9", "--dtype", "fp32"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "the loss is nan at step 3" in out.stderr and "model_00002.pt" in out.stderr


def test_hellaswag_during_training_equals_hellaswag_py(reference, small_text, tmp_path):
    import tiktoken

    from conftest import HELLASWAG
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    shutil.copy(reference / "model_00006.pt", log_dir)
    out = run_cli(*train_args(small_text, log_dir, "--resume", "auto", "--hellaswag_every", "2",
                              "--hellaswag_data", HELLASWAG, "--hellaswag_limit", "24",
                              "--dtype", "fp32"))
    assert out.returncode == 0, out.stderr
    logged = {int(s): float(v) for s, k, v in (ln.split() for ln in (log_dir / "log.txt").read_text().splitlines())
              if k == "hella"}
    assert sorted(logged) == [6, 8]
    examples = hellaswag_eval.load_examples(HELLASWAG, limit=24)
    model = tg.load_model(str(log_dir / "model_00008.pt"))
    counts = tg.hellaswag_score(model, examples, tiktoken.get_encoding("gpt2"), batch_size=1)
    assert abs(hellaswag_eval.accuracies(counts)["acc_norm"] - logged[8]) < 1e-6  # log.txt keeps 6 decimals


def test_batch_size_auto_fills_the_batch(small_text, tmp_path):
    args = train_args(small_text, tmp_path / "log", "--batch_size", "auto", "--grad_checkpoint", "1", steps=1)
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr
    assert "4 x 32 x 1 ranks x 1 accumulation steps" in out.stdout  # all 128 tokens in one micro-step


LIMITED = """
import sys
sys.path.insert(0, ".")
import train_gpt2 as tg
from plumbing import memory
memory.available_memory = lambda rt: float(sys.argv[1])  # as if the machine had this much free
tg.main(sys.argv[2:])
"""


def test_batch_size_auto_takes_the_largest_batch_the_memory_holds(small_text, tmp_path):
    # where memory decides: the free memory given lies between the estimates for 2 and 4 sequences, so 2 (with 2
    # accumulation steps) is the largest divisor of the step's 4 sequences that fits; brute force over the
    # estimates says which, and the run must agree
    from plumbing import memory
    model = tg.GPT(tg.GPTConfig(n_layer=2, n_head=2, n_embd=32))
    need = {b: max(memory.memory_needs(model, b, 32, "fp32", "cpu", grad_checkpoint=True).values()) for b in (1, 2, 4)}
    assert need[1] < need[2] < need[4]
    free = (need[2] + need[4]) / 2 / memory.CPU_FREE_SHARE
    fits = [b for b in (1, 2, 4) if need[b] < memory.CPU_FREE_SHARE * free]
    assert fits == [1, 2]
    args = train_args(small_text, tmp_path / "log", "--batch_size", "auto", "--grad_checkpoint", "1", "--dtype",
                      "fp32", steps=1)[1:]
    out = run_cli("-c", LIMITED, free, *args)
    assert out.returncode == 0, out.stderr
    assert "2 x 32 x 1 ranks x 2 accumulation steps" in out.stdout


def test_compiled_training_matches_eager_and_still_evaluates_and_samples(small_text, tmp_path):
    logs = {}
    for mode in ("off", "on"):
        out = run_cli(*train_args(small_text, tmp_path / mode, "--compile", mode, "--dtype", "fp32", "--eval_every",
                                  "2", "--sample_every", "2", "--checkpoint_every", "0", steps=2))
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("sample ") == 4  # 4 samples at the last step
        logs[mode] = [(ln.split()[:2], float(ln.split()[2])) for ln in (tmp_path / mode / "log.txt").read_text().splitlines()]
    assert [k for k, _ in logs["off"]] == [k for k, _ in logs["on"]]
    assert max(abs(a - b) for (_, a), (_, b) in zip(logs["off"], logs["on"])) < 1e-4


def test_second_signal_exits_at_once_and_damages_nothing(reference, small_text, tmp_path):
    log_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, *map(str, train_args(small_text, log_dir))], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step     2 | loss" in line:
            proc.send_signal(signal.SIGTERM)
        if "finishing this step" in line:  # the first signal was handled: the second one is the default
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGTERM
    assert_same_weights(weights(reference / "model_00002.pt"), weights(log_dir / "model_00002.pt"))
    out = run_cli(*train_args(small_text, log_dir, "--resume", "auto"))
    assert out.returncode == 0, out.stderr
    assert_same_weights(weights(reference / "model_00008.pt"), weights(log_dir / "model_00008.pt"))


@pytest.fixture
def small_disk(tmp_path):
    """A 30 MB filesystem: room for log.txt and one checkpoint of the tiny model (19 MB), not two."""
    path = tmp_path / "small_disk"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30M", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield path
    subprocess.run(["umount", str(path)])


def test_disk_full_while_checkpointing(reference, small_text, small_disk):
    out = run_cli(*train_args(small_text, small_disk))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "could not write" in out.stderr and "model_00004.pt" in out.stderr and "disk space" in out.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["log.txt", "model_00002.pt"]  # no half file left
    assert_same_weights(weights(reference / "model_00002.pt"), weights(small_disk / "model_00002.pt"))


KILL_AT_DELETE = """
import os, signal, sys, train_gpt2
when = sys.argv.pop(1)  # "before" or "after" the first checkpoint deletion
real_remove = os.remove
def remove_then_die(path):
    if os.path.basename(path).startswith("model_"):
        files = sorted(os.listdir(os.path.dirname(path)))
        print("deleting", os.path.basename(path), files, file=sys.stderr, flush=True)
        if when == "after":
            real_remove(path)
        os.kill(os.getpid(), signal.SIGKILL)
    real_remove(path)
os.remove = remove_then_die
train_gpt2.main(sys.argv[1:])
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_keep_checkpoints_sigkill_around_a_deletion_then_resume(reference, small_text, tmp_path, when):
    log_dir = tmp_path / "run"
    out = run_cli("-c", KILL_AT_DELETE, when, *train_args(small_text, log_dir, "--keep_checkpoints", "1")[1:])
    assert out.returncode == -signal.SIGKILL, out.stderr
    # the first deletion is model_00002.pt, once model_00004.pt is whole and its weights trained a finite step
    assert "deleting model_00002.pt ['.lock', 'log.txt', 'model_00002.pt', 'model_00004.pt']" in out.stderr
    assert_same_weights(weights(reference / "model_00004.pt"), weights(log_dir / "model_00004.pt"))
    out = run_cli(*train_args(small_text, log_dir, "--resume", "auto", "--keep_checkpoints", "1"))
    assert out.returncode == 0, out.stderr
    assert_same_weights(weights(reference / "model_00008.pt"), weights(log_dir / "model_00008.pt"))
    assert (log_dir / "log.txt").read_text() == (reference / "log.txt").read_text()
    # the newest, and the one before it until the newest has trained a step (none after the last step)
    assert sorted(p.name for p in log_dir.glob("model_*")) == ["model_00006.pt", "model_00008.pt"]


def test_keep_checkpoints_spares_the_resumed_one_until_a_newer_one_trained(reference, small_text, tmp_path):
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    shutil.copy(reference / "model_00004.pt", log_dir)
    data = (reference / "model_00008.pt").read_bytes()
    (log_dir / "model_00008.pt").write_bytes(data[: len(data) // 2])  # a crash left a later, truncated one
    (log_dir / "log.txt").write_text((reference / "log.txt").read_text())
    args = train_args(small_text, log_dir, "--resume", "auto", "--keep_checkpoints", "1")
    out = run_cli("-c", KILL_AT_DELETE, "before", *args[1:])
    assert out.returncode == -signal.SIGKILL, out.stderr
    # the resumed model_00004.pt goes only once model_00006.pt is whole and trained a finite step; the
    # truncated model_00008.pt (a later step) neither counts as newer nor gets deleted
    assert ("deleting model_00004.pt ['.lock', 'log.txt', 'model_00004.pt', 'model_00006.pt', 'model_00008.pt']"
            in out.stderr)
    assert_same_weights(weights(reference / "model_00006.pt"), weights(log_dir / "model_00006.pt"))
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr
    assert "resumed at step 6" in out.stdout
    assert_same_weights(weights(reference / "model_00008.pt"), weights(log_dir / "model_00008.pt"))
    assert sorted(p.name for p in log_dir.glob("model_*")) == ["model_00006.pt", "model_00008.pt"]


@pytest.fixture(scope="module")
def shuffled_reference(tiny_shards, tmp_path_factory):
    """An uninterrupted run on a shard directory as build-nanogpt's fineweb.py writes it: shuffled by default,
    through several epochs. The shards load unchanged."""
    before = {p.name: p.read_bytes() for p in tiny_shards.iterdir()}
    log_dir = uninterrupted(tmp_path_factory, "shuffled", tiny_shards)
    assert {p.name: p.read_bytes() for p in tiny_shards.iterdir()} == before
    return log_dir


def test_shuffled_shards_sigkill_then_resume_is_bit_identical(shuffled_reference, tiny_shards, tmp_path):
    loader = torch.load(shuffled_reference / "model_00008.pt", weights_only=True)["loader"]
    assert loader["shuffle"] == 1 and loader["epoch"] >= 1  # the default for shards, past an epoch boundary
    log_dir = tmp_path / "run"
    rc, _, _ = run_until(train_args(tiny_shards, log_dir), "step     5 | loss", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    out = run_cli(*train_args(tiny_shards, log_dir, "--resume", "auto"))
    assert out.returncode == 0, out.stderr
    assert "resumed at step 4" in out.stdout or "resumed at step 6" in out.stdout
    assert_same_weights(weights(shuffled_reference / "model_00008.pt"), weights(log_dir / "model_00008.pt"))
    assert (log_dir / "log.txt").read_text() == (shuffled_reference / "log.txt").read_text()


def test_checkpoint_from_before_shuffle_resumes_in_file_order(reference, small_text, tmp_path):
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    ckpt = torch.load(reference / "model_00004.pt", weights_only=True)
    ckpt["loader"] = {"shard": ckpt["loader"]["shard"], "pos": ckpt["loader"]["pos"]}  # the old layout
    torch.save(ckpt, log_dir / "model_00004.pt")
    out = run_cli(*train_args(small_text, log_dir, "--resume", "auto"))
    assert out.returncode == 0, out.stderr
    assert_same_weights(weights(reference / "model_00008.pt"), weights(log_dir / "model_00008.pt"))


def test_resume_refuses_another_data_order(reference, commands):
    out = commands[0]["another data order"]
    assert out["code"] == 2 and "Traceback" not in out["stderr"], out["stderr"]
    assert out["stderr"].strip() == f"error: {reference / 'model_00004.pt'} was trained with --shuffle 0; resume " \
                                    "with --shuffle 0 or without the flag"
