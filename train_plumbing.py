"""
The plumbing of train_gpt2.py: what its training loop calls to run safely on real machines, kept out of the
lecture. Nothing here is needed to follow how GPT-2 is pretrained; all of it is needed to pretrain it for
days on machines that fail. train_gpt2.py, train_extras.py, hellaswag.py, the benches and (inside its main, so
that its tokenizer processes need no torch) fineweb.py import this file; it imports nothing of the project.

    the runtime        resolve_runtime(): the one place that reads the environment (torchrun's ranks, the
                       device, the dtype; which GPUs this PyTorch build can run), changing nothing;
                       configure_process(): the process-wide settings of a training program, each with its cost
                       (the process group, TF32, deterministic mode, threads, freed memory kept);
                       setup_runtime(): both, for the programs' entry points
    flags              Flag: what each flag of every command accepts; FlagParser: argparse, errors as one line
    checks             flags against each other, the runtime or a checkpoint (resume: what may change); a log
                       never lost
    token files        uint16 shards (.npy, llm.c's .bin) memory-mapped and checked; a text file tokenized once
    the run's log      log.txt, Weights & Biases (--wandb_project), the console (rank 0 only)
    checkpoints        atomic writes, save, load (weights_only; other programs' formats by content), --resume
                       auto, exact restore, retention
    signals and errors SIGTERM/SIGINT -> a checkpoint and a clean exit on every rank; the out-of-memory line
    memory             the bytes one block of the loss may take
    FLOPs              per token, and each device's peak, for MFU
    FSDP               --fsdp 1: sharding, and checkpoints that any mode can resume
    from the network   the GPT-2 tokenizer (tiktoken); HellaSwag's official files, downloaded and verified,
                       and its counts summed over the ranks
    Hugging Face       GPT-2 weights from the hub or a directory, into our names and layout
    other programs     build-nanogpt's, nanoGPT's and llm.c's checkpoints, and llm.c's token shards
"""

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import functools
import gc
import glob
import hashlib
import json
import math
import os
import re
import signal
import socket
import stat
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint

try:  # file locks (write_atomic); not on Windows, where abandoned temporaries go by age alone
    import fcntl
except ImportError:
    fcntl = None


class UserError(Exception):
    """Bad input from the user: every command's main() (train_gpt2.py's, hellaswag.py's, fineweb.py's, the
    benches') prints the message as one line, `error: ...`, and exits with code 2."""


# ---- flags: what each one accepts ----

INT64_MAX = 2**63 - 1  # every integer flag ends up in a tensor or a C long somewhere


class Flag:
    """What a flag accepts, declared next to it: its type, range, choices, or what kind of path it must be.
    parse() is argparse's type (text -> value, so that text that is no number is one line too); problem()
    says what is wrong with a value, for check_flags, which runs before any device or process-group setup.

    kind int or float (always finite), with lo/hi bounds (lo_open/hi_open: excluded), `also` other words it
    takes ("auto"); kind str with choices, or path: "file", "dir", "exists" (either), "out_dir" (a directory
    to write into: one that is writable, or one that can be created), "out_file" (a file to write: its folder
    exists and is writable), "name" (a part of file names: no folders). empty: whether "" is a value (never
    for paths). hint: appended to the message."""

    def __init__(self, kind=str, lo=None, hi=None, lo_open=False, hi_open=False, choices=None, path=None,
                 also=(), empty=False, hint=""):
        if kind is int and hi is None:
            hi = INT64_MAX
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.choices, self.path, self.also, self.empty, self.hint = choices, path, also, empty, hint

    def parse(self, text):
        """argparse's type: the text as the flag's kind (its extra words, such as auto, as they are)."""
        if self.kind is str or text in self.also:
            return text
        try:
            return self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if self.kind is int else 'a number'}"
                                             f"{' or ' + ' or '.join(self.also) if self.also else ''}, got "
                                             f"{text!r}") from None

    def problem(self, name, value):
        """The message for flag --name with this value, or None where the value is in its domain."""
        message = self._problem(value)
        if message is None:
            return None
        if self.choices is not None and value not in self.choices and value != "":
            message = f"unknown --{name} {value}; use {', '.join(self.choices)}{self.hint}"
        else:
            message = f"--{name} {message}{self.hint}"
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)  # one line, whatever was typed

    def _problem(self, value):
        """What is wrong with value, without the flag's name (problem() adds it), or None."""
        if value in self.also:
            return None
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
                return f"must be {'an integer' if self.kind is int else 'a number'}, got {value!r}"
            if self.kind is float and not math.isfinite(value):
                return f"must be a finite number, got {value}"
            low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
            high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
            if (self.lo, self.hi) == (0, 1) and self.kind is int and (low or high):
                return f"must be 0 or 1, got {value}"
            if low or high:
                if self.kind is float and self.lo is not None and self.hi is not None:
                    what = f"be in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
                elif high:
                    what = f"be {'below' if self.hi_open else 'at most'} {self.hi}"
                elif self.lo == 0:
                    what = "be positive" if self.lo_open else "not be negative"
                else:
                    what = "be positive" if self.lo == 1 and self.kind is int else f"be at least {self.lo}"
                return f"must {what}{' or ' + ' or '.join(self.also) if self.also else ''}, got {value}"
            return None
        if value == "" and not self.empty:
            return "must not be empty"
        if self.choices is not None and value not in self.choices:
            return "unknown"
        return path_problem(value, self.path) if self.path else None


def path_problem(path, kind):
    """What is wrong with path as a `kind` path (see Flag), or None. Nothing is created."""
    if kind in ("file", "dir", "exists"):
        if not os.path.exists(path):
            return f"{path} does not exist"
        if kind == "file" and os.path.isdir(path):
            return f"{path} is a directory, not a file"
        if kind == "dir" and not os.path.isdir(path):
            return f"{path} is not a directory"
        return None
    if kind == "name":  # a part of a file name: no folders in it
        return f"{path} must be a plain name, without / or .." if os.sep in path or path in (".", "..") else None
    folder = path if kind == "out_dir" else os.path.dirname(os.path.abspath(path))
    if kind == "out_file" and os.path.isdir(path):
        return f"{path} is a directory; give a file name"
    if kind == "out_file" and not os.path.isdir(folder):
        return f"{path}: its folder does not exist; create it or choose another"
    if kind == "out_dir":
        if os.path.exists(folder) and not os.path.isdir(folder):
            return f"{path} is a file, not a directory"
        while not os.path.exists(folder):  # the directory is created later, inside the nearest one that exists
            folder = os.path.dirname(os.path.abspath(folder))
        if not os.path.isdir(folder):
            return f"{path} cannot be created: {folder} is a file"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{path} is not writable ({folder}); choose a writable place"
    return None


def check_flags(values, flags):
    """Each value against its Flag ({name: Flag}); values is an object with the flags as attributes. None is
    "not given" (the flags whose default is None). The first problem is the error."""
    for name, flag in flags.items():
        value = getattr(values, name)
        if value is not None and (message := flag.problem(name, value)):
            raise UserError(message)


class FlagParser(argparse.ArgumentParser):
    """argparse with its errors (unknown flags, missing values, a value that is no number) as one UserError line
    instead of the usage text and exit 2; flag(name, Flag, default, help) adds a flag and notes its Flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.flags = {}

    def flag(self, name, flag, default=None, help="", **kwargs):
        """--name, parsed by its Flag and checked against it by parse()."""
        self.flags[name] = flag
        self.add_argument(f"--{name}", type=flag.parse, default=default, help=help, **kwargs)

    def error(self, message):
        """argparse's errors as one UserError line that points at --help (instead of the usage and exit 2)."""
        message = re.sub(r"^argument --(\w+)(/-\w+)?: ", r"--\1 ", message)
        raise UserError(f"{message}; see {self.prog} --help")

    def parse(self, argv):
        """The flags, parsed and checked."""
        args = self.parse_args(argv)
        check_flags(args, self.flags)
        return args

    @classmethod
    def dataclass(cls, config_class, argv, **kwargs):
        """A config_class (whose fields are arg()s) from the command line argv, parsed, not yet checked: its own
        check (train_gpt2.check_config) runs once the world size is known."""
        parser = cls(**kwargs)
        for f in dataclasses.fields(config_class):
            parser.flag(f.name, f.metadata["flag"], f.default, f.metadata["help"])
        return config_class(**vars(parser.parse_args(argv)))


def arg(default, flag, help):
    """A config field with the one-line help that --help shows and the Flag that says what it accepts."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


def cli(main):
    """A command's entry point: main(argv) with a UserError as one line on stderr and exit code 2; a signal that
    stopped training (its checkpoint written) as the signal's exit code; Ctrl-C before that as 130, no traceback."""
    def run(argv=None):
        try:
            return main(sys.argv[1:] if argv is None else argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Stopped as e:
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    return run


# ---- the runtime: device, dtype, distributed ----


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
        return torch.autocast(self.device_type, dtype=torch.bfloat16 if self.dtype == "bf16" else torch.float16)


DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "bf16", "fp16", "fp32")


def setup_runtime(device="auto", dtype="auto", check=None, dist_timeout=60):
    """What the programs' entry points call (training, sample, evaluate, hellaswag.py, the benches): the runtime
    (resolve_runtime), then the process configured for it (configure_process)."""
    rt = resolve_runtime(device, dtype, check)
    configure_process(rt, dist_timeout)
    return rt


