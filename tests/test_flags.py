"""Every flag of every command against values outside what it accepts: a property-based test (hypothesis).

The table below is the specification, written from what each flag means, not read from the code: for each flag,
the kind of value it takes. For each flag, hypothesis draws values outside that kind's domain (zero, negative,
NaN, +-inf, numbers past int64, empty text, text where a number is wanted, missing paths, a file where a
directory is wanted and the reverse, a path under a file) and the command, called in-process through its
main(argv), must answer with one line on stderr starting with "error: ", exit code 2, no traceback and nothing
written. Reaching the command's work (training, sampling, scoring, tokenizing, the bench's runs) with such a
value counts as accepting it: a gap. Running as root, unwritable directories cannot be made, so that case
is drawn only for other users."""
import importlib
import os
import re
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HELLASWAG, ROOT

sys.path.insert(0, str(ROOT / "bench"))

INT64 = 2**63 - 1
JUNK = ["", " ", "abc", "nan", "inf", "-inf", "1e400", "0x10", "1.5", "--"]  # text that is no integer of a domain


def ints_outside(lo, hi=INT64):
    below = st.integers(max_value=lo - 1, min_value=-(2**70))
    above = st.integers(min_value=hi + 1, max_value=2**70)
    return st.one_of(below, above).map(str) | st.sampled_from(JUNK)


def floats_outside(lo, hi=None, lo_open=False, hi_open=False):
    """Below lo (lo itself if open), above hi, and every non-finite or non-number text."""
    parts = [st.floats(max_value=lo, exclude_max=not lo_open, allow_nan=False, allow_infinity=False)]
    if hi is not None:
        parts.append(st.floats(min_value=hi, exclude_min=not hi_open, allow_nan=False, allow_infinity=False))
    return st.one_of(*parts).map(repr) | st.sampled_from(["nan", "inf", "-inf", "1e400", "", "abc", "NaN"])


def choices_outside(allowed):
    return st.text(min_size=0, max_size=8).filter(lambda s: s not in allowed) | st.sampled_from(["", "CPU", "none"])


# the paths a fuzzed path is drawn from: {ws} is the test's workspace (see `ws`)
MISSING = ["{ws}/nope", "{ws}/nope.txt", "{ws}/nope/deeper.pt", ""]
FILE_NOT_DIR = ["{ws}/a_file", "{ws}/a_file/sub"]
DIR_NOT_FILE = ["{ws}", "{ws}/a_dir"]
UNWRITABLE = [] if os.geteuid() == 0 else ["{ws}/locked/x", "{ws}/locked"]

KINDS = {  # kind: the strategy of values outside it
    "pos_int": ints_outside(1),
    "nonneg_int": ints_outside(0),
    "bit": ints_outside(0, 1),
    "seed": ints_outside(0, 2**32 - 1),
    "minutes": ints_outside(1, 525600),  # --dist_timeout: up to a year (timedelta overflows far above int64)
    "steps3": ints_outside(3),  # a bench that drops its first two timings
    "workers": ints_outside(1, 4096),
    "pos_float": floats_outside(0, lo_open=True),
    "nonneg_float": floats_outside(0),
    "dropout": floats_outside(0, 1, hi_open=True),
    "ratio": floats_outside(0, 1),
    "batch_or_auto": ints_outside(1).filter(lambda s: s != "auto"),
    "text": st.sampled_from([""]),  # must not be empty
    "name": st.sampled_from(["", "a/b", "../x"]),  # a file-name part: not empty, no directories
    "switch": st.sampled_from(["1", "yes"]),  # store_true: takes no value
    "in_file": st.sampled_from(MISSING + DIR_NOT_FILE),
    "in_dir": st.sampled_from(MISSING + FILE_NOT_DIR),
    "in_path": st.sampled_from(MISSING),
    "model_source": st.sampled_from(MISSING + ["gpt7", "{ws}/a_dir"]),  # a file, a HF directory, or a hub name
    "resume": st.sampled_from(MISSING + DIR_NOT_FILE),  # auto, or a checkpoint file
    "out_dir": st.sampled_from(FILE_NOT_DIR + [""] + UNWRITABLE),
    "out_file": st.sampled_from(DIR_NOT_FILE + ["{ws}/a_file/x.png", "{ws}/nope/x.png", ""] + UNWRITABLE),
    "source": st.sampled_from(["", "./nope.jsonl", "{ws}/nope.txt", "{ws}/a_dir", "{ws}/a_file"]),
}
DEVICES, DTYPES = ["auto", "cpu", "cuda", "mps"], ["auto", "bf16", "fp16", "fp32"]

