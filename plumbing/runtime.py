"""
The runtime: which device, dtype and rank this process is (resolve, the one place that reads the
environment and changes nothing) and the process-wide settings a training program makes for it
(configure_process); setup does both, for the entry points."""

import contextlib
import ctypes
import datetime
import gc
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from plumbing import errors


@dataclass
class Runtime:
    ddp: bool  # launched by torchrun: several processes, one per GPU
    rank: int
    local_rank: int
    world_size: int
    master: bool  # rank 0: logs, writes checkpoints
    device: str
    device_type: str
    dtype: str  # "bf16", "fp16" or "fp32"
    local_world_size: int = 1  # processes on this machine

    def autocast(self):
        """A context for the forward pass: bf16/fp16 autocast, or nothing in fp32."""
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type,
                              dtype=torch.bfloat16 if self.dtype == "bf16" else torch.float16)


DEVICES = ("auto", "cpu", "cuda", "mps")


DTYPES = ("auto", "bf16", "fp16", "fp32")


def setup(device="auto", dtype="auto", dist_timeout=60):
    """What the programs' entry points but training call (sample, evaluate, hellaswag.py, the
    benches): the runtime (resolve), the process configured for it (configure_process) and, under
    torchrun, the process group; train_gpt2.setup_ddp does the same in the lecture's words."""
    rt = resolve(device, dtype)
    configure_process(rt)
    if rt.ddp and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if rt.device_type == "cuda" else "gloo",
                                **rendezvous(rt.rank, rt.world_size, dist_timeout))
    return rt


def launched_rank():
    """torchrun's rank of this process (0 alone), known before any setup: rank 0 holds --log_dir
    from the checks of the flags on (runlog.check_log_dir)."""
    return int(os.environ.get("RANK", 0))


