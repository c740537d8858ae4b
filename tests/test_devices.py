"""The decisions train_gpt2.py makes for each GPU, tested on any machine: what torch.cuda reports (name,
compute capability, memory, the build's architectures) is substituted, and the decision is checked. Also what
the runtime sets up on a CPU."""
import datetime
import sys

import pytest
import torch

import train_gpt2 as tg
from conftest import run_cli
from plumbing import errors, memory, mfu, resume, runtime, train_flags

GiB = 1 << 30
# What PyTorch's CUDA builds carry (torch.cuda.get_arch_list()), from its release support matrix: the CUDA 12.6
# builds still have Maxwell/Pascal/Volta; the CUDA 12.8+ builds (2.10 on) start at Turing.
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
GPUS = {  # as torch.cuda.get_device_name() and get_device_capability() report them
    "GTX 960": ("NVIDIA GeForce GTX 960", (5, 2), 4 * GiB),
    "T4": ("Tesla T4", (7, 5), 15 * GiB),
    "V100": ("Tesla V100-SXM2-16GB", (7, 0), 16 * GiB),
    "A100": ("NVIDIA A100-SXM4-80GB", (8, 0), 80 * GiB),
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0), 80 * GiB),
    "H100 MIG": ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", (9, 0), 10 * GiB),
    "unknown": ("NVIDIA Future GPU 9000", (12, 0), 96 * GiB),
    "RTX 5090": ("NVIDIA GeForce RTX 5090", (12, 0), 32 * GiB),
}


@pytest.fixture
def fake_cuda(monkeypatch):
    """fake_cuda(gpu, arch_list): torch.cuda answers as on that card with that PyTorch build."""
    def install(gpu, arch_list=CU128):
        name, capability, memory = GPUS[gpu]
        for attr, value in dict(is_available=lambda: True, device_count=lambda: 1, set_device=lambda d: None,
                                get_device_name=lambda d=None: name, get_device_capability=lambda d=None: capability,
                                get_arch_list=lambda: arch_list,
                                is_bf16_supported=lambda including_emulation=True: capability >= (8, 0)).items():
            monkeypatch.setattr(torch.cuda, attr, value)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    precision = torch.get_float32_matmul_precision()
    yield install
    torch.set_float32_matmul_precision(precision)


def test_gtx_960_with_a_build_without_its_kernels_stops_with_the_fix(fake_cuda):
    fake_cuda("GTX 960", CU128)
    with pytest.raises(errors.UserError) as e:
        runtime.setup()
    msg = str(e.value)
    assert "GTX 960" in msg and "5.2" in msg and "cu126" in msg and "--device cpu" in msg and "\n" not in msg


def test_a_gpu_newer_than_the_build_is_told_to_upgrade(fake_cuda):
    fake_cuda("RTX 5090", CU126)
    with pytest.raises(errors.UserError, match="pip install -U torch") as e:
        runtime.setup()
    assert "cu126" not in str(e.value)


@pytest.mark.parametrize("gpu, arch_list", [("GTX 960", CU126), ("V100", CU126)])
def test_old_gpus_run_on_a_build_that_has_their_kernels(fake_cuda, gpu, arch_list):
    fake_cuda(gpu, arch_list)
    rt = runtime.setup()
    assert (rt.device, rt.dtype) == ("cuda:0", "fp16")  # no bf16 before Ampere: fp16 with a GradScaler


def test_volta_needs_the_cuda_12_6_build(fake_cuda):
    fake_cuda("V100", CU128)
    with pytest.raises(errors.UserError, match="7.0"):
        runtime.setup()


def test_ptx_of_an_older_architecture_runs_on_a_newer_gpu():
    assert runtime.cuda_arch_supported((12, 0), ["sm_90", "compute_90"])  # the driver compiles the PTX
    assert not runtime.cuda_arch_supported((12, 0), ["sm_90"])  # a cubin runs only within its major version
    assert runtime.cuda_arch_supported((8, 6), ["sm_80"])  # sm_80 code runs on 8.6
    assert not runtime.cuda_arch_supported((8, 0), ["sm_86"])
    assert not runtime.cuda_arch_supported((5, 2), ["sm_60", "compute_60"])
    assert runtime.cuda_arch_supported((9, 0), ["sm_80", "sm_90", "sm_90a", "sm_100", "sm_120"])
    assert runtime.cuda_arch_supported((12, 0), ["sm_90", "sm_100", "sm_120", "compute_120"])
    assert runtime.cuda_arch_supported((9, 4), ["gfx90a", "gfx942"])  # a ROCm build: not judged by CUDA's rules