def resolve_runtime(device="auto", dtype="auto", check=None):
    """The one place that reads the environment: rank and world size from torchrun, the device, the dtype.
    check(world_size), if given, validates the flags first. It changes nothing in the process, so a notebook or a
    library user can call it (and then configure_process, or not)."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # set by torchrun
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    check_flags(argparse.Namespace(device=device, dtype=dtype), {"device": Flag(choices=DEVICES),
                                                                 "dtype": Flag(choices=DTYPES)})
    if check is not None:
        check(world_size)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but PyTorch sees no CUDA GPU; use --device cpu (or auto)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps but MPS is not available here; use --device cpu (or auto)")
    if device == "mps" and ddp:
        raise UserError("torchrun cannot train on MPS (its gloo backend does not carry MPS tensors); run one "
                        "process on MPS, or torchrun with --device cpu")
    device_type = device
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs; use "
                            f"--nproc_per_node={torch.cuda.device_count()} or fewer")
        device = f"cuda:{local_rank}"
        name, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        arch_list = torch.cuda.get_arch_list()
        if not cuda_arch_supported(capability, arch_list):
            # e.g. a GTX 960 (Maxwell, 5.2) with a CUDA 12.8+ build: it would die at the first kernel
            fix = ("a newer PyTorch built for a newer CUDA (pip install -U torch)" if capability >= (7, 5) else
                   "a build for CUDA 12.6, the last with Maxwell, Pascal and Volta: pip install 'torch<2.15' "
                   "--index-url https://download.pytorch.org/whl/cu126 (see docs/speed-and-memory.md)")
            raise UserError(f"this PyTorch build has no kernels for the {name} (compute capability "
                            f"{capability[0]}.{capability[1]}; it has {' '.join(arch_list)}); install {fix}, or use "
                            "--device cpu")
    # native bf16: CUDA GPUs from Ampere (compute capability 8.0) on, as torch.cuda.is_bf16_supported says of the
    # current GPU (asked of this rank's here: nothing is made current yet); CPUs with AVX512-BF16 or AMX
    bf16_ok = (capability >= (8, 0) or torch.version.hip is not None if device_type == "cuda"
               else cpu_has_bf16() if device_type == "cpu" else False)
    if dtype == "auto":
        # bf16 where the hardware does it natively; fp16 (with a GradScaler) on older GPUs such as the
        # GTX 960 this project started on; fp32 everywhere else.
        dtype = "bf16" if bf16_ok else "fp16" if device_type == "cuda" else "fp32"
    if dtype == "bf16" and device_type == "cuda" and not bf16_ok:
        raise UserError("--dtype bf16 but this GPU has no bf16 support; use --dtype fp16 (or auto)")
    if dtype == "fp16" and device_type == "cpu":
        raise UserError("--dtype fp16 is not supported for training on CPU; use --dtype bf16 or fp32 (or auto)")
    return Runtime(ddp, rank, local_rank, world_size, rank == 0, device, device_type, dtype, local_world_size)


def configure_process(rt, dist_timeout=60):
    """The process-wide settings a training program makes for its runtime (opt-in: setup_runtime calls this), and
    what each costs:
    - CUDA: this rank's GPU as the current one; with fp32, matmuls on TF32 tensor cores (Ampere and newer): ~8x
      the fp32 speed, products rounded to 10 mantissa bits (results differ from strict fp32 at ~1e-3).
    - CPU: deterministic algorithms, for bit-reproducible runs (no measurable cost: docs/checkpoints.md); the
      cores shared between the local ranks (overrides torchrun's OMP_NUM_THREADS=1); freed memory kept for the
      next step (keep_freed_memory: no page faults in a step, the largest gain on CPU, docs/speed-and-memory.md;
      but the process keeps its peak memory until it exits).
    - torchrun: the process group (NCCL or gloo), whose collectives wait dist_timeout minutes."""
    if rt.device_type == "cuda":
        torch.cuda.set_device(rt.device)
        if rt.dtype == "fp32":
            # fp32 matmuls on TF32 tensor cores (ignored before Ampere): 10 mantissa bits in the products, fp32
            # accumulation. The GPT-2 reproduction recipes train this way.
            torch.set_float32_matmul_precision("high")
    if rt.device_type == "cpu":
        # Bitwise reproducibility on CPU. Compiled, the backward of an embedding lookup is a scatter-add
        # that Inductor runs as a parallel loop of atomic adds (index_put with accumulate=True lowers to
        # ir.Scatter(scatter_mode="atomic_add") in torch/_inductor/lowering.py). Where a token or position
        # repeats in a batch, its gradient row is summed in whatever order the threads arrive, and float
        # addition is not associative: two runs differed by ~1e-9. Deterministic mode makes Inductor call
        # ATen's index_put_ instead, which accumulates serially on CPU. Filling new tensors with NaN (on by
        # default in that mode, to catch reads of uninitialized memory) only costs time, so it is off.
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        # torchrun sets OMP_NUM_THREADS=1 per process; share the cores between the local ranks instead.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores // rt.local_world_size))
        keep_freed_memory()
    if rt.ddp and not dist.is_initialized():
        # The default timeout (10 minutes for NCCL) would abort the job while rank 0 alone writes a big
        # checkpoint (gpt2-xl: ~19 GB) and the others wait for it in the next collective.
        dist.init_process_group(backend="nccl" if rt.device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=dist_timeout))


def end_process_group():
    """Under torchrun, leaves the process group at the end of training (a no-op otherwise). The DDP wrapper is freed
    first (gc), as it holds the group and destroying the group under it can hang or abort."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def keep_freed_memory():
    """On Linux with glibc, keep the memory that tensors free for the next allocation instead of handing it back
    to the operating system. Returns whether it could.

    Why: a CPU step allocates and frees the same large tensors every time (the (V, C) fp32 gradients of the
    tied embedding are 51 MB at 256 wide). glibc serves every block over 32 MB, and many smaller ones, with a
    fresh mmap and unmaps it on free, so each step touches new pages: the kernel zeroes them one 4 KB page
    fault at a time, ~100,000 faults a step at 4L-256, about a quarter of its time (bench/bench_train.py
    compares a step with the C library's defaults). M_MMAP_MAX = 0 serves large blocks from the heap, which
    glibc reuses; a high M_TRIM_THRESHOLD stops it from trimming the heap back (mallopt(3)). PyTorch's
    Performance Tuning Guide reaches the same end on CPU by preloading jemalloc or tcmalloc. The cost: the
    process keeps its peak memory until it exits, as a training run's would be anyway."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on; returns 1 where it took
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's <malloc.h>
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def autocast_dtype(device_type, default):
    """The dtype autocast runs matmuls in on this device type where it is on, else default (no autocast)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


def cpu_has_bf16():
    """Whether this CPU does bf16 matmuls natively (AVX512-BF16 or AMX): elsewhere they are emulated, slower than
    fp32, so --dtype auto picks fp32 there."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: stay with fp32
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cuda_arch_supported(capability, arch_list):
    """Does this PyTorch build carry kernels for a GPU of this compute capability? Code built for sm_XY runs on
    X.y for y >= Y (same major version); PTX for compute_XY is compiled by the driver for any capability >= X.Y
    (NVIDIA's CUDA C++ Programming Guide, "Binary Compatibility" and "PTX Compatibility")."""
    if not any(a.startswith(("sm_", "compute_")) for a in arch_list):
        return True  # a ROCm build lists gfx targets: AMD GPUs are not judged here
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        if number.isdigit():  # "sm_90a" and the like are tied to one chip: the plain "sm_90" is listed beside
            built = (int(number[:-1]), int(number[-1]))
            if (kind == "sm" and built[0] == capability[0] and built[1] <= capability[1]) or \
                    (kind == "compute" and built <= tuple(capability)):
                return True
    return False


TRITON_MIN_CAPABILITY = (7, 0)  # Triton, torch.compile's GPU code generator, supports Volta and newer


def torch_version():
    """(major, minor) of the installed PyTorch, for the features that need a newer one (FSDP2)."""
    return tuple(int(n) for n in re.findall(r"\d+", torch.__version__)[:2])


def use_compile(flag, rt):
    """--compile on/off/auto -> whether to torch.compile. auto: on CPU and CUDA, except GPUs older than Volta."""
    old_gpu = rt.device_type == "cuda" and torch.cuda.get_device_capability(rt.device) < TRITON_MIN_CAPABILITY
    if old_gpu and flag == "on":
        raise UserError(f"--compile on needs a GPU of compute capability {TRITON_MIN_CAPABILITY[0]}.0 or newer "
                        f"(Triton); the {torch.cuda.get_device_name(rt.device)} is older: use --compile off or auto")
    if old_gpu and flag == "auto":
        if rt.master:
            print(f"compile: off: the {torch.cuda.get_device_name(rt.device)} is older than compute capability "
                  f"{TRITON_MIN_CAPABILITY[0]}.0, which Triton (torch.compile on GPUs) needs; training runs eagerly")
        return False
    return flag == "on" or (flag == "auto" and rt.device_type in ("cuda", "cpu"))


# ---- checks that need the runtime or a checkpoint ----


def check_train_flags(cfg, flags):
    """The training flags that need no model: each against its Flag, then the pairs that exclude each other.
    train_gpt2.check_config adds the model's shape and the batch arithmetic, then check_run_outputs."""
    check_flags(cfg, flags)
    problems = [  # (is it wrong?, what to say)
        (cfg.resume and cfg.init_from, "--resume and --init_from exclude each other: resume continues a run, "
         "init_from starts one"),
        (cfg.init_step and not cfg.init_from, "--init_step needs --init_from: it is where the schedule starts for "
         "those weights"),
        (not 0 <= cfg.init_step < cfg.max_steps, f"--init_step must be in [0, --max_steps), got {cfg.init_step}"),
        (cfg.init_from and os.path.isdir(cfg.init_from) and not os.path.isfile(f"{cfg.init_from}/config.json"),
         f"{cfg.init_from} has no config.json; give a Hugging Face GPT-2 directory"),
    ]
    for wrong, message in problems:
        if wrong:
            raise UserError(message)


def check_run_outputs(cfg):
    """What the run will show and write, last of the checks (the tokenizer is loaded only once the flags are
    sound): the samples' prompt, the log directory (an earlier run's log is never overwritten), wandb's import
    (missing: said before anything is written)."""
    if cfg.sample_every and not get_encoding().encode(cfg.prompt, allowed_special="all"):
        raise UserError("--prompt is empty; give some text for the samples (or --sample_every 0)")
    check_log_dir(cfg)
    if cfg.wandb_project is not None:
        import_wandb()


def check_seq_len(seq_len, block_size):
    """--seq_len against the model's block size (its position table has no row past it)."""
    if seq_len > block_size:
        raise UserError(f"--seq_len {seq_len} is larger than the model's block size {block_size}; use --seq_len "
                        f"{block_size} or less")


def check_fsdp(cfg, rt):
    """--fsdp against the runtime that setup_runtime chose (world and dtype)."""
    if cfg.fsdp and not rt.ddp:
        raise UserError("--fsdp 1 shards over the ranks that torchrun starts: launch with torchrun "
                        "--nproc_per_node=N (in one process, leave --fsdp off)")
    if cfg.fsdp and rt.dtype == "fp16":
        raise UserError("--fsdp 1 trains in bf16 or fp32, not fp16 (no loss scaling for shards here); use --dtype "
                        "fp32, or DDP")
    if cfg.fsdp and torch_version() < (2, 6):
        raise UserError(f"--fsdp 1 needs PyTorch 2.6 or newer (FSDP2's fully_shard), this is {torch.__version__}; "
                        "pip install -U torch (requirements.txt)")


def data_shuffle(cfg):
    """--shuffle, or its default: shuffle shard directories (many documents, read again every epoch); keep a
    text file (one document, usually small) in order, as before --shuffle existed."""
    return bool(cfg.shuffle if cfg.shuffle is not None else os.path.isdir(cfg.data))


# What a resumed run may change (the resume table in docs/checkpoints.md). A flag that decides which tokens come next, or what
# the model is, must stay: a new value would repeat or skip data, or continue another model than the one saved.
# The optimizer's and the schedule's settings may change (a NaN stop says: resume with a lower --max_lr); each new
# value takes effect from the resumed step, with one line saying so. Everything else (the machine, --batch_size,
# the world size, periodic work, where the log goes) is free: exact resume on any number of ranks is a promise.
RESUME_KEEP = {  # flag: why it must stay
    "data": "the data position counts tokens of these files",
    "seq_len": "the data position counts seq_len-token blocks, and a shuffled epoch permutes them",
    "seed": "the data order and the samples come from it",
    "model": "the model's shape comes from it",
}
RESUME_APPLIED = ("max_lr", "min_lr_ratio", "warmup_steps", "max_steps", "weight_decay", "grad_clip", "dropout",
                  "total_batch_size")


def data_files(data):
    """What --data holds, as checkpoints record it: [name, bytes] of a text file, or of each .npy in a directory.
    Names and sizes, not paths: the same files moved to another disk or node still resume."""
    paths = sorted(glob.glob(os.path.join(data, "*.npy"))) if os.path.isdir(data) else [data]
    return [[os.path.basename(p), os.path.getsize(p)] for p in paths if os.path.isfile(p)]


def check_resume(cfg, ckpt, master):
    """The flags against the checkpoint's own (train_config), before anything is loaded: a change that would
    repeat or skip data or change the model is refused; a new optimizer or schedule setting is applied, said in
    one line. A checkpoint from before some flag existed is not checked for it."""
    path, saved, step = ckpt["path"], ckpt.get("train_config") or {}, ckpt["step"]
    keep = "resume with --{0} {1}, or start a new run from its weights: --init_from {2} and another --log_dir"
    for name, why in RESUME_KEEP.items():
        if name == "data" and "data_files" in ckpt:  # by content: the same files elsewhere are the same data
            if data_files(cfg.data) != ckpt["data_files"]:
                raise UserError(f"{path} was trained on --data {saved.get('data')}, and --data {cfg.data} holds other "
                                f"files ({why}); " + keep.format(name, saved.get("data"), path))
            continue
        if name not in saved or saved[name] == getattr(cfg, name):
            continue
        if name == "data":  # from before data_files: the path is all there is, and it may have moved
            if master:
                print(f"note: {path} does not record its data files; continuing on --data {cfg.data}")
            continue
        raise UserError(f"{path} was trained with --{name} {saved[name]}, not {getattr(cfg, name)} ({why}); " +
                        keep.format(name, saved[name], path))
    if cfg.max_steps < step:
        raise UserError(f"{path} is at step {step}, past --max_steps {cfg.max_steps}; give --max_steps {step} or more")
    for name in RESUME_APPLIED:
        if name in saved and saved[name] != getattr(cfg, name) and master:
            print(f"resume: --{name} {getattr(cfg, name)} (the checkpoint's was {saved[name]}) applies from step {step}")


def check_data_order(cfg, ckpt, master):
    """A resumed run continues in its checkpoint's data order: changing it mid-epoch would repeat or skip data."""
    was = int(ckpt["loader"].get("shuffle", 0))
    if cfg.shuffle is not None and cfg.shuffle != was:
        raise UserError(f"{ckpt['path']} was trained with --shuffle {was}; resume with --shuffle {was} or without "
                        "the flag")
    if master and "shuffle" not in ckpt["loader"] and data_shuffle(cfg):
        print(f"{ckpt['path']} is from before --shuffle: the data continues in file order")


# ---- token files: shards and text ----


def load_tokens(path):
    """A uint16 token shard, memory-mapped: it is read from disk only as batches need it. A .npy (fineweb.py,
    build-nanogpt) or llm.c's .bin, whose 256-int32 header read_llmc_tokens checks."""
    if path.endswith(".bin"):
        arr = read_llmc_tokens(path)
    else:
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise UserError(f"{path} is not a readable .npy token shard ({e}); re-create it with fineweb.py") from None
        if arr.dtype != np.uint16 or arr.ndim != 1:
            raise UserError(f"{path} holds {arr.dtype} of shape {arr.shape}, expected a 1-D uint16 token array; "
                            "re-create it with fineweb.py")
    # one pass over the shard (~0.1 s per 100M tokens): another tokenizer's ids would be an infinite loss, or
    # on a GPU a device-side assert, much later
    if len(arr) and (top := int(arr.max())) >= GPT2_VOCAB:
        raise UserError(f"{path} holds token id {top}, but GPT-2's ids end at {GPT2_VOCAB - 1}: it was made "
                        "with another tokenizer; re-create it with fineweb.py")
    return arr


def shard_paths(data_dir, split):
    """The shards of one split ("train"/"val") in a directory: the .npy (or llm.c .bin) files with that word in
    their name (edufineweb_val_000000.npy, fineweb_val_000000.bin), ordered by the number in their name."""
    paths = [p for p in glob.glob(os.path.join(data_dir, "*.npy")) + glob.glob(os.path.join(data_dir, "*.bin"))
             if split in re.split(r"[^a-z]+", os.path.basename(p).lower())]
    return sorted(paths, key=lambda p: [int(n) for n in re.findall(r"\d+", os.path.basename(p))] or [0])


def load_splits(data, splits=("train", "val")):
    """Token arrays of each split, as a list per split. data is a directory of .npy shards, or a text file (read
    and tokenized once) of which the last 10% is the val split."""
    if os.path.isdir(data):
        paths = {split: shard_paths(data, split) for split in splits}
        for split in splits:
            if not paths[split]:
                raise UserError(f"{data} has no {split} shards (*{split}*.npy or .bin); create them with fineweb.py")
        return [[load_tokens(p) for p in paths[split]] for split in splits]
    tokens = text_tokens(data)  # read and tokenized once, for both splits
    n_val = len(tokens) // 10  # the val split is the end of the text: no sentence is in both
    return [[tokens[: len(tokens) - n_val]] if split == "train" else [tokens[len(tokens) - n_val:]] for split in splits]


def load_split(data, split):
    """Token arrays of one split (load_splits)."""
    return load_splits(data, (split,))[0]


def text_tokens(path):
    """The GPT-2 tokens of a UTF-8 text file, as uint16."""
    if not os.path.isfile(path):
        raise UserError(f"--data {path} does not exist; give a text file or a directory of .npy shards")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8 first") from None
    if not text.strip():
        raise UserError(f"{path} is empty; give a text file with some text in it")
    # encode_ordinary: text that happens to contain "<|endoftext|>" is just text, not the special token
    return np.array(get_encoding().encode_ordinary(text), dtype=np.uint16)


def shards_that_fill(shards, n, rank=0):
    """The shards with at least n tokens (one micro-batch); a shorter one is skipped with a warning, and none
    long enough is an error that says what to lower."""
    short = [s for s in shards if len(s) < n]
    names = ", ".join(f"{getattr(s, 'filename', None) or 'the text'} ({len(s)} tokens)" for s in short)
    if len(short) == len(shards):
        raise UserError(f"no train data fills one micro-batch of batch_size*seq_len+1 = {n} tokens: {names}; "
                        "lower --batch_size or --seq_len, or use more data")
    if short and rank == 0:
        print(f"warning: skipping train shards shorter than one micro-batch ({n} tokens): {names}", file=sys.stderr)
    return [s for s in shards if len(s) >= n]


def first_tokens(shards, n=None):
    """The first n tokens of a split (None: all of it), across its shards, reading no more of them than that."""
    return np.concatenate([np.asarray(s[:n]) for s in shards])[:n]


# ---- the run's log ----


class RunLog:
    """What a run reports, from rank 0 only: events to log.txt, one "<step> <kind> <value>" per line (the format
    `plot` and users' scripts read); the same to W&B with more numbers (--wandb_project); lines to the console."""

    def __init__(self, cfg, rt, s):
        self.rt, self.file, self.tracker = rt, os.path.join(cfg.log_dir, "log.txt"), None
        if not rt.master:
            return
        try:
            os.makedirs(cfg.log_dir, exist_ok=True)
            report_abandoned_temporaries(cfg.log_dir, LOG_DIR_FILES)  # a kill -9's leftovers
            if not s.step and os.path.isfile(self.file) and os.path.getsize(self.file):
                # --resume auto found nothing to resume: the earlier run's log is kept, not overwritten
                print(f"kept the log of an earlier run that wrote no checkpoint as {set_aside(self.file)}")
            rewrite_log(self.file, s.step)
        except OSError as e:
            raise UserError(f"cannot write to --log_dir {cfg.log_dir} ({e.strerror}); choose a writable directory") \
                from None
        config = dataclasses.asdict(s.model.config)
        print(f"model: {s.model.num_params() / 1e6:.2f}M parameters, {config}")
        print(f"device {rt.device} ({rt.dtype}), world size {rt.world_size}, {cfg.total_batch_size} tokens/step = "
              f"{s.batch_size} x {cfg.seq_len} x {rt.world_size} ranks x {s.grad_accum} accumulation steps")
        if s.step:
            print(f"{'resumed' if cfg.resume else 'continuing the learning-rate schedule'} at step {s.step}")
        if cfg.wandb_project is not None:
            self.tracker = start_wandb(cfg, s.wandb_id, {
                **dataclasses.asdict(cfg), "model_config": config, "world_size": rt.world_size,
                "batch_size": s.batch_size, "grad_accum": s.grad_accum, "num_params": s.model.num_params()})
            s.wandb_id = self.tracker.id  # saved in checkpoints: a resumed run continues this W&B run

    def __call__(self, event, line=None, extra=None):
        """event for log.txt and W&B, with the extra numbers for W&B (None: not known); line for the console."""
        if not self.rt.master:
            return
        try:
            with open(self.file, "a") as f:
                f.write(event + "\n")
        except OSError as e:
            raise UserError(f"cannot append to {self.file} ({e.strerror}); free some disk space and continue with "
                            "--resume auto") from None
        if self.tracker is not None:
            step, kind, value = event.split()
            kind = {"train": "train/loss", "val": "val/loss", "hella": "hellaswag/acc_norm"}[kind]
            self.tracker.log({"step": int(step), kind: float(value),
                              **{k: v for k, v in (extra or {}).items() if v is not None}})
        self.print(line)

    def step(self, step, loss, lr, norm, dt, tok_s, mfu, step_times, max_steps):
        """The line of one optimizer step, with the time left: the median of the recent steps' times (one slow
        step moves it little) times the steps left; n/a at a run's first step, whose time is mostly compilation."""
        left = float(np.median(step_times)) * (max_steps - step - 1) if step_times else None
        self(f"{step} train {loss:.6f}",
             f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | {1000 * dt:.1f} ms | "
             f"{tok_s:,.0f} tok/s | MFU " + (f"{mfu:.1f}%" if mfu is not None else "n/a") +
             (" (above 100%: the CPU's measured peak is too low; was it busy?)" if mfu and mfu > 100 else "") +
             f" | ETA {'n/a' if left is None else format_duration(left)}",
             {"train/lr": lr, "train/grad_norm": norm, "train/tok_per_s": tok_s, "train/mfu": mfu})
        if len(step_times) == 4 and step + 1 < max_steps:  # after the 5th step
            self.print(f"at {float(np.median(step_times)):.3g} s a step, the {max_steps - step - 1} steps left take "
                       f"about {format_duration(left)} (evaluations, samples and checkpoints come on top)")

    def print(self, line):
        """A console line, from rank 0 only."""
        if self.rt.master and line is not None:
            print(line)

    def finish(self):
        """The end of the run: W&B closed; on a GPU, its peak memory printed."""
        if self.tracker is not None:
            self.tracker.finish()
        if self.rt.master and self.rt.device_type == "cuda":
            print(f"peak GPU memory {torch.cuda.max_memory_allocated(self.rt.device) / 2**30:.2f} GiB")


def format_duration(seconds):
    """3725.0 -> '1h02m', 125.0 -> '2m05s', 7.3 -> '7s': the time left, as the step line shows it."""
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def import_wandb():
    """The wandb module, or one line saying how to install it: checked before a run writes anything."""
    try:
        import wandb  # optional: only runs with --wandb_project need it installed
    except ImportError:
        raise UserError("--wandb_project needs the wandb package: pip install wandb (or drop --wandb_project)") \
            from None
    return wandb


def start_wandb(cfg, run_id, config):
    """--wandb_project: a W&B run (on rank 0) that gets the events of log.txt and the per-step numbers of stdout.
    run_id (from the checkpoint) continues that run; None starts a new one. Its files go to --log_dir/wandb."""
    wandb = import_wandb()
    try:
        run = wandb.init(project=cfg.wandb_project, id=run_id, resume="allow", dir=cfg.log_dir, config=config)
    except Exception as e:  # no API key, no network, a bad project name...
        raise UserError(f"could not start the W&B run ({type(e).__name__}: {str(e).splitlines()[0][:200]}); run "
                        "`wandb login`, set WANDB_MODE=offline, or drop --wandb_project") from None
    # The x axis is our step, not W&B's own counter: a resumed run logs again the steps after its checkpoint.
    run.define_metric("*", step_metric="step")
    return run


def check_log_dir(cfg):
    """A new run never overwrites an earlier run's log.txt. Where the earlier run wrote checkpoints, a new run is
    refused (checkpoint_to_resume); where it wrote none (stopped before its first), too, unless it is --resume
    auto, which keeps the log under another name (RunLog, set_aside)."""
    log_file = os.path.join(cfg.log_dir, "log.txt")
    if not cfg.resume and os.path.isfile(log_file) and os.path.getsize(log_file) and not find_checkpoints(cfg.log_dir):
        raise UserError(f"{log_file} holds the log of an earlier run that wrote no checkpoint; move it away or choose "
                        "another --log_dir (--resume auto keeps it as log.1.txt and starts fresh)")


def set_aside(path):
    """Renames path (log.txt) to the first free log.1.txt, log.2.txt, ... beside it; returns the new name."""
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(f"{stem}.{n}{ext}"):
        n += 1
    os.rename(path, f"{stem}.{n}{ext}")
    return f"{stem}.{n}{ext}"


def rewrite_log(log_file, start_step):
    """On resume, keep only the log lines of the steps before start_step: the run repeats the rest."""
    lines = []
    if start_step > 0 and os.path.exists(log_file):
        with open(log_file) as f:
            lines = [ln for ln in f if ln.split()[:1] and ln.split()[0].isdigit() and int(ln.split()[0]) < start_step]
    write_atomic(log_file, lambda f: f.writelines(lines), mode="w")


# ---- checkpoints ----

CHECKPOINT_FORMAT = 1  # bump when the layout of the checkpoint dict changes
CHECKPOINT_RE = re.compile(r"^model_(\d{5,})\.pt$")
LOG_DIR_FILES = CHECKPOINT_RE.pattern.strip("^$") + r"|log\.txt"  # what training writes in --log_dir


def write_atomic(path, write, mode="wb"):
    """Every file this program writes goes through here: write(f) fills a temporary file, which is then
    renamed to `path`, so a crash at any moment leaves either the old file or the complete new one under
    `path`, never half a file. A write that fails removes its temporary file. The temporary name is unique
    (two writers of one file, such as two runs in one --log_dir, never share one) and in the target's folder,
    so that the rename stays on one file system; "x" mode creates it new, with the usual permissions. The name
    also says which machine writes it, and the writer holds a lock on the file until it is renamed, so that a
    later run can tell what a kill -9 left behind from a write in progress (remove_abandoned_temporaries)."""
    tmp = None
    try:
        f = None
        while f is None:
            tmp = f"{path}.{this_machine()}.{uuid.uuid4().hex[:12]}.tmp"
            f = open(tmp, mode.replace("w", "x"))
            if lock(f, wait=True) and not os.fstat(f.fileno()).st_nlink:
                f.close()  # a sweep removed it between its creation and our lock: take another name
                f = None
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:  # renamed while still locked (POSIX renames open files; Windows does not)
                os.replace(tmp, path)
        if fcntl is None:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError, TypeError):  # TypeError: tmp None, nothing was created
            os.remove(tmp)
        raise


def lock(f, wait=False):
    """An exclusive lock on the open file f, released when it is closed or its process dies. Returns whether it
    was taken: False where locks do not work (Windows; file systems mounted without them, such as Lustre's
    default); raises BlockingIOError where another process holds it and not wait."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        raise
    except OSError:  # ENOLCK, ENOSYS, EOPNOTSUPP: no locks here
        return False
    return True


@functools.cache  # read once: every write and every swept file asks
def this_machine():
    """Who can see this process's file locks, as write_atomic's temporary names hold it: the running kernel's boot
    id (every container on this machine shares it, another machine never does), else the host name."""
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            return hashlib.sha256(f.read().strip().encode()).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"


ABANDONED_AFTER = 3600  # seconds untouched after which a temporary file whose lock cannot be tried is abandoned


def remove_abandoned_temporaries(folder, targets):
    """Deletes the temporary files of write_atomic in `folder` that no write will finish: those a kill -9, a
    lost node or a full disk left, 0.5 GB each for a 124M checkpoint, which would otherwise pile up at every
    preemption. Only the temporaries of files whose names match `targets` (a regex: the files this program writes
    there), and only plain files. One of this machine's is abandoned when no process holds its lock (the kernel
    drops a killed process's locks); one whose lock cannot be tried (another machine's, where locks may not reach;
    an earlier version's, whose name says no machine; a file system without locks) when untouched for
    ABANDONED_AFTER seconds. What cannot be read or removed is left alone. Returns the names removed, and bytes."""
    removed, size = [], 0
    pattern = re.compile(rf"^(?:{targets})\.(?:(?P<machine>[A-Za-z0-9-]+)\.)?[0-9a-f]{{12}}\.tmp$")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        match, path = pattern.match(name), os.path.join(folder, name)
        if not match:
            continue
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            with open(path, "rb") as f:
                try:
                    locked = match["machine"] == this_machine() and lock(f)
                except BlockingIOError:  # a write in progress
                    continue
                st = os.fstat(f.fileno())
                if not locked and time.time() - st.st_mtime <= ABANDONED_AFTER:
                    continue
                os.remove(path)  # while holding its lock: a writer that just created it sees it gone
        except OSError:  # gone already (another run's sweep), unreadable, not ours to remove
            continue
        removed.append(name)
        size += st.st_size
    return removed, size


def report_abandoned_temporaries(folder, targets):
    """remove_abandoned_temporaries, said in one line when it found any."""
    removed, size = remove_abandoned_temporaries(folder, targets)
    if removed:
        names = ", ".join(removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
        amount = f"{size / 1e6:,.1f} MB" if size >= 1e5 else f"{size:,} bytes"
        print(f"removed {len(removed)} temporary file{'s' * (len(removed) > 1)} that interrupted writes left in "
              f"{folder} ({amount}): {names}")


def atomic_save(obj, path):
    """torch.save, atomically (see write_atomic); a failed write is a UserError that leaves the rest intact."""
    try:
        write_atomic(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:  # torch.save's zip writer reports a full disk as a RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed; is the disk full?"
        raise UserError(f"could not write {path}: {reason}; free some disk space or choose another --log_dir "
                        "(earlier checkpoints are intact), then continue with --resume auto") from None


def save_checkpoint(path, model, optimizer, scaler, step, loader, train_config, wandb_id=None, fsdp=False):
    """Called on every rank (under FSDP all of them gather the state); rank 0 writes the file."""
    model_sd, optimizer_sd = training_state(model, optimizer, fsdp)
    rng = [rng_state(next(model.parameters()).device)]  # every rank's own generators, gathered to rank 0
    if dist.is_initialized():
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, rng_state(next(model.parameters()).device))
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    atomic_save({
        "format_version": CHECKPOINT_FORMAT,
        "model": model_sd,
        "optimizer": optimizer_sd,
        "config": dataclasses.asdict(model.config),  # train_gpt2.GPTConfig(**ckpt["config"]) rebuilds the model
        "train_config": dataclasses.asdict(train_config),
        "data_files": data_files(train_config.data),  # what --data held: a resume on other files is refused
        "step": step,  # optimizer steps done
        "loader": loader.state_dict(),
        # "ranks": each rank's; "torch"/"cuda": rank 0's, where checkpoints from before per-rank streams kept theirs
        "rng": {"torch": rng[0]["torch"], "cuda": [rng[0]["cuda"]] if rng[0]["cuda"] is not None else [], "ranks": rng},
        "scaler": scaler.state_dict(),
        "wandb_id": wandb_id,  # the W&B run that a resumed run continues (a str), or None
    }, path)
    # the temporaries no write will finish, also another machine's once an hour old (a job preempted, moved here)
    report_abandoned_temporaries(os.path.dirname(path) or ".", LOG_DIR_FILES)


def rank_seed(seed, rank, step=0):
    """The seed of one rank's random stream (dropout's masks; the initial weights come from --seed itself, the same
    on every rank): SeedSequence mixes (seed, rank, step) into unrelated seeds, so that ranks draw different masks
    (nanoGPT adds the rank to the seed). step > 0: a new stream for a rank that a resumed checkpoint has none for."""
    return int(np.random.SeedSequence([seed % 2**64, rank, step]).generate_state(1)[0])


def rng_state(device):
    """This process's generators: the CPU's, and its GPU's (None off CUDA). Plain tensors, which
    torch.load(weights_only=True) reads. Nothing of this program draws from Python's or NumPy's global ones."""
    device = torch.device(device)
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, rank, device, seed, step):
    """Rank `rank` continues the random streams that rank saved in the checkpoint's state["ranks"]. A checkpoint of
    N ranks resumed on M: ranks below N continue theirs (rank 0 also from a checkpoint from before per-rank
    streams, which held rank 0's alone, and whose Python and NumPy states are ignored); ranks from N up start new
    streams, rank_seed(seed, rank, step); the streams of ranks from M up end with the checkpoint."""
    saved = state.get("ranks") or [{"torch": state["torch"], "cuda": state["cuda"][0] if state["cuda"] else None}]
    device = torch.device(device)
    if rank >= len(saved):
        torch.manual_seed(rank_seed(seed, rank, step))  # the CPU's generator and every GPU's
        return
    torch.set_rng_state(saved[rank]["torch"])
    if device.type == "cuda":
        if saved[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(saved[rank]["cuda"], device)
        else:  # a checkpoint written off CUDA
            torch.cuda.manual_seed(rank_seed(seed, rank, step))


def load_checkpoint(path, mmap=False):
    """A checkpoint dict, read without unpickling arbitrary objects (weights_only=True), or a UserError.
    Recognized by content: ours, build-nanogpt's, nanoGPT's and llm.c's (read_foreign_checkpoint), the
    others' turned into ours with their own "source" and (if known) "step", and no training state.
    mmap: tensors are read from disk only when used (FSDP's other ranks never use the weights: rank 0
    broadcasts them)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; check the path (or use --resume auto)")
    with open(path, "rb") as f:
        if f.read(4) == LLMC_MODEL_MAGIC.to_bytes(4, "little"):
            return read_llmc_model(path)
    try:  # the one class another program pickles beside its weights may be built, as a stand-in (see below)
        with torch.serialization.safe_globals([(PickledGPTConfig, "__main__.GPTConfig")]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        name = re.search(r"GLOBAL (\S+)", str(e)) if "weights_only" in str(e) else None
        reason = f"it holds a pickled {name[1] if name else 'object'}, and only tensors and plain values are read" \
            if "weights_only" in str(e) else "it is truncated or not a PyTorch file"
        raise UserError(f"{path} is not a valid checkpoint ({reason}); point to another checkpoint") from None
    if isinstance(ckpt, dict) and (isinstance(ckpt.get("config"), PickledGPTConfig) or "model_args" in ckpt):
        return read_foreign_checkpoint(ckpt, path)
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint of train_gpt2.py (no model/config/step), nor one of "
                        "build-nanogpt, nanoGPT or llm.c; point to another one")
    if ckpt.get("format_version", 0) > CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {ckpt['format_version']}, newer than this train_gpt2.py "
                        f"reads ({CHECKPOINT_FORMAT}); update train_gpt2.py")
    ckpt["path"] = path  # for messages; not stored in the file
    return ckpt