def torchrun_ranks():
    """(ddp, rank, local_rank, world_size) as torchrun's environment variables give them ((False, 0,
    0, 1) for a process started alone); train_gpt2.setup_ddp reads them the same way."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    return (ddp, launched_rank(), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def resolve(device="auto", dtype="auto", ranks=None):
    """The device and dtype of this process, checked against the hardware and this PyTorch build;
    its ranks as ranks gives them (ddp, rank, local_rank, world_size), else as torchrun's variables
    do (torchrun_ranks). It changes nothing in the process, so a notebook or a library user can
    call it (and then configure_process, or not)."""
    ddp, rank, local_rank, world_size = ranks or torchrun_ranks()
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    for name, value, choices in ("device", device, DEVICES), ("dtype", dtype, DTYPES):
        if value not in choices:  # as the command line's choices= would say it
            raise errors.UserError(f"unknown --{name} {value!r}; use {', '.join(choices)}")
    if device == "auto":
        device = ("cuda" if torch.cuda.is_available()
                  else "mps" if torch.backends.mps.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise errors.UserError("--device cuda but PyTorch sees no CUDA GPU; "
                               "use --device cpu (or auto)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise errors.UserError("--device mps but MPS is not available here; "
                               "use --device cpu (or auto)")
    if device == "mps" and ddp:
        raise errors.UserError("torchrun cannot train on MPS (its gloo backend does not carry MPS "
                               "tensors); run one process on MPS, or torchrun with --device cpu")
    device_type = device
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise errors.UserError(
                f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs; "
                f"use --nproc_per_node={torch.cuda.device_count()} or fewer")
        device = f"cuda:{local_rank}"
        name, capability = (torch.cuda.get_device_name(device),
                            torch.cuda.get_device_capability(device))
        arch_list = torch.cuda.get_arch_list()
        if not cuda_arch_supported(capability, arch_list):
            # e.g. a GTX 960 (Maxwell, 5.2) with a CUDA 12.8+ build would die at the first kernel
            fix = ("a newer PyTorch built for a newer CUDA (pip install -U torch)"
                   if capability >= (7, 5) else "a build for CUDA 12.6, the last with Maxwell, "
                   "Pascal and Volta: pip install 'torch<2.15' --index-url "
                   "https://download.pytorch.org/whl/cu126 (see docs/speed-and-memory.md)")
            raise errors.UserError(
                f"this PyTorch build has no kernels for the {name} (compute capability "
                f"{capability[0]}.{capability[1]}; it has {' '.join(arch_list)}); "
                f"install {fix}, or use --device cpu")
    # native bf16: CUDA GPUs from Ampere (compute capability 8.0) on, as
    # torch.cuda.is_bf16_supported says of the current GPU (asked of this rank's here: nothing is
    # made current yet); CPUs with AVX512-BF16 or AMX
    bf16_ok = (capability >= (8, 0) or torch.version.hip is not None if device_type == "cuda"
               else cpu_has_bf16() if device_type == "cpu" else False)
    if dtype == "auto":
        # bf16 where the hardware does it natively; fp16 (with a GradScaler) on older GPUs such as
        # the GTX 960 this project started on; fp32 everywhere else.
        dtype = "bf16" if bf16_ok else "fp16" if device_type == "cuda" else "fp32"
    if dtype == "bf16" and device_type == "cuda" and not bf16_ok:
        raise errors.UserError("--dtype bf16 but this GPU has no bf16 support; "
                               "use --dtype fp16 (or auto)")
    if dtype == "fp16" and device_type == "cpu":
        raise errors.UserError("--dtype fp16 is not supported for training on CPU; "
                               "use --dtype bf16 or fp32 (or auto)")
    return Runtime(ddp, rank, local_rank, world_size, rank == 0, device, device_type, dtype,
                   local_world_size)


def configure_process(rt):
    """The process-wide settings a training program makes for its runtime (opt-in: setup calls
    this), and what each costs:
    - CUDA: this rank's GPU as the current one; with fp32, matmuls on TF32 tensor cores (Ampere and
      newer): ~8x the fp32 speed, products rounded to 10 mantissa bits (results differ from strict
      fp32 at ~1e-3).
    - CPU: deterministic algorithms, for bit-reproducible runs (no measurable cost:
      docs/checkpoints.md); the cores shared between the local ranks (overrides torchrun's
      OMP_NUM_THREADS=1); freed memory kept for the next step (keep_freed_memory: no page faults in
      a step, the largest gain on CPU, docs/speed-and-memory.md; but the process keeps its peak
      memory until it exits)."""
    if rt.device_type == "cuda":
        torch.cuda.set_device(rt.device)
        if rt.dtype == "fp32":
            # fp32 matmuls on TF32 tensor cores (ignored before Ampere): 10 mantissa bits in the
            # products, fp32 accumulation. The GPT-2 reproduction recipes train this way.
            torch.set_float32_matmul_precision("high")
    if rt.device_type == "cpu":
        # Bitwise reproducibility on CPU. Compiled, the backward of an embedding lookup is a
        # scatter-add that Inductor runs as a parallel loop of atomic adds (index_put with
        # accumulate=True lowers to ir.Scatter(scatter_mode="atomic_add") in
        # torch/_inductor/lowering.py). Where a token or position repeats in a batch, its gradient
        # row is summed in whatever order the threads arrive, and float addition is not associative:
        # two runs differed by ~1e-9. Deterministic mode makes Inductor call ATen's index_put_
        # instead, which accumulates serially on CPU. Filling new tensors with NaN (on by default in
        # that mode, to catch reads of uninitialized memory) only costs time, so it is off.
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        # torchrun sets OMP_NUM_THREADS=1 per process; share the cores among the local ranks instead
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores // rt.local_world_size))
        keep_freed_memory()


def rendezvous(rank, world_size, minutes):
    """init_process_group's keywords beside the backend: where the ranks meet, and how long every
    collective waits (minutes: rank 0 alone may write a big checkpoint while the others wait).

    Under torchrun the ranks meet in torchrun's own store, which outlives the workers it restarts
    (--max-restarts): a restarted group would read the previous round's addresses there and fail
    or hang in init_process_group (pytorch/pytorch#135712). On one node each round meets under a
    prefix of its own, its TORCHELASTIC_RESTART_COUNT. On several nodes that count is each node's
    own (an agent whose workers did not fail restarts without counting), so no prefix is safe: the
    env:// rendezvous, and where restarts are allowed, one line naming the variable that makes
    torchrun give every round a new store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)."""
    timeout = datetime.timedelta(minutes=minutes)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return dict(timeout=timeout)
    if int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1:  # several nodes
        if rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0:
            print("warning: torchrun's restarts on several nodes can hang in init_process_group "
                  "(pytorch/pytorch#135712); set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before "
                  "torchrun on every node (docs/scale.md)", file=sys.stderr)
        return dict(timeout=timeout)
    # a client of torchrun's store, as env:// makes it when the agent's store is shared
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    round_ = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dict(store=dist.PrefixStore(f"round{round_}", store), rank=rank, world_size=world_size,
                timeout=timeout)


def end_process_group():
    """Under torchrun, leaves the process group at the end of training (a no-op otherwise). The DDP
    wrapper is freed first (gc), as it holds the group and destroying the group under it can hang or
    abort."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def keep_freed_memory():
    """On Linux with glibc, keep the memory that tensors free for the next allocation instead of
    handing it back to the operating system. Returns whether it could.

    Why: a CPU step allocates and frees the same large tensors every time (the (V, C) fp32 gradients
    of the tied embedding are 51 MB at 256 wide). glibc serves every block over 32 MB, and many
    smaller ones, with a fresh mmap and unmaps it on free, so each step touches new pages: the
    kernel zeroes them one 4 KB page fault at a time, ~100,000 faults a step at 4L-256, about a
    quarter of its time (bench/bench_train.py compares a step with the C library's defaults).
    M_MMAP_MAX = 0 serves large blocks from the heap, which glibc reuses; a high M_TRIM_THRESHOLD
    stops it from trimming the heap back (mallopt(3)). PyTorch's Performance Tuning Guide reaches
    the same end on CPU by preloading jemalloc or tcmalloc. The cost: the process keeps its peak
    memory until it exits, as a training run's would be anyway."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        # the C library this process runs on; returns 1 where it took
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's <malloc.h>
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def autocast_dtype(device_type, default):
    """The dtype autocast runs matmuls in on this device type where it is on, else default (no
    autocast)."""
    return (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
            else default)


def cpu_has_bf16():
    """Whether this CPU does bf16 matmuls natively (AVX512-BF16 or AMX): elsewhere they are
    emulated, slower than fp32, so --dtype auto picks fp32 there."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: stay with fp32
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cuda_arch_supported(capability, arch_list):
    """Does this PyTorch build carry kernels for a GPU of this compute capability? Code built for
    sm_XY runs on X.y for y >= Y (same major version); PTX for compute_XY is compiled by the driver
    for any capability >= X.Y (NVIDIA's CUDA C++ Programming Guide, "Binary Compatibility" and "PTX
    Compatibility")."""
    if not any(a.startswith(("sm_", "compute_")) for a in arch_list):
        return True  # a ROCm build lists gfx targets: AMD GPUs are not judged here
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        # "sm_90a" and the like are tied to one chip: the plain "sm_90" is listed beside
        if number.isdigit():
            built = (int(number[:-1]), int(number[-1]))
            if (kind == "sm" and built[0] == capability[0] and built[1] <= capability[1]) or \
                    (kind == "compute" and built <= tuple(capability)):
                return True
    return False


