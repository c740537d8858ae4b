"""Distributed training under torchrun on CPU (gloo): 2 ranks train what 1 process with twice the gradient
accumulation trains, and a 2-rank checkpoint resumes in 1 process."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import HELLASWAG, ROOT, run_cli
from plumbing import hellaswag_eval, memory, resume, runtime, token_files

ARGS = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--batch_size", "2", "--seq_len", "32",
        "--total_batch_size", "256", "--warmup_steps", "2", "--eval_every", "2", "--sample_every", "0",
        "--checkpoint_every", "3", "--val_tokens", "1000", "--max_steps", "6", "--device", "cpu", "--dtype", "fp32",
        "--compile", "off",
        "--hellaswag_every", "3", "--hellaswag_limit", "15", "--hellaswag_data", str(HELLASWAG)]


def torchrun(n, *args, env=None):
    return run_cli("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args, env=env)


def read_log(path):
    """{(step, kind): value} from log.txt."""
    return {(int(s), k): float(v) for s, k, v in (ln.split() for ln in path.read_text().splitlines())}


def weight_diff(a, b):
    """Largest |difference| between the weights of two checkpoints."""
    w1, w2 = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    assert w1.keys() == w2.keys()
    return max((w1[k] - w2[k]).abs().max().item() for k in w1)


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(abs(a[k] - b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(one_process, small_text):
    """The folder of the 1-process run ("one", conftest.py), and of its 2-rank run ("two")."""
    d = one_process.parent
    two = torchrun(2, "train_gpt2.py", "--data", small_text, "--log_dir", d / "two", *ARGS)
    assert two.returncode == 0, two.stderr
    assert "2 ranks x 2 accumulation steps" in two.stdout
    return d


def test_two_ranks_log_what_one_process_logs(runs):
    one, two = read_log(runs / "one" / "log.txt"), read_log(runs / "two" / "log.txt")
    assert len(one) == 6 + 4 + 3  # 6 train lines, val at 0, 2, 4, 6, hella at 0, 3, 6
    diff = max_diff(one, two)
    print(f"max |diff| over {len(one)} logged losses, 1 process vs 2 ranks: {diff:.2e}")
    assert diff < 1e-4
    assert weight_diff(runs / "one" / "model_00006.pt", runs / "two" / "model_00006.pt") < 1e-5


def test_two_ranks_with_muon_take_the_steps_one_process_takes(small_text, tmp_path):
    # every rank orthogonalizes the same averaged gradients: the same update as one process
    args = ["train_gpt2.py", "--data", small_text, *ARGS, "--optimizer", "muon", "--hellaswag_every", "0"]
    one = run_cli(*args, "--log_dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *args, "--log_dir", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    diff = max_diff(read_log(tmp_path / "one" / "log.txt"), read_log(tmp_path / "two" / "log.txt"))
    print(f"max |diff| of the logged losses, 1 process vs 2 ranks, Muon: {diff:.2e}")
    assert diff < 1e-4
    assert weight_diff(tmp_path / "one" / "model_00006.pt", tmp_path / "two" / "model_00006.pt") < 1e-5


def resume_step_3(checkpoint_dir, log_dir, launch, small_text):
    """Copies model_00003.pt of a run into a new log_dir, resumes there with `launch` (one process, or N ranks)
    and returns the resumed run's log.txt as {(step, kind): value}."""
    log_dir.mkdir()
    shutil.copy(checkpoint_dir / "model_00003.pt", log_dir)
    out = launch("train_gpt2.py", "--data", small_text, "--log_dir", log_dir, *ARGS, "--resume", "auto")
    assert out.returncode == 0, out.stderr
    assert "resumed at step 3" in out.stdout
    return read_log(log_dir / "log.txt")


def test_two_rank_checkpoint_resumes_in_one_process(runs, small_text, tmp_path):
    resumed = resume_step_3(runs / "two", tmp_path / "resumed", run_cli, small_text)
    two = {k: v for k, v in read_log(runs / "two" / "log.txt").items() if k[0] >= 3}
    diff = max_diff(two, resumed)
    print(f"max |diff| resumed in 1 process vs continued on 2 ranks: {diff:.2e}")
    assert diff < 1e-4