TRAIN = {
    "data": "in_path", "log_dir": "out_dir", "model": ("choice", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]),
    "n_layer": "pos_int", "n_head": "pos_int", "n_embd": "pos_int", "init_from": "model_source", "resume": "resume",
    "total_batch_size": "pos_int", "batch_size": "batch_or_auto", "seq_len": "pos_int", "max_lr": "pos_float",
    "min_lr_ratio": "ratio", "warmup_steps": "nonneg_int", "max_steps": "pos_int", "weight_decay": "nonneg_float",
    "grad_clip": "nonneg_float", "grad_checkpoint": "bit", "dropout": "dropout", "device": ("choice", DEVICES),
    "dtype": ("choice", DTYPES), "compile": ("choice", ["auto", "on", "off"]), "seed": "seed",
    "dist_timeout": "minutes", "eval_every": "nonneg_int", "val_tokens": "pos_int", "sample_every": "nonneg_int",
    "prompt": ("text", ["--sample_every", "1"]), "hellaswag_every": "nonneg_int", "hellaswag_data": "in_file",
    "hellaswag_limit": "nonneg_int", "checkpoint_every": "nonneg_int", "keep_checkpoints": "nonneg_int",
    "shuffle": "bit", "wandb_project": "text", "fsdp": "bit", "init_step": "nonneg_int",
    "fsdp_sync": ("choice", ["auto", "step", "micro"]), "optimizer": ("choice", ["adamw", "muon"]),
    "muon_lr": "pos_float", "muon_momentum": "dropout",
}
SPEC = {  # command: (module, how to call it, its flags' kinds, the functions that start its work)
    "train": ("train_gpt2", "main", TRAIN, ["train_gpt2.build_state"]),
    "sample": ("train_gpt2", "main sample", {
        "checkpoint": "model_source", "prompt": "text", "max_new_tokens": "pos_int", "num_samples": "pos_int",
        "temperature": "nonneg_float", "top_k": "nonneg_int", "seed": "seed", "device": ("choice", DEVICES),
        "dtype": ("choice", DTYPES), "interactive": "switch"}, ["train_gpt2.sample_texts"]),
    "export": ("train_gpt2", "main export", {"checkpoint": "in_file", "out": "out_dir"}, ["plumbing.huggingface.ours_to_hf"]),
    "evaluate": ("train_gpt2", "main evaluate", {
        "checkpoint": "model_source", "data": "in_path", "tokens": "nonneg_int", "seq_len": "nonneg_int",
        "batch_size": "pos_int", "per_token": "switch", "device": ("choice", DEVICES), "dtype": ("choice", DTYPES)},
        ["plumbing.evaluate.window_losses"]),
    "plot": ("train_gpt2", "main plot", {"log_dir": "in_dir", "out": "out_file", "compare": "in_dir"},
             ["plumbing.files.write_atomic"]),
    "hellaswag": ("hellaswag", "main", {
        "model": "model_source", "data": "in_file", "split": ("choice", ["val", "train"]), "limit": "nonneg_int",
        "device": ("choice", DEVICES), "dtype": ("choice", DTYPES), "batch_size": "pos_int"},
        ["train_gpt2.hellaswag_score", "plumbing.hellaswag_eval.download"]),
    "fineweb": ("fineweb", "main", {
        "source": "source", "name": None, "text_field": "text", "out": "out_dir", "shard_size": "pos_int",
        "workers": "workers", "prefix": "name"}, ["fineweb.write_shards"]),
    "bench_train": ("bench_train", "argv", {
        "device": ("choice", ["cpu", "cuda"]), "steps": "steps3", "shape": None, "dtype": ("choice", DTYPES),
        "only": ("choice", ["table", "compare", "blocks", "eval"]), "compile": ("choice", ["on", "off", "both"])},
        ["bench_train.run_train", "bench_train.loss_blocks", "bench_train.compare_reference", "bench_train.eval_loss"]),
    "bench_fsdp": ("bench_fsdp", "argv", {"repeats": "pos_int", "model": None}, ["bench_fsdp.run"]),
    "bench_hellaswag": ("bench_hellaswag", "argv", {
        "n": "nonneg_int", "big_n": "nonneg_int", "batch_size": "pos_int", "device": ("choice", DEVICES),
        "dtype": ("choice", DTYPES)}, ["bench_hellaswag.bench", "plumbing.runtime.setup"]),
    "bench_fineweb": ("bench_fineweb", "argv", {"data": "in_file", "repeat": "pos_int", "rounds": "pos_int",
                                                 "workers": "workers"}, ["bench_fineweb.best_rates"]),
    "bench_muon": ("bench_muon", "argv", {"shape": ("choice", ["both", "quickstart", "blocks", "124M"]),
                                           "steps": "nonneg_int", "device": ("choice", ["cpu", "cuda"]),
                                           "variants": ("choice", ["lr", "qkv", "steptime"])},
                   ["bench_muon.bench", "bench_muon.step_times"]),
    "bench_budget": ("bench_budget", "argv", {"data": "in_file", "depths": "pos_int", "minutes": "pos_float"},
                     ["bench_budget.bench"]),
}
CASES = [(cmd, flag) for cmd, (_, _, flags, _) in SPEC.items() for flag, kind in flags.items() if kind is not None]