def find_checkpoints(log_dir):
    """Checkpoint paths in log_dir, newest step first."""
    names = [n for n in os.listdir(log_dir) if CHECKPOINT_RE.match(n)] if os.path.isdir(log_dir) else []
    return [os.path.join(log_dir, n) for n in sorted(names, key=lambda n: -int(CHECKPOINT_RE.match(n)[1]))]


def checkpoint_to_resume(cfg, rt):
    """The checkpoint dict that --resume names (None: a new run). Rank 0 chooses; every rank loads that one."""
    if not cfg.resume and find_checkpoints(cfg.log_dir):
        raise UserError(f"{cfg.log_dir} already holds checkpoints of a run; continue it with --resume auto, or "
                        "start a new run with another --log_dir")
    ckpt = resume_checkpoint(cfg.resume, cfg.log_dir) if cfg.resume and rt.master else None
    if cfg.resume and rt.ddp:
        chosen = [ckpt["path"] if ckpt else None]
        dist.broadcast_object_list(chosen, src=0)
        if not rt.master and chosen[0]:
            if not os.path.isfile(chosen[0]):
                raise UserError(f"rank {rt.rank} cannot see {chosen[0]}; put --log_dir on storage every node shares")
            ckpt = load_checkpoint(chosen[0], mmap=bool(cfg.fsdp))
    return ckpt