def test_two_ranks_resume_their_own_checkpoint(runs, small_text, tmp_path):
    run = tmp_path / "two"
    shutil.copytree(runs / "two", run)
    (run / "model_00006.pt").unlink()
    out = torchrun(2, "train_gpt2.py", "--data", small_text, "--log_dir", run, *ARGS, "--resume", "auto")
    assert out.returncode == 0, out.stderr
    assert "resumed at step 3" in out.stdout
    w1 = torch.load(runs / "two" / "model_00006.pt", weights_only=True)["model"]
    w2 = torch.load(run / "model_00006.pt", weights_only=True)["model"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # same ranks, same order of sums: bit-identical


AGREE = """
import sys
sys.path.insert(0, sys.argv[1])
import train_gpt2 as tg
from plumbing import runtime, signals
rt = runtime.setup("cpu", "fp32")
for case in sys.argv[2:]:  # "2,15": rank 0 got SIGINT, rank 1 SIGTERM
    got = [signals.agree_on_signal(int(case.split(",")[rt.rank]), rt) for _ in range(2)]
    print(f"{case}: rank {rt.rank} stops for {got[0]}")
tg.dist.destroy_process_group()  # a group left to the interpreter's exit can abort in gloo's threads
"""
SIGNALS = {"2,0": 2, "2,15": 15}  # the signals ranks 0 and 1 got: the one both stop for


@pytest.fixture(scope="module")
def agreed(tmp_path_factory):
    script = tmp_path_factory.mktemp("agree") / "agree.py"
    script.write_text(AGREE)
    out = torchrun(2, script, ROOT, *SIGNALS)  # every case in one process group
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("signals", SIGNALS)
def test_every_rank_stops_for_the_same_signal(agreed, signals):
    # SIGINT (2) on rank 0 alone must make both ranks exit 130, not 130 and 143
    for rank in (0, 1):
        assert f"{signals}: rank {rank} stops for {SIGNALS[signals]}" in agreed


def test_two_ranks_read_the_shuffled_shards_one_process_reads(tiny_shards, tmp_path):
    logs = {}
    for n in (1, 2):
        args = ["train_gpt2.py", "--data", tiny_shards, "--log_dir", tmp_path / str(n), *ARGS, "--hellaswag_every", "0",
                "--max_steps", "5", "--checkpoint_every", "5"]
        out = run_cli(*args) if n == 1 else torchrun(2, *args)
        assert out.returncode == 0, out.stderr
        logs[n] = read_log(tmp_path / str(n) / "log.txt")
    loader = torch.load(tmp_path / "2" / "model_00005.pt", weights_only=True)["loader"]
    assert loader["shuffle"] == 1 and loader["epoch"] >= 1  # shuffled by default, across an epoch boundary
    diff = max_diff(logs[1], logs[2])
    print(f"max |diff| over {len(logs[1])} logged losses on shuffled shards, 1 process vs 2 ranks: {diff:.2e}")
    assert diff < 1e-4


# --fsdp 1: FSDP2 over 2 CPU ranks (gloo, fp32) against the runs above, and checkpoints across the modes


def fsdp(*args):
    return torchrun(2, "train_gpt2.py", *args, "--fsdp", "1")


@pytest.fixture(scope="module")
def fsdp_run(runs, small_text):
    # samples need a forward on every rank (each holds a shard): they must neither hang nor change the run
    out = fsdp("--data", small_text, "--log_dir", runs / "fsdp", *ARGS, "--sample_every", "6")
    assert out.returncode == 0, out.stderr
    assert "2 ranks x 2 accumulation steps" in out.stdout
    (runs / "fsdp" / "stdout.txt").write_text(out.stdout)
    return runs / "fsdp"


def test_fsdp_samples_are_what_the_sample_command_writes_from_its_checkpoint(fsdp_run):
    printed = [ln.split(": ", 1)[1] for ln in (fsdp_run / "stdout.txt").read_text().splitlines()
               if ln.startswith("sample ")]
    assert len(printed) == 4  # once, from rank 0
    out = run_cli("train_gpt2.py", "sample", "--checkpoint", fsdp_run / "model_00006.pt", "--seed", str(1337 + 6),
                  "--num_samples", "4", "--max_new_tokens", "32", "--device", "cpu", "--dtype", "fp32")
    assert out.returncode == 0, out.stderr
    written = [part.split("\n", 1)[1][:-1] for part in out.stdout.split("--- sample ")[1:]]  # print adds one \n
    assert [repr(t) for t in written] == printed


def test_fsdp_ranks_log_what_one_process_and_ddp_log(runs, fsdp_run):
    logged = read_log(fsdp_run / "log.txt")
    for ref in ("one", "two"):
        diff = max_diff(read_log(runs / ref / "log.txt"), logged)
        print(f"max |diff| over {len(logged)} logged losses, 2 FSDP ranks vs {ref}: {diff:.2e}")
        assert diff < 1e-5
    one = torch.load(runs / "one" / "model_00006.pt", weights_only=True)
    sharded = torch.load(fsdp_run / "model_00006.pt", weights_only=True)
    # the same one-file layout as a 1-process checkpoint: full tensors, keyed like the unwrapped model
    assert one["model"].keys() == sharded["model"].keys()
    assert max((one["model"][k] - sharded["model"][k]).abs().max().item() for k in one["model"]) < 1e-5
    assert one["optimizer"]["param_groups"] == sharded["optimizer"]["param_groups"]
    for i, state in one["optimizer"]["state"].items():
        for k, v in state.items():
            assert v.shape == sharded["optimizer"]["state"][i][k].shape
            assert (v.float() - sharded["optimizer"]["state"][i][k].float()).abs().max().item() < 1e-5, (i, k)


@pytest.mark.parametrize("direction", ["fsdp to one process", "one process to fsdp"])
def test_checkpoints_move_between_fsdp_and_one_process(runs, fsdp_run, small_text, tmp_path, direction):
    launch_fsdp = lambda *args: torchrun(2, *args, "--fsdp", "1")  # noqa: E731
    src, launch = (fsdp_run, run_cli) if direction == "fsdp to one process" else (runs / "one", launch_fsdp)
    resumed = resume_step_3(src, tmp_path / "resumed", launch, small_text)
    one = {k: v for k, v in read_log(runs / "one" / "log.txt").items() if k[0] >= 3}
    diff = max_diff(one, resumed)
    print(f"max |diff| {direction}, vs the uninterrupted 1-process run: {diff:.2e}")
    assert diff < 1e-5
    assert weight_diff(runs / "one" / "model_00006.pt", tmp_path / "resumed" / "model_00006.pt") < 1e-5


def test_fsdp_resumes_its_own_checkpoint_bit_identically_with_grad_checkpoint(fsdp_run, small_text, tmp_path):
    run = tmp_path / "fsdp"
    shutil.copytree(fsdp_run, run)
    (run / "model_00006.pt").unlink()
    # activation checkpointing recomputes each block in backward: the same numbers, less memory
    out = fsdp("--data", small_text, "--log_dir", run, *ARGS, "--resume", "auto", "--grad_checkpoint", "1")
    assert out.returncode == 0, out.stderr
    assert "resumed at step 3" in out.stdout
    w1 = torch.load(fsdp_run / "model_00006.pt", weights_only=True)["model"]
    w2 = torch.load(run / "model_00006.pt", weights_only=True)["model"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_fsdp_resume_keeps_this_runs_optimizer_settings(fsdp_run, small_text, tmp_path):
    # set_optimizer_state_dict restores the saved groups' settings; --weight_decay may change on resume
    run = tmp_path / "fsdp"
    run.mkdir()
    shutil.copy(fsdp_run / "model_00003.pt", run)
    out = fsdp("--data", small_text, "--log_dir", run, *ARGS, "--resume", "auto", "--max_steps", "4",
               "--checkpoint_every", "1", "--weight_decay", "0.5", "--eval_every", "0", "--hellaswag_every", "0")
    assert out.returncode == 0, out.stderr
    groups = torch.load(run / "model_00004.pt", weights_only=True)["optimizer"]["param_groups"]
    saved = torch.load(fsdp_run / "model_00003.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0] and [g["weight_decay"] for g in saved] == [0.1, 0.0]


# --fsdp 1 --compile on (Inductor): the blocks are compiled in place, and evaluation must not compile them again

COUNTING = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch._dynamo
import torch._dynamo.utils as du
import train_gpt2 as tg
torch._dynamo.config.error_on_recompile = True  # any recompile of the training graph is an error
graphs = lambda: du.counters["stats"]["unique_graphs"]
added = {}
def counted(name, fn):  # the graphs compiled while one of the evaluation paths runs
    def wrapper(*args, **kw):
        before = graphs()
        try:
            return fn(*args, **kw)
        finally:
            added[name] = added.get(name, 0) + graphs() - before
    return wrapper
from plumbing import hellaswag_eval
for name, owner, attr in (("evaluate_loss", tg, "evaluate_loss"), ("hellaswag_totals", hellaswag_eval, "totals"),
                          ("sample_texts", tg, "sample_texts")):
    setattr(owner, attr, counted(name, getattr(owner, attr)))
tg.main(sys.argv[2:])
print("graphs", json.dumps({"rank": int(os.environ["RANK"]), "total": graphs(), "added": added}))
"""


@pytest.fixture(scope="module")
def fsdp_compiled(small_text, tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp_compiled")
    (d / "counting.py").write_text(COUNTING)
    out = torchrun(2, d / "counting.py", ROOT, "--data", small_text, "--log_dir", d / "run", *ARGS, "--max_steps", "2",
                   "--eval_every", "2", "--hellaswag_every", "2", "--sample_every", "2", "--checkpoint_every", "2",
                   "--compile", "on", "--fsdp", "1", "--grad_checkpoint", "1")  # checkpoint, compile, shard
    assert out.returncode == 0, out.stderr
    return d / "run", out


def test_fsdp_compiled_evaluation_adds_no_graphs_and_equals_eager(fsdp_compiled, small_text):
    import train_gpt2 as tg
    run, out = fsdp_compiled
    counts = [json.loads(ln.split(" ", 1)[1]) for ln in out.stdout.splitlines() if ln.startswith("graphs ")]
    assert len(counts) == 2, out.stdout
    for c in counts:  # before set_stance("force_eager"): 20 graphs more (1 val, 9 HellaSwag, 10 sampling)
        assert c["total"] >= 1 and c["added"] == {"evaluate_loss": 0, "hellaswag_totals": 0, "sample_texts": 0}, c
    assert "recompile" not in out.stderr
    # the results at step 2 are what eager one-process evaluation of the step-2 checkpoint gives
    logged = read_log(run / "log.txt")
    model = tg.load_model(run / "model_00002.pt").eval()
    rt = runtime.Runtime(False, 0, 0, 1, True, "cpu", "cpu", "fp32")
    val = tg.evaluate_loss(model, token_files.load_split(small_text, "val"), 1000, 2, 32, rt)
    assert abs(val - logged[(2, "val")]) < 2e-6  # the log's 6 decimals
    hella = hellaswag_eval.accuracies(tg.hellaswag_score(model, hellaswag_eval.load_examples(HELLASWAG, limit=15), token_files.get_encoding()))
    assert abs(hella["acc_norm"] - logged[(2, "hella")]) < 2e-6
    printed = [ln.split(": ", 1)[1] for ln in out.stdout.splitlines() if ln.startswith("sample ")]
    eager = tg.sample_texts(model, token_files.get_encoding(), "Hello, I'm a language model,", 4, 32, rt, seed=1337 + 2)
    assert printed == [repr(t) for t in eager]


# --dropout on several ranks: each rank its own masks, and each rank's random state in the checkpoint

def start_torchrun(n, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill_9(proc):
    """kill -9 a torchrun and its workers (each in a session of its own), as a node that crashes is lost."""
    for task in os.listdir(f"/proc/{proc.pid}/task"):  # Linux: the children each of its threads started
        with open(f"/proc/{proc.pid}/task/{task}/children") as f:
            for pid in f.read().split():
                os.kill(int(pid), signal.SIGKILL)
    proc.kill()


def test_two_ranks_draw_their_own_dropout_masks_and_resume_them_bit_exactly_after_kill_9(small_text, tmp_path):
    args = lambda log_dir, *extra: ["train_gpt2.py", "--data", small_text, "--log_dir", log_dir, *ARGS,  # noqa: E731
                                    "--hellaswag_every", "0", "--dropout", "0.1",
                                    "--eval_every", "1", "--val_tokens", "8000", *extra]  # slower steps: time to kill
    ref = torchrun(2, *args(tmp_path / "reference"))
    assert ref.returncode == 0, ref.stderr
    rng = torch.load(tmp_path / "reference" / "model_00003.pt", weights_only=True)["rng"]
    assert len(rng["ranks"]) == 2 and rng["ranks"][1]["cuda"] is None  # CPU: no GPU generator
    assert torch.equal(rng["torch"], rng["ranks"][0]["torch"])
    assert not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])  # one seed for all: equal
    proc = start_torchrun(2, *args(tmp_path / "run"))
    for line in proc.stdout:
        if "step     4 | loss" in line:  # past the checkpoint of step 3
            kill_9(proc)
            break
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and (tmp_path / "run" / "model_00003.pt").is_file()
    assert not (tmp_path / "run" / "model_00006.pt").exists()
    out = torchrun(2, *args(tmp_path / "run", "--resume", "auto"))
    assert out.returncode == 0, out.stderr
    assert "resumed at step 3" in out.stdout
    w1 = torch.load(tmp_path / "reference" / "model_00006.pt", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "run" / "model_00006.pt", weights_only=True)["model"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # rank 1 replaying its step-0 masks would differ
    assert (tmp_path / "run" / "log.txt").read_text() == (tmp_path / "reference" / "log.txt").read_text()


def test_a_checkpoint_of_n_ranks_resumes_each_ranks_stream_on_m_ranks(tmp_path):
    """Rank r continues the stream that rank r saved; a rank the checkpoint has none for starts the new stream
    rank_seed(seed, rank, step). A checkpoint from before per-rank streams (written as the old rng_state wrote
    it, with Python's and NumPy's states) still loads: its one CPU state is rank 0's."""
    import random

    import numpy as np
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]  # two ranks' generators, somewhere in their streams
    for g in gens:
        torch.rand(10, generator=g)
    states = [g.get_state() for g in gens]
    np_state = np.random.get_state(legacy=False)
    old = {"python": random.getstate(), "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
           "pos": np_state["state"]["pos"], "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
           "torch": states[0], "cuda": []}
    new = {"torch": states[0], "cuda": [], "ranks": [{"torch": s, "cuda": None} for s in states]}
    torch.save({"old": old, "new": new}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    continued = lambda state: torch.rand(4, generator=torch.Generator().set_state(state))  # noqa: E731
    started = lambda rank, step: torch.rand(  # noqa: E731
        4, generator=torch.Generator().manual_seed(runtime.rank_seed(1337, rank, step)))
    expected = {("new", 0): continued(states[0]), ("new", 1): continued(states[1]), ("new", 2): started(2, 3),
                ("old", 0): continued(states[0]), ("old", 1): started(1, 3)}
    before = torch.get_rng_state()
    try:
        for (layout, rank), want in expected.items():
            resume.set_rng_state(loaded[layout], rank, "cpu", 1337, 3)
            assert torch.equal(torch.rand(4), want), (layout, rank)
    finally:
        torch.set_rng_state(before)
    assert not torch.equal(started(2, 3), started(2, 0))  # not the masks a new run's rank 2 drew at step 0
    assert not torch.equal(started(0, 0), started(1, 0))  # a new run's ranks: their own masks


@pytest.mark.skipif(not __import__("plumbing.runtime").runtime.cpu_has_bf16(), reason="needs a CPU with AVX512-BF16 or AMX")
def test_fsdp_bf16_trains_what_ddp_bf16_trains(small_text, tmp_path):
    """Two bf16 recipes: DDP autocasts the matmuls' inputs, with fp32 weights, LayerNorms and residual stream; FSDP's
    policy keeps bf16 copies of the weights, so LayerNorm and the residual stream run in bf16 too; both reduce and
    update in fp32. A high learning rate so that 6 steps move the loss (10.8 -> 9.5)."""
    logs = {}
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp", "1"])):
        out = torchrun(2, "train_gpt2.py", "--data", small_text, "--log_dir", tmp_path / name, *ARGS,
                       "--max_lr", "1e-2", "--hellaswag_every", "0", "--checkpoint_every", "0", "--dtype", "bf16",
                       *extra)
        assert out.returncode == 0, out.stderr
        logs[name] = read_log(tmp_path / name / "log.txt")
    diff = max_diff(logs["ddp"], logs["fsdp"])
    print(f"max |diff| over the {len(logs['ddp'])} logged train and val losses, FSDP bf16 vs DDP bf16: {diff:.1e}")
    # Measured on CPU (the same runs in fp32 beside them): DDP bf16 within 2.7e-3 of fp32, FSDP bf16 within 1.0e-3,
    # the two within 3.2e-3 of each other: the size of bf16 rounding here (8 mantissa bits: up to 2^-9 = 2e-3
    # relative in every rounded tensor). The bound is 3x that: the recipes may differ by where they round, not by
    # how they accumulate, reduce or apply the gradients.
    assert diff < 1e-2


MEASURED = """
import json, os, sys
from torch.profiler import ProfilerActivity, profile
sys.path.insert(0, sys.argv[1])
import train_gpt2 as tg
from plumbing import memory
free = int(sys.argv[2])
memory.available_memory = lambda rt: free  # the RAM this rank is told it may use
peaks = {}
def measured(name, fn):  # the peak bytes allocated above the start, the first time fn runs
    def wrapper(*args, **kw):
        if name in peaks:
            return fn(*args, **kw)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn(*args, **kw)
        live = peak = 0
        for e in prof.profiler.kineto_results.events():
            if e.name() == "[memory]":
                live += e.nbytes()
                peak = max(peak, live)
        peaks[name] = peak
        return out
    return wrapper
tg.train_step = measured("train", tg.train_step)  # the first step: AdamW's state is allocated in it
tg.evaluate_loss = measured("eval", tg.evaluate_loss)
tg.main(sys.argv[3:])
print("peaks", json.dumps(peaks))
"""


def test_fsdp_batch_size_auto_picks_what_fits_each_rank(small_text, tmp_path):
    """--batch_size auto with --fsdp 1 (estimated: a trial that ran out of memory on one rank would leave the other
    waiting): with the RAM it is told is free, the batch it picks must fit each rank's first training step (the
    whole gradient and weights between micro-steps, 1/2 of AdamW's state) and its evaluation, measured; the next
    larger batch would not have fit by the estimate."""
    import train_gpt2 as tg
    shape = dict(n_layer=2, n_head=2, n_embd=128)  # short sequences: the weights' share (FSDP's part) is large
    T, ranks, sync_once = 32, 2, True
    model = tg.GPT(tg.GPTConfig(**shape))
    need = {b: memory.memory_needs(model, b, T, "fp32", "cpu", fsdp=(ranks, sync_once)) for b in (4, 8)}
    free = int((max(need[4].values()) + max(need[8].values())) / 2 / memory.CPU_FREE_SHARE)  # 4 fits, 8 not
    script = tmp_path / "measured.py"
    script.write_text(MEASURED)
    args = [str(script), ROOT, str(free), "--data", small_text, "--log_dir", tmp_path / "run",
            *[a for k, v in shape.items() for a in (f"--{k}", str(v))], "--seq_len", str(T), "--batch_size", "auto",
            "--total_batch_size", str(ranks * T * 16), "--fsdp", "1", "--fsdp_sync", "step", "--max_steps", "1",
            "--eval_every", "1", "--val_tokens", str(ranks * 4 * T), "--sample_every", "0", "--checkpoint_every", "0",
            "--device", "cpu", "--dtype", "fp32", "--compile", "off"]
    out = torchrun(ranks, *args)
    assert out.returncode == 0, out.stderr
    assert f"= 4 x {T} x {ranks} ranks x 4 accumulation steps" in out.stdout, out.stdout
    peaks = [json.loads(ln.split(" ", 1)[1]) for ln in out.stdout.splitlines() if ln.startswith("peaks ")]
    assert len(peaks) == ranks
    for p in peaks:  # the estimate holds: what each rank allocated is at most what it was estimated to
        assert p["train"] <= need[4]["train"] and p["eval"] <= need[4]["eval"], (p, need[4])