class Accepted(Exception):
    """The command reached its work with the drawn value."""


def reach_work(*args, **kwargs):
    raise Accepted


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: a text file, a tiny checkpoint, a training log, a file and a directory to be misused."""
    import train_gpt2 as tg
    d = tmp_path_factory.mktemp("ws")
    (d / "small.txt").write_text((ROOT / "input.txt").read_text()[:20000])
    (d / "a_file").write_text("not a directory")
    (d / "a_dir").mkdir()
    (d / "run").mkdir()
    (d / "run" / "log.txt").write_text("0 train 10.0\n0 val 10.5\n1 train 9.0\n")
    model = tg.GPT(tg.GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    torch.save({"format_version": 1, "model": model.state_dict(), "config": vars(model.config), "step": 0},
               d / "model.pt")
    if UNWRITABLE:
        (d / "locked").mkdir(mode=0o500)
    return d


def base_args(cmd, ws):
    """A valid command line for each command, which the drawn value is added to (the last occurrence wins)."""
    return {
        "train": ["--data", ws / "small.txt", "--log_dir", ws / "log", "--n_layer", "2", "--n_head", "2",
                  "--n_embd", "32", "--batch_size", "2", "--seq_len", "32", "--total_batch_size", "128",
                  "--max_steps", "2", "--val_tokens", "256", "--sample_every", "0", "--device", "cpu",
                  "--compile", "off"],
        "sample": ["--checkpoint", ws / "model.pt", "--device", "cpu", "--max_new_tokens", "2", "--num_samples", "1"],
        "export": ["--checkpoint", ws / "model.pt", "--out", ws / "exported"],
        "plot": ["--log_dir", ws / "run", "--out", ws / "plot.png"],
        "evaluate": ["--checkpoint", ws / "model.pt", "--data", ws / "small.txt", "--tokens", "100", "--device", "cpu"],
        "hellaswag": ["--model", ws / "model.pt", "--data", HELLASWAG, "--limit", "2", "--device", "cpu"],
        "fineweb": ["--source", ws / "small.txt", "--out", ws / "shards", "--shard_size", "1000", "--workers", "1"],
        "bench_train": ["--device", "cpu", "--steps", "3"],
        "bench_fsdp": [],
        "bench_hellaswag": ["--n", "2", "--big_n", "0", "--device", "cpu"],
        "bench_fineweb": ["--data", ROOT / "tests" / "data" / "c4_sample.jsonl", "--repeat", "1", "--rounds", "1",
                          "--workers", "1"],
        "bench_muon": ["--shape", "quickstart", "--steps", "10"],
        "bench_budget": ["--depths", "1", "--minutes", "0.1"],
    }[cmd]


def snapshot(path):
    return {p: p.stat().st_size for p in path.rglob("*")} if path.exists() else {}


def call(cmd, argv, monkeypatch):
    """Runs the command in-process; returns its exit code ('accepted' if it reached its work, or the exception
    that escaped)."""
    module, how, _, work = SPEC[cmd]
    mod = importlib.import_module(module)
    for target in work:
        name, attr = target.rsplit(".", 1)
        monkeypatch.setattr(importlib.import_module(name), attr, reach_work)
    try:
        if how == "argv":  # the benches read sys.argv
            monkeypatch.setattr(sys, "argv", [f"{module}.py", *argv])
            mod.main()
        else:
            mod.main([*how.split()[1:], *argv])
        return 0
    except SystemExit as e:
        return e.code
    except Accepted:
        return "accepted"
    except Exception as e:  # a traceback for the user
        return f"{type(e).__name__}: {str(e)[:200]}"


@pytest.mark.parametrize("cmd, flag", CASES, ids=[f"{c}--{f}" for c, f in CASES])
def test_a_value_outside_a_flags_domain_is_one_line_and_exit_2(cmd, flag, ws, monkeypatch, capsys):
    kind = SPEC[cmd][2][flag]
    extra = []
    if isinstance(kind, tuple):
        kind, arg = kind
        strategy = choices_outside(arg) if kind == "choice" else KINDS[kind]
        extra = [] if kind == "choice" else arg
    else:
        strategy = KINDS[kind]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("RANK", raising=False)

    @settings(max_examples=8, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(value=strategy)
    def check(value):
        value = value.replace("{ws}", str(ws))
        before = snapshot(ws)
        argv = [*map(str, base_args(cmd, ws)), *extra, f"--{flag}", value]
        code = call(cmd, argv, monkeypatch)
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("warning:")]
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (value, code, err[-3:])
        assert snapshot(ws) == before, f"{value!r}: files were written"

    check()


def as_python(text):
    """A drawn text as the value a Python caller would give: a number where it reads as one."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