def test_compile_auto_is_eager_before_volta_and_on_is_an_error(fake_cuda, capsys):
    fake_cuda("GTX 960", CU126)
    rt = runtime.setup()
    assert runtime.use_compile("auto", rt) is False
    assert "7.0" in capsys.readouterr().out  # one line saying why
    with pytest.raises(errors.UserError, match="--compile on"):
        runtime.use_compile("on", rt)
    assert runtime.use_compile("off", rt) is False
    fake_cuda("T4")
    assert runtime.use_compile("auto", runtime.setup()) is True


@pytest.mark.parametrize("gpu, dtype, peak", [("H100", "bf16", 989e12), ("A100", "bf16", 312e12),
                                              ("A100", "fp32", 156e12), ("T4", "fp16", 65e12),
                                              ("V100", "fp32", 15.7e12), ("H100 MIG", "bf16", None),
                                              ("unknown", "bf16", None)])
def test_mfu_peak_is_the_cards_and_the_dtypes(fake_cuda, gpu, dtype, peak):
    fake_cuda(gpu, CU126 if gpu in ("V100",) else CU128 + ["compute_120"])
    rt = runtime.setup(dtype=dtype if dtype != "bf16" else "auto")
    assert rt.dtype == dtype
    assert mfu.peak_flops(rt) == peak


@pytest.mark.parametrize("name, peak", [("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12), ("NVIDIA H200 NVL", 835e12),
                                        ("NVIDIA H200", 989e12), ("Quadro T4000", None), ("NVIDIA T400", None)])
def test_mfu_peak_names_match_exactly(fake_cuda, monkeypatch, name, peak):
    fake_cuda("H100")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    assert mfu.peak_flops(runtime.setup()) == peak  # "L4" must not take "L40"'s peak, nor "T4" "T4000"'s


def test_fp32_on_cuda_uses_tf32_matmuls(fake_cuda):
    fake_cuda("A100")
    runtime.setup(dtype="fp32")
    assert torch.get_float32_matmul_precision() == "high"


def test_torchrun_on_a_mac_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(tg.dist, "init_process_group", lambda *a, **k: pytest.fail("gloo with MPS tensors"))
    with pytest.raises(errors.UserError, match="--device cpu"):
        runtime.setup()


@pytest.mark.parametrize("gpu", [None, "A100"])
def test_resolving_the_runtime_changes_no_process_setting(monkeypatch, fake_cuda, gpu):
    """resolve_runtime is what a notebook or a library calls: it must leave the process as it was (configure_process,
    which the programs call through setup_runtime, makes the settings)."""
    if gpu:
        fake_cuda(gpu)
    monkeypatch.setenv("RANK", "0")  # under torchrun: the process group is configure_process's too
    monkeypatch.setenv("WORLD_SIZE", "1")
    for module, name in [(torch, "use_deterministic_algorithms"), (torch, "set_num_threads"),
                         (torch, "set_float32_matmul_precision"), (torch.cuda, "set_device"),
                         (runtime, "keep_freed_memory"), (runtime.dist, "init_process_group")]:
        monkeypatch.setattr(module, name, lambda *a, name=name, **k: pytest.fail(f"resolve_runtime called {name}"))
    rt = runtime.resolve("auto", "fp32")
    monkeypatch.undo()  # before fake_cuda's teardown, which sets the matmul precision back
    assert (rt.device, rt.dtype, rt.ddp) == ("cuda:0" if gpu else "cpu", "fp32", True)


def test_process_group_timeout_fits_rank_0s_checkpoint_writes(monkeypatch):
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(tg.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(tg.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: None)  # keep this process as it is
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: None)
    runtime.setup("cpu", "fp32", dist_timeout=90)
    assert seen == dict(backend="gloo", timeout=datetime.timedelta(minutes=90))


def test_the_lectures_ddp_setup_reads_torchrun_and_waits_dist_timeout(monkeypatch, tmp_path):
    # train_gpt2.setup_ddp: torchrun's variables, the flags checked first, then the group with --dist_timeout
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(tg.dist, "init_process_group", lambda *a, **kw: seen.update(args=a, **kw))
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: None)  # keep this process as it is
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: None)
    cfg = train_flags.TrainConfig(log_dir=str(tmp_path), device="cpu", dtype="fp32", dist_timeout=90,
                                  total_batch_size=16 * 1024)
    rt = tg.setup_ddp(cfg)
    assert (rt.ddp, rt.rank, rt.world_size, rt.master, rt.device) == (True, 0, 1, True, "cpu")
    assert seen == dict(args=("gloo",), timeout=datetime.timedelta(minutes=90))