# Triton, torch.compile's GPU code generator, supports Volta and newer
TRITON_MIN_CAPABILITY = (7, 0)


def torch_version():
    """(major, minor) of the installed PyTorch, for the features that need a newer one (FSDP2)."""
    return tuple(int(n) for n in re.findall(r"\d+", torch.__version__)[:2])


def use_compile(flag, rt):
    """--compile on/off/auto -> whether to torch.compile. auto: on CPU and CUDA, except GPUs older
    than Volta."""
    old_gpu = (rt.device_type == "cuda"
               and torch.cuda.get_device_capability(rt.device) < TRITON_MIN_CAPABILITY)
    if old_gpu and flag == "on":
        raise errors.UserError(
            f"--compile on needs a GPU of compute capability {TRITON_MIN_CAPABILITY[0]}.0 or newer "
            f"(Triton); the {torch.cuda.get_device_name(rt.device)} is older: "
            "use --compile off or auto")
    if old_gpu and flag == "auto":
        if rt.master:
            print(f"compile: off: the {torch.cuda.get_device_name(rt.device)} is older than "
                  f"compute capability {TRITON_MIN_CAPABILITY[0]}.0, which Triton (torch.compile "
                  "on GPUs) needs; training runs eagerly")
        return False
    # process-wide: with auto, a model that fails to compile (no C++ compiler) runs eagerly
    torch._dynamo.config.suppress_errors = flag == "auto"
    return flag == "on" or (flag == "auto" and rt.device_type in ("cuda", "cpu"))


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() for the duration (no dropout), then the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def most_on_any_rank(n, rt):
    """The largest n over the ranks: how many forwards each rank runs when FSDP needs all to run the
    same."""
    most = torch.tensor(n, device=rt.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most)


def to_device(tensors, rt):
    """The CPU tensors on rt's device; to a GPU from page-locked memory, so that the copy overlaps
    the GPU's work instead of waiting for it."""
    if rt.device_type == "cuda":
        return [t.pin_memory().to(rt.device, non_blocking=True) for t in tensors]
    return [t.to(rt.device) for t in tensors]


def barrier(rt):
    """Every rank waits here for all the others (one process: nothing to wait for)."""
    if rt.ddp:
        dist.barrier()


def sum_over_ranks(values, rt):
    """The numbers summed over the ranks (float64: a val loss sums millions of terms), as floats."""
    where = rt.device if rt.ddp else "cpu"  # MPS has no float64, and needs no sum
    totals = torch.tensor(values, dtype=torch.float64, device=where)
    if rt.ddp:
        dist.all_reduce(totals)
    return totals.tolist()


def rank_seed(seed, rank, step=0):
    """The seed of one rank's random stream (dropout's masks; the initial weights come from --seed
    itself, the same on every rank): SeedSequence mixes (seed, rank, step) into unrelated seeds, so
    that ranks draw different masks (nanoGPT adds the rank to the seed). step > 0: a new stream for
    a rank that a resumed checkpoint has none for."""
    return int(np.random.SeedSequence([seed % 2**64, rank, step]).generate_state(1)[0])