INT_KINDS = {"pos_int", "nonneg_int", "bit", "seed", "minutes", "batch_or_auto"}
FLOAT_KINDS = {"pos_float", "nonneg_float", "dropout", "ratio"}
# --prompt "" is refused only where samples are printed (long_run.check_run_outputs), beyond check()
PYTHON_CASES = [flag for flag, kind in TRAIN.items() if flag != "prompt"]


@pytest.mark.parametrize("flag", PYTHON_CASES)
def test_a_config_built_in_python_is_checked_as_the_command_line_is(flag, ws):
    """train(cfg) from Python (a notebook, a sweep): the same values outside a flag's domain, as Python values (a
    number where the text reads as one), and a bool or the text of a number where the number is wanted, must be
    a one-line UserError from train_flags.check, which runs before any device setup."""
    from plumbing import errors, train_flags
    kind = TRAIN[flag]
    if isinstance(kind, tuple):
        strategy = choices_outside(kind[1])
    elif kind in INT_KINDS | FLOAT_KINDS:
        wrong_type = [True, "2"] + ([2.0] if kind in INT_KINDS else [])
        strategy = KINDS[kind].map(as_python) | st.sampled_from(wrong_type)
    else:
        strategy = KINDS[kind]

    @settings(max_examples=12, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(value=strategy)
    def check(value):
        value = value.replace("{ws}", str(ws)) if isinstance(value, str) else value
        cfg = train_flags.TrainConfig(**{"data": str(ws / "small.txt"), "log_dir": str(ws / "log"), flag: value})
        with pytest.raises(errors.UserError) as e:
            train_flags.check(cfg)
        assert "\n" not in str(e.value), str(e.value)

    check()


@pytest.mark.parametrize("cmd", SPEC)
def test_the_table_names_every_flag_of_every_command(cmd, ws, monkeypatch, capsys):
    """A new flag must be added to SPEC above (with its kind, or None: any text), so that it is fuzzed too."""
    code = call(cmd, ["--help"], monkeypatch)
    shown = set(re.findall(r"^  --(\w+)", capsys.readouterr().out, re.M)) - {"help"}
    assert code == 0 and shown == set(SPEC[cmd][2]), shown