FAULTS = """
import resource, statistics, sys, torch
sys.path.insert(0, ".")
import train_gpt2 as tg
from plumbing import runtime
if sys.argv[1] == "setup_runtime":
    runtime.setup("cpu", "auto")
torch.manual_seed(0)
model = tg.GPT(tg.GPTConfig(block_size=64, n_layer=1, n_head=6, n_embd=384))  # its (V, C) fp32 tensors: 77 MB
optimizer = tg.configure_optimizer(model, 1e-3, 0.1, "cpu")
x = torch.randint(0, 50257, (2, 64))
faults = []
for step in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults[3:]))  # the first steps allocate for the first time; then the heap has settled
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (mallopt)")
def test_cpu_steps_reuse_freed_memory_instead_of_faulting_in_new_pages():
    faults = {}
    for how in ("setup_runtime", "the C library's defaults"):
        out = run_cli("-c", FAULTS, how)
        assert out.returncode == 0, out.stderr
        faults[how] = float(out.stdout)
    # Under glibc's defaults the step's large tensors are fresh mmaps, each 4 KB page zeroed by the kernel on its
    # first write: 50,000 to 120,000 page faults a step for this model here (a step's 77 MB tensors are ~19,000
    # pages each). After setup_runtime the heap keeps what a step frees and gives it to the next step: 0 or 1 a
    # step. Other versions of glibc fault more or less, so the claim is the ratio: a tenth at most, from a
    # default that faults at least one 77 MB tensor's pages a step (else there would be nothing to prove here)
    if faults["the C library's defaults"] < 77e6 / 4096:
        pytest.skip(f"this C library already reuses freed memory: {faults}")
    assert faults["setup_runtime"] * 10 < faults["the C library's defaults"], faults


@pytest.mark.parametrize("free, trial_peak, ddp, fits", [
    (3.5 * GiB, 1.5 * GiB, False, True),  # a 4 GB card: 124M's AdamW moments (0.92 GiB) + a 1.5 GiB step fit
    (3.5 * GiB, 1.9 * GiB, False, False),  # a 1.9 GiB one does not: 0.85 GiB stay free for what a trial misses
    (1.5 * GiB, 1.0 * GiB, False, False),  # another process holds 2 GB of the card
    (75 * GiB, 60 * GiB, True, True),
])
def test_cuda_batch_size_auto_leaves_room(free, trial_peak, ddp, fits):
    n_params = 124_000_000
    assert memory.cuda_batch_fits(trial_peak, n_params, free, ddp) == fits


def test_resume_on_another_device_uses_that_devices_adamw(tmp_path):
    # a checkpoint's optimizer groups hold the saving device's `fused` (and that run's weight decay); the resumed
    # optimizer keeps its own, in both directions: saved unfused (as on MPS) into a CPU optimizer (fused), and
    # saved fused (as on CUDA or a CPU) into an MPS one (unfused: MPS has no fused AdamW here)
    model = tg.GPT(tg.GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))
    for saved_on, resumed_on in (("mps", "cpu"), ("cpu", "mps")):
        saved = tg.configure_optimizer(model, 1e-3, 0.5, saved_on)
        state = saved.state_dict()
        resumed = tg.configure_optimizer(model, 1e-3, 0.1, resumed_on)
        mine = [g["fused"] for g in resumed.param_groups]
        assert mine != [g["fused"] for g in state["param_groups"]]  # the two devices differ, or this proves nothing
        resume.load_optimizer_state(resumed, state, resumed_on)
        assert [g["fused"] for g in resumed.param_groups] == mine, (saved_on, resumed_on)
        assert resumed.param_groups[0]["weight_decay"] == 0.1  # this run's flag, not the checkpoint's 0.5


OOM = """
import sys, torch
sys.path.insert(0, ".")
import train_gpt2 as tg
def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
tg.GPT.forward = out_of_memory
tg.main(sys.argv[1:])
"""


def test_out_of_memory_in_training_is_one_line_with_the_fix(small_text, tmp_path):
    out = run_cli("-c", OOM, "--data", small_text, "--log_dir", tmp_path, "--n_layer", "1", "--n_head", "2",
                  "--n_embd", "32", "--batch_size", "4", "--seq_len", "32", "--total_batch_size", "256",
                  "--max_steps", "2", "--eval_every", "0", "--sample_every", "0", "--compile", "off", "--device", "cpu")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "out of memory" in out.stderr and "--batch_size 2" in out.stderr and "--grad_checkpoint 1" in out.stderr