def resume_checkpoint(resume, log_dir):
    """The checkpoint dict to resume from, or None to start fresh (only where log_dir has none)."""
    def load_resumable(path):
        """A checkpoint that can be resumed (it has the optimizer, data position, random state), else an error."""
        ckpt = load_checkpoint(path)
        missing = {"optimizer", "loader", "rng", "scaler"} - ckpt.keys()
        if missing:
            raise UserError(f"{path} holds weights but not the training state ({', '.join(sorted(missing))}); "
                            "start a new run from it with --init_from instead")
        return ckpt

    if resume != "auto":
        return load_resumable(resume)
    paths = find_checkpoints(log_dir)
    for path in paths:
        try:
            return load_resumable(path)
        except UserError as e:
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
    if paths:
        raise UserError(f"--resume auto: none of the {len(paths)} checkpoints in {log_dir} is valid; "
                        "move them away to start fresh, or --resume a good checkpoint")
    return None


def restore_state(s, ckpt, cfg, rt):
    """Puts a checkpoint's training state into s: weights, AdamW's moments, the loss scale, the data position,
    every random generator and the step, so that training continues exactly as if it had never stopped."""
    load_training_state(s.model, s.optimizer, ckpt, cfg.fsdp, rt.device_type)
    # load_state_dict restored the saved weight decay; --weight_decay may change on resume (check_resume). The
    # first group is the decayed one (train_gpt2.configure_optimizer)
    s.optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay
    if s.scaler.is_enabled() and ckpt["scaler"]:  # a bf16/fp32 run's scaler holds nothing to restore
        s.scaler.load_state_dict(ckpt["scaler"])
    if ckpt["loader"]["shard"] >= len(s.loader.shards):
        raise UserError(f"{ckpt['path']} was trained on more shards than --data {cfg.data} has; resume with "
                        "the same --data")
    check_data_order(cfg, ckpt, rt.master)
    s.loader.load_state_dict(ckpt["loader"])
    set_rng_state(ckpt["rng"], rt.rank, rt.device, cfg.seed, ckpt["step"])
    s.step, s.last_good, s.wandb_id = ckpt["step"], ckpt["path"], ckpt.get("wandb_id")


def load_optimizer_state(optimizer, state, device_type):
    """AdamW's saved state, with this device's options: load_state_dict restores the saved param groups' own
    `fused` flag, so a CPU checkpoint would resume unfused on CUDA (and a CUDA one ask for fused on CPU)."""
    # before loading: load_state_dict also moves AdamW's step counters by the saved groups' flag
    groups = [{**saved, "fused": group["fused"]} for saved, group in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})


def prune_checkpoints(log_dir, keep, step, protect=None):
    """--keep_checkpoints: delete all but the `keep` newest checkpoints of steps up to `step`, the one just
    written. Called only after that one is completely on disk (write_atomic), so a crash at any moment
    leaves at least one whole checkpoint. Checkpoints of later steps (left by an earlier life of the run,
    e.g. truncated ones that --resume auto skipped) are left alone: training overwrites them when it gets
    there. `protect` is never deleted: the newest checkpoint known to give a finite loss (at first the one
    this run resumed from), the one a NaN stop tells the user to go back to."""
    done = [p for p in find_checkpoints(log_dir) if int(CHECKPOINT_RE.match(os.path.basename(p))[1]) <= step]
    for path in done[keep:]:
        if not (protect and os.path.abspath(path) == os.path.abspath(protect)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


# ---- signals and errors in the loop ----


class StopSignal:
    """SIGTERM/SIGINT (preemption, Ctrl-C) ask for a clean stop: the step in progress finishes, a checkpoint
    is written, and the program exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), which
    schedulers tell from success. A second signal gets the default behaviour: exit at once. Under torchrun a
    repeated SIGTERM is expected (the scheduler signals every process and torchrun forwards its own), so
    there only a second Ctrl-C exits at once."""

    def __init__(self, ddp=False):
        self.signum = 0
        self.ddp = ddp
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        """The signal handler: note the signal; the loop stops after its step."""
        if self.signum:
            return  # a repeated SIGTERM under torchrun: already stopping
        self.signum = signum
        for s in (signal.SIGINT,) if self.ddp else (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
        # os.write, not print: a handler may interrupt a print in progress
        os.write(2, f"{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                    "(signal again to exit at once)\n".encode())


class Stopped(Exception):
    """Training stopped for a signal, after writing a checkpoint: main() exits with 128 + the signal number."""

    def __init__(self, signum):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


def keeps_signal_handlers(fn):
    """fn (train), with the SIGTERM and SIGINT handlers put back as they were when it returns or raises: a notebook
    or a sweep that calls train() keeps its Ctrl-C."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return fn(*args, **kwargs)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return wrapper


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
    """The largest n over the ranks: how many forwards each rank runs when FSDP needs all to run the same."""
    most = torch.tensor(n, device=rt.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most)


def agree_on_signal(signum, rt):
    """The signal that stops every rank (0: none): the largest any rank received, so that all ranks stop at the
    same step and exit with the same code, whichever of them got it."""
    if not rt.ddp:
        return signum
    agreed = torch.tensor(signum, device=rt.device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return int(agreed.item())


def out_of_memory_error(step, s, cfg, rt):
    """The one-line error for an out-of-memory step, naming the fixes."""
    max_batch = cfg.total_batch_size // (cfg.seq_len * rt.world_size)
    smaller = next((f"--batch_size {b}, " for b in range(s.batch_size - 1, 0, -1) if max_batch % b == 0), "")
    return UserError(f"out of memory on {rt.device} at step {step} with --batch_size {s.batch_size} and --seq_len "
                     f"{cfg.seq_len}; use {smaller}--grad_checkpoint 1 or a smaller --seq_len (gradient accumulation "
                     "keeps --total_batch_size)")


# ---- memory: how many rows one block of the loss takes ----


# Without gradients a block of the loss holds 2.5 fp32 copies of its logits at most, where one with gradients holds
# 1.5; but the loss alone is one matmul and one pass over the logits, and on a CPU its matmul runs at full speed
# only in larger blocks: there evaluation's blocks take this many times the training budget
# (python bench/bench_train.py --only eval). A GPU's blocks are large enough for both.
NO_GRAD_BLOCK = 4


def loss_block_budget(device, grad=True, base=None):
    """Bytes of fp32 logits one block of the loss may hold (an eager block holds 1.5 times that at most). On a CPU
    (and MPS) 64 MiB: 256 rows at GPT-2's vocabulary, from which the loss runs at full speed (`python
    bench/bench_train.py --only blocks` times each block size), NO_GRAD_BLOCK times that on a CPU without
    gradients. On a GPU, where launches matter more, 1/64 of its memory, at most 1 GiB: 4096 rows on an 80-141 GB
    card (1.04x the plain loss's speed on an H200 where 256 rows were 0.90x), 1024 on a 24 GB one, 256 on a 4 GB
    GTX 960. base: the training budget instead of the device's (GPT.loss_block_bytes)."""
    if base is None:
        base = min(1 << 30, torch.cuda.get_device_properties(device).total_memory // 64) if device.type == "cuda" \
            else 64 << 20
    return base * (NO_GRAD_BLOCK if not grad and device.type == "cpu" else 1)


# ---- FLOPs, for MFU ----


def flops_per_token(config, T):
    """Training FLOPs per token: 6 per parameter in matmuls (forward 2, backward 4) plus attention's
    12 * L * E * T (PaLM paper, appendix B)."""
    L, E, V = config.n_layer, config.n_embd, config.padded_vocab_size
    return 6 * (12 * L * E * E + V * E) + 12 * L * E * T


# Dense peak TFLOP/s per card from NVIDIA's data sheets (with-sparsity figures halved): (16-bit tensor cores,
# fp32 runs), where fp32 runs use TF32 tensor cores from Ampere on (setup_runtime) and plain fp32 before.
# Keys are whole device names, as torch.cuda.get_device_name() reports them without the vendor words, so that
# "L4" is not "L40" and a MIG slice ("... MIG 1g.10gb"), which has a fraction of the card, has no entry.
GPU_PEAK_TFLOPS = {
    "H100 80GB HBM3": (989, 495), "H100 PCIe": (756, 378), "H100 NVL": (835, 418),  # SXM, PCIe, NVL
    "H200": (989, 495), "H200 NVL": (835, 418),
    "A100-SXM4-80GB": (312, 156), "A100-SXM4-40GB": (312, 156), "A100-PCIE-40GB": (312, 156),
    "A100 80GB PCIe": (312, 156), "A10": (125, 62.5), "L40S": (362, 183), "L40": (181, 90.5), "L4": (121, 60),
    "RTX 4090": (165, 82.6), "RTX 3090": (71, 35.6),
    "V100-SXM2-16GB": (125, 15.7), "V100-SXM2-32GB": (125, 15.7), "V100-PCIE-16GB": (112, 14),
    "V100-PCIE-32GB": (112, 14), "T4": (65, 8.1),  # Volta and Turing: fp16 tensor cores, no bf16
    "GTX 960": (2.4, 2.4),  # Maxwell: no tensor cores, fp16 at the fp32 rate
}


def peak_flops(rt):
    """The device's peak FLOP/s in the training dtype, for MFU: a table for GPUs (None for a card it does not
    know, or a MIG slice); on CPU, measured on the spot with a matmul."""
    if rt.device_type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        for word in ("NVIDIA ", "Tesla ", "GeForce ", "Quadro "):
            name = name.replace(word, "")
        peaks = GPU_PEAK_TFLOPS.get(name.strip())
        return None if peaks is None else peaks[0 if rt.dtype in ("bf16", "fp16") else 1] * 1e12
    if rt.device_type != "cpu":
        return None
    # the fastest of a few large square matmuls in the training dtype: what the cores can do at best. Its own
    # generator: drawing from the global one would shift dropout's masks after a resume.
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 2048, generator=gen), torch.randn(2048, 2048, generator=gen)
    times = []
    with rt.autocast():
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * 2048 ** 3 / min(times[1:])


def mfu_percent(tok_s, flops, peak, rt):
    """(MFU in percent, None where the peak is unknown; the peak to use from now on). A CPU's peak is a
    measurement (peak_flops), which another process running at that moment undercuts: where a step seems to beat
    it, it is measured again and the best kept, so that an MFU above 100% means the machine was busy both times."""
    if not peak:
        return None, peak
    if rt.device_type == "cpu" and tok_s * flops > peak * rt.world_size:
        peak = max(peak, peak_flops(rt))
    return 100 * tok_s * flops / (peak * rt.world_size), peak


# ---- sharded data parallel (FSDP2): each of N ranks keeps 1/N of the weights, gradients and AdamW state ----


def shard_model(model, rt, compile_blocks):
    """--fsdp 1: shards the model in place over the ranks. Each block is one FSDP unit: its weights are
    all-gathered just before its forward (and again in backward) and freed after, so only about one block
    is ever whole. The root unit holds the rest, among them wte and lm_head: one tied matrix, which must
    live in one unit to stay one tensor. On bf16 hardware the gathered weights are bf16 for compute, while
    the shards (the master weights AdamW updates) and the gradient reduction stay fp32.

    Each block in torchtitan's order: activation checkpointing (--grad_checkpoint) innermost, compiled around
    it (one graph that every layer reuses), and FSDP's communication outside the compiled code. The blocks
    compiled in place are what evaluation calls too: train() runs it under torch.compiler.set_stance
    ("force_eager"), so that its other shapes never meet the compiled code."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if rt.dtype == "bf16" \
        else MixedPrecisionPolicy()
    for block in model.transformer.h:
        if model.grad_checkpoint:
            checkpoint_block(block)
        if compile_blocks:
            block.compile()
        fully_shard(block, mp_policy=mp)
    model.grad_checkpoint = False  # the blocks checkpoint themselves now, inside their compiled code
    fully_shard(model, mp_policy=mp)
    assert model.transformer.wte.weight is model.lm_head.weight  # still tied


def checkpoint_block(block):
    """--grad_checkpoint inside the block: its forward keeps only its input and runs again in backward (with
    the same dropout masks: the checkpoint restores the random state); as GPT.features does from outside."""
    forward = block.forward

    def checkpointed(x, cache=None, dropout=0.0):
        """The block, recomputed in backward when training (not when sampling with a cache or evaluating)."""
        if block.training and cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, x, cache, dropout, use_reentrant=False)
        return forward(x, cache, dropout)
    block.forward = checkpointed


def fsdp_sync_once(cfg, model, rt, grad_accum):
    """--fsdp_sync: whether FSDP reduces the gradients once per optimizer step (True), as DDP does, or in every
    micro-step. Once saves grad_accum - 1 reduce-scatters and as many all-gathers of the whole model per step;
    it costs each rank, between the micro-steps, the whole gradient in fp32 and the gathered weights (4 + 2
    bytes per parameter in bf16, 4 + 4 in fp32; AdamW's state and the master weights stay sharded). auto: once
    where that is at most a quarter of the GPU's memory, the rest left for activations (GPT-2 124M in bf16:
    0.7 GB; gpt2-xl: 9.4 GB, so every micro-step on 24 GB cards), and always on a CPU."""
    n = sum(p.numel() for p in model.parameters())  # a DTensor's numel() is the whole tensor's
    need = n * (4 + (2 if rt.dtype == "bf16" else 4))
    once = cfg.fsdp_sync == "step" or (cfg.fsdp_sync == "auto" and (
        rt.device_type != "cuda" or need <= torch.cuda.get_device_properties(rt.device).total_memory / 4))
    if rt.master and grad_accum > 1:
        print(f"fsdp: gradients reduced {'once per optimizer step' if once else 'in every micro-step'} "
              f"(--fsdp_sync {cfg.fsdp_sync}; whole gradient and weights per rank: {need / 2**30:.2f} GiB)")
    return once


def dcp_options(**kw):
    """Options for torch.distributed.checkpoint's state dicts: whole tensors, so that a file holds a plain model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def training_state(model, optimizer, fsdp):
    """The model and optimizer state dicts as one unsharded process has them: what a checkpoint holds, so
    that it resumes in any mode. Under FSDP every rank must call this: the shards are gathered to rank 0,
    in CPU memory (the other ranks get empty dicts)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    model_sd = get_model_state_dict(model, options=dcp_options(cpu_offload=True))
    optim_sd = get_optimizer_state_dict(model, optimizer, options=dcp_options(cpu_offload=True))
    if dist.get_rank() != 0:
        return {}, {}
    # These helpers key the optimizer state by parameter name; torch.optim, and so our checkpoints, by the
    # parameter's position in the param groups.
    ids = {name: i for i, name in enumerate(n for g in optim_sd["param_groups"] for n in g["params"])}
    groups = [{**g, "params": [ids[n] for n in g["params"]]} for g in optim_sd["param_groups"]]
    return model_sd, {"state": {ids[n]: v for n, v in optim_sd["state"].items()}, "param_groups": groups}


def load_training_state(model, optimizer, ckpt, fsdp, device_type):
    """Loads a checkpoint's model and optimizer state (written in any mode). Under FSDP rank 0's copy is
    broadcast and each rank keeps its shard."""
    if not fsdp:
        model.load_state_dict(ckpt["model"])
        load_optimizer_state(optimizer, ckpt["optimizer"], device_type)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    name = {p: n for n, p in model.named_parameters()}
    names = [name[p] for g in optimizer.param_groups for p in g["params"]]  # position -> parameter name
    model_sd, optim_sd = {}, {}
    if dist.get_rank() == 0:
        model_sd, sd = ckpt["model"], ckpt["optimizer"]
        optim_sd = {"state": {names[i]: v for i, v in sd["state"].items()},
                    "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
    set_model_state_dict(model, model_sd, options=dcp_options(broadcast_from_rank0=True))
    set_optimizer_state_dict(model, optimizer, optim_sd, options=dcp_options(broadcast_from_rank0=True))


@contextlib.contextmanager
def gathered_root(model, rt, fsdp):
    """Under FSDP, the root unit's weights (wte/lm_head, ln_f) whole for the duration."""
    if fsdp:
        with torch.no_grad():  # FSDP sets itself up in the first forward(), which a resumed run may not have had
            model(torch.zeros(1, 1, dtype=torch.long, device=rt.device))
        model.unshard()
    try:
        yield
    finally:
        if fsdp:
            model.reshard()


# ---- files from the network: the GPT-2 tokenizer, HellaSwag's data (its scorer is train_gpt2.py's; its CLI
# hellaswag.py) ----


def get_encoding():
    """The GPT-2 tokenizer (tiktoken's "gpt2"), or one line saying how to get its files without a network."""
    import tiktoken  # imported here so that importing this file stays free of side effects
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise UserError(f"could not load the GPT-2 tokenizer ({type(e).__name__}); tiktoken downloads it once, so "
                        "connect to the network or point TIKTOKEN_CACHE_DIR at a folder holding its files") from None


# HellaSwag (Zellers et al. 2019): the official files, downloaded once into the cache beside this file
HELLASWAG_CACHE_DIR = Path(__file__).resolve().parent / ".cache" / "hellaswag"
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"
# Only the validation file is pinned: the official file of 10,042 examples, 12,246,618 bytes.
HELLASWAG_SHA256 = {"val": "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"}


def hellaswag_parse(path, need_label=True):
    """Every line of a HellaSwag .jsonl as a dict; a clear UserError on the first bad line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read HellaSwag file {path}: {e}") from None
    examples = []
    for i, line in enumerate(lines, 1):
        try:
            ex = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path} line {i} is not valid JSON (corrupted or partial file?)") from None
        ok = (isinstance(ex, dict) and isinstance(ex.get("ctx"), str)
              and isinstance(ex.get("endings"), list) and len(ex["endings"]) == 4
              and all(isinstance(e, str) for e in ex["endings"])
              and (not need_label or ex.get("label") in (0, 1, 2, 3)))
        if not ok:
            raise UserError(f"{path} line {i} is not a HellaSwag example "
                                 f"(needs ctx, 4 endings{', label 0-3' if need_label else ''})")
        examples.append(ex)
    if not examples:
        raise UserError(f"{path} is empty")
    return examples


def hellaswag_verify(path, split):
    """Raise UserError unless `path` is a complete, intact copy of the official file."""
    if split in HELLASWAG_SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != HELLASWAG_SHA256[split]:
            raise UserError(f"{path}: sha256 {h.hexdigest()} is not the official {split} file's")
    else:
        # train/test have no pinned hash here: the best we can check is that the file is non-empty and
        # every line parses as an example. (The test split has no labels: its answers are hidden.)
        hellaswag_parse(path, need_label=(split != "test"))


def hellaswag_download(split="val", cache_dir=HELLASWAG_CACHE_DIR, base_url=None):
    """Path to a verified local copy of hellaswag_{split}.jsonl, downloaded into cache_dir if needed from
    base_url (None: HELLASWAG_URL, read at the call)."""
    import requests  # only needed here

    base_url = base_url or HELLASWAG_URL
    path = Path(cache_dir) / f"hellaswag_{split}.jsonl"
    if path.exists():
        try:
            hellaswag_verify(path, split)
            return path
        except UserError:
            path.unlink(missing_ok=True)  # a partial or corrupted copy is never used: fetch it again
    url = f"{base_url}/hellaswag_{split}.jsonl"

    def fetch(f):  # into write_atomic's temporary file, verified before it is renamed: the final name always
        with requests.get(url, stream=True, timeout=60) as r:  # means "a good file", even to a concurrent reader
            r.raise_for_status()
            for chunk in r.iter_content(1 << 20):
                f.write(chunk)
        f.flush()
        try:
            hellaswag_verify(f.name, split)
        except UserError as e:
            raise UserError(f"download of {url} is corrupted or incomplete ({e}); not cached") from None

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        report_abandoned_temporaries(str(path.parent), re.escape(path.name))  # a killed download's half file
        write_atomic(str(path), fetch)
    except (requests.RequestException, OSError) as e:
        raise UserError(f"could not download {url} to {path}: {type(e).__name__}: {e}") from None
    return path


def hellaswag_examples(path=None, split="val", limit=0):
    """The examples of a local .jsonl file if `path` is given, else of the (downloaded) official split;
    only the first `limit` if limit > 0."""
    if path is None:
        path = hellaswag_download(split)
    elif not os.path.isfile(path):
        raise UserError(f"HellaSwag file {path} does not exist")
    examples = hellaswag_parse(path)
    return examples[:limit] if limit > 0 else examples


def load_hellaswag(cfg, rt):
    """The HellaSwag examples for --hellaswag_every: --hellaswag_data, or the official file (downloaded
    once per machine, by its local rank 0, into the cache of its copy of this program, and
    verifies it)."""
    try:
        if rt.local_rank == 0:  # one download per node, then every rank reads its node's cached file
            hellaswag_examples(cfg.hellaswag_data, limit=cfg.hellaswag_limit)
        if rt.ddp:
            dist.barrier()
        return hellaswag_examples(cfg.hellaswag_data, limit=cfg.hellaswag_limit)
    except UserError as e:
        raise UserError(f"{e}; fix --hellaswag_data or leave --hellaswag_every at 0") from None


def hellaswag_totals(score, model, examples, enc, batch_size, rt, fsdp):
    """HellaSwag counts {n, correct, correct_norm} from score (train_gpt2.score), summed over the ranks. Under
    FSDP each forward gathers weights from every rank, so all ranks must run the same number: the examples that
    do not split evenly are scored on every rank and counted once; and the root's weights, which the calls to
    features() and the loss (not forward()) would find sharded, are gathered for the duration."""
    split = len(examples) - len(examples) % rt.world_size if fsdp else len(examples)
    with gathered_root(model, rt, fsdp):
        parts = [score(model, examples[:split], enc, rt.device, batch_size, rt.autocast, rt.rank, rt.world_size)]
        if split < len(examples):
            rest = score(model, examples[split:], enc, rt.device, batch_size, rt.autocast)
            parts.append(rest if rt.master else dict.fromkeys(rest, 0))
    keys = ("n", "correct", "correct_norm")
    totals = torch.tensor([sum(p[k] for p in parts) for k in keys], device=rt.device)
    if rt.ddp:
        dist.all_reduce(totals)
    return dict(zip(keys, totals.tolist()))


# ---- Hugging Face GPT-2 weights ----

# Hugging Face stores these four as Conv1D, (in, out): the transpose of nn.Linear's (out, in).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_hf_gpt2(path_or_name, hub_names):
    """(GPTConfig's fields, the state dict as Hugging Face stores it) of a Hugging Face GPT-2: a local directory
    (config.json + model.safetensors or pytorch_model.bin) or one of hub_names such as "gpt2" (downloaded
    through huggingface_hub). The caller converts it with hf_to_ours."""
    path = path_or_name
    if not os.path.isdir(path):
        if path not in hub_names:
            raise UserError(f"model {path!r} is neither a checkpoint file, a directory, nor one of "
                            f"{', '.join(hub_names)}; give a model_*.pt, a Hugging Face GPT-2 directory or name")
        try:
            from huggingface_hub import snapshot_download
            path = snapshot_download(path, allow_patterns=["config.json", "model.safetensors"])
        except Exception as e:
            raise UserError(f"could not download {path_or_name!r} from the Hugging Face hub ({type(e).__name__}); "
                            "check the network, or pass a local directory") from None
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise UserError(f"{path} has no config.json; give a Hugging Face GPT-2 directory")
    try:
        with open(cfg_file) as f:
            hf = json.load(f)
        shape = dict(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{cfg_file} is not a GPT-2 config ({type(e).__name__}: {e}); give a GPT-2 directory") \
            from None
    weights = [os.path.join(path, n) for n in ("model.safetensors", "pytorch_model.bin")]
    weights = [w for w in weights if os.path.isfile(w)]
    if not weights:
        raise UserError(f"{path} has neither model.safetensors nor pytorch_model.bin")
    try:
        if weights[0].endswith(".safetensors"):
            from safetensors.torch import load_file
            sd_hf = load_file(weights[0])
        else:
            sd_hf = torch.load(weights[0], map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or (.bin) objects other than tensors
        reason = (str(e).splitlines() or [""])[0][:150]
        raise UserError(f"{weights[0]} cannot be read ({type(e).__name__}: {reason}); download or export it again") \
            from None
    return shape, sd_hf


def hf_to_ours(sd_hf, padded_vocab_size):
    """Hugging Face GPT-2 state dict (any real layout) -> our state dict, the vocabulary padded with zero rows.
    A KeyError if it is not GPT-2's."""
    sd = {}
    for k, v in sd_hf.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers, and the output head that is tied to wte anyway
        sd["transformer." + k] = v.t() if k.endswith(CONV1D) else v
    wte = sd["transformer.wte.weight"]  # (vocab, C) -> padded (padded_vocab, C) with zero rows
    sd["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(padded_vocab_size - wte.size(0), wte.size(1))])
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def load_hf_weights(model, sd_hf, path):
    """Hugging Face GPT-2 weights into our model (hf_to_ours), or one line saying they are not GPT-2's."""
    try:
        model.load_state_dict(hf_to_ours(sd_hf, model.config.padded_vocab_size))
    except KeyError as e:
        raise UserError(f"the weights in {path} are not GPT-2's (no {e})") from None
    except RuntimeError as e:
        raise UserError(f"the weights in {path} are not GPT-2's ({str(e).splitlines()[0][:200]})") from None


# ---- other programs' checkpoints: build-nanogpt, nanoGPT, llm.c ----
# (their formats' facts and sources: docs/coming-from.md)


class PickledGPTConfig:
    """Stands in for build-nanogpt's GPTConfig, a dataclass of its training script that torch.save pickles as
    __main__.GPTConfig beside the weights. torch.load(weights_only=True) may create this class under that name
    and fill its __dict__ with the pickled fields; no code of the file runs, and every other class stays refused."""


LLMC_MODEL_MAGIC = 20240326  # llm.c model files (train_gpt2.py write_model, train_gpt2.cu gpt2_write_to_checkpoint)
LLMC_MODEL_DTYPES = {1: "<f4", 3: "<f4", 5: "<i2"}  # header version -> dtype on disk (5: bf16, as its 16 bits)
LLMC_TOKENS_MAGIC = 20240520  # llm.c GPT-2 token shards, version 1 (dev/data/data_common.py write_datafile)
GPT2_VOCAB = 50257  # GPT-2's BPE; the others pad their tables to 50304 rows, as we do


def read_foreign_checkpoint(ckpt, path):
    """build-nanogpt's {'model', 'config': GPTConfig, 'step', 'val_loss'} or nanoGPT's {'model', 'model_args',
    'iter_num', 'config', 'optimizer', ...} -> our checkpoint dict (weights only: a new run starts from it)."""
    if isinstance(ckpt.get("config"), PickledGPTConfig):
        source, shape, step = "build-nanogpt", vars(ckpt["config"]), ckpt.get("step")
    else:
        source, shape, step = "nanoGPT", ckpt["model_args"], ckpt.get("iter_num")
    try:
        shape = {k: int(shape[k]) for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} looks like a {source} checkpoint but its config lacks {e}; point to another one") \
            from None
    return foreign_checkpoint(path, source, shape, dict(ckpt["model"]), step, ckpt.get("config") if
                              source == "nanoGPT" else None)


def foreign_checkpoint(path, source, shape, sd, step, recipe=None):
    """Another program's GPT-2 (our parameter names, nn.Linear's layout) as our checkpoint dict: prefixes of
    torch.compile and DDP off, causal-mask buffers dropped, zero biases where the model had none (nanoGPT's
    bias=False: a zero bias computes the same), the token table padded (or cut) to our 50304 rows and tied."""
    vocab = shape["vocab_size"]
    if not GPT2_VOCAB <= vocab <= 50304:
        raise UserError(f"{path} ({source}) has a vocabulary of {vocab} tokens, not GPT-2's {GPT2_VOCAB} (a "
                        "character-level model uses its own tokenizer); this program reads GPT-2 BPE models")
    config = {**shape, "vocab_size": GPT2_VOCAB}  # rows past 50257 are padding: never a token (see GPTConfig)
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("_orig_mod.").removeprefix("module.")
        if not k.endswith((".attn.bias", ".attn.masked_bias")):
            out[k] = v
    for k in [k for k in out if k.endswith(".weight") and not k.startswith(("transformer.w", "lm_head"))]:
        out.setdefault(k.removesuffix(".weight") + ".bias", out[k].new_zeros(out[k].size(0)))
    if "transformer.wte.weight" in out:
        wte, rows = out["transformer.wte.weight"], 50304  # (rows in the file, C) -> (50304, C)
        out["transformer.wte.weight"] = torch.cat([wte[:rows], wte.new_zeros(max(0, rows - len(wte)), wte.size(1))])
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return {"model": out, "config": config, "step": step, "source": source, "recipe": recipe, "path": path}


def schedule_flags(ckpt):
    """The flags that continue another program's learning-rate schedule, as far as its file tells them."""
    c = ckpt.get("recipe") or {}
    if ckpt.get("source") == "build-nanogpt":  # its script's constants, which are this program's defaults
        return "--max_lr 6e-4 --warmup_steps 715 --max_steps 19073 (build-nanogpt's script, and the defaults here)"
    if all(k in c for k in ("learning_rate", "warmup_iters", "lr_decay_iters", "min_lr")):  # nanoGPT's config
        return (f"--max_lr {c['learning_rate']} --warmup_steps {c['warmup_iters']} --max_steps {c['lr_decay_iters']} "
                f"--min_lr_ratio {c['min_lr'] / c['learning_rate']:.4g} (from its config)")
    return "its --max_steps and --warmup_steps"


def init_report(path, ckpt):
    """What --init_from read: whose checkpoint, at which step, and the flags that continue its schedule."""
    step = ckpt.get("step")
    return (f"--init_from {path}: the weights of a {ckpt.get('source', 'train_gpt2.py')} checkpoint at step "
            f"{'?' if step is None else step}, with a new AdamW optimizer and the data from its start; "
            + (f"--init_step {step} with {schedule_flags(ckpt)} continues its learning-rate schedule"
               if step else "the learning-rate schedule starts at --init_step"))


def read_llmc_model(path):
    """An llm.c model file: 256 int32 header words (magic, version, max_seq_len, vocab_size, num_layers,
    num_heads, channels, padded_vocab_size), then every parameter in llm.c's order, fp32 or bf16."""
    header = np.fromfile(path, dtype="<i4", count=256)
    version = int(header[1]) if len(header) == 256 else -1
    if version not in LLMC_MODEL_DTYPES:
        raise UserError(f"{path} is an llm.c model file of version {version}, which is not read here (versions "
                        "1, 3: fp32; 5: bf16); write it again with llm.c's current train_gpt2.py")
    maxT, V, L, nh, C = (int(x) for x in header[2:7])
    dtype = LLMC_MODEL_DTYPES[version]
    data = np.memmap(path, dtype=dtype, mode="r", offset=1024)
    per_layer = [("ln_1.weight", (C,)), ("ln_1.bias", (C,)), ("attn.c_attn.weight", (3 * C, C)),
                 ("attn.c_attn.bias", (3 * C,)), ("attn.c_proj.weight", (C, C)), ("attn.c_proj.bias", (C,)),
                 ("ln_2.weight", (C,)), ("ln_2.bias", (C,)), ("mlp.c_fc.weight", (4 * C, C)),
                 ("mlp.c_fc.bias", (4 * C,)), ("mlp.c_proj.weight", (C, 4 * C)), ("mlp.c_proj.bias", (C,))]
    rest = maxT * C + L * sum(math.prod(s) for _, s in per_layer) + 2 * C
    Vp = (len(data) - rest) // C if C > 0 else 0  # the padded vocabulary: whatever the file size leaves
    if C <= 0 or L <= 0 or Vp < V or Vp * C + rest != len(data) or int(header[7]) not in (0, Vp):
        raise UserError(f"{path} has an llm.c header (version {version}) that does not match its size; "
                        "it is truncated or was written by another program; point to another checkpoint")
    # llm.c stores each kind of tensor for all layers together: wte, wpe, then (L, ...) stacks, then ln_f
    order = [("transformer.wte.weight", (Vp, C)), ("transformer.wpe.weight", (maxT, C))]
    order += [(f"transformer.h.*.{name}", (L, *s)) for name, s in per_layer]
    order += [("transformer.ln_f.weight", (C,)), ("transformer.ln_f.bias", (C,))]
    sd, at = {}, 0
    for name, s in order:
        t = torch.from_numpy(np.array(data[at: at + math.prod(s)])).view(s)
        at += math.prod(s)
        t = t.view(torch.bfloat16).float() if dtype == "<i2" else t  # bf16: the upper 16 bits of an fp32
        for i, part in enumerate(t if "*" in name else [t]):
            sd[name.replace("*", str(i))] = part.clone()
    step = re.search(r"model_0*(\d+)\.bin$", os.path.basename(path))  # llm.c names its files by step
    return foreign_checkpoint(path, "llm.c", dict(block_size=maxT, vocab_size=V, n_layer=L, n_head=nh, n_embd=C),
                              sd, int(step[1]) if step else None)


def read_llmc_tokens(path):
    """An llm.c GPT-2 token shard: 256 int32 header words (magic, version 1, token count), then uint16 tokens."""
    header = np.fromfile(path, dtype="<i4", count=256)
    n = int(header[2]) if len(header) == 256 else -1
    if len(header) < 2 or (int(header[0]), int(header[1])) != (LLMC_TOKENS_MAGIC, 1) or \
            os.path.getsize(path) != 1024 + 2 * n:
        raise UserError(f"{path} is not an llm.c GPT-2 token shard (magic {LLMC_TOKENS_MAGIC}, version 1, uint16 "
                        "tokens, of the size its header says); give .npy shards of fineweb.py or llm.c's GPT-2 .bin")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=1024, shape=(n,))
