"""
Checkpoints: model_<step>.pt, written atomically by rank 0 with the state dicts as one unsharded
process has them (so that any mode resumes any other's), read without unpickling code
(weights_only; other programs' files through formats), found in --log_dir, and pruned
(--keep_checkpoints). What a resume does with one is resume's.
"""

import contextlib
import dataclasses
import glob
import os
import re

import torch
import torch.distributed as dist

from plumbing import errors, files, formats

CHECKPOINT_FORMAT = 1  # bump when the layout of the checkpoint dict changes


CHECKPOINT_RE = re.compile(r"^model_(\d{5,})\.pt$")


# what training writes in --log_dir
LOG_DIR_FILES = CHECKPOINT_RE.pattern.strip("^$") + r"|log\.txt"


def atomic_save(obj, path):
    """torch.save, atomically (see write_atomic); a failed write is a UserError that leaves the rest
    intact."""
    try:
        files.write_atomic(path, lambda f: torch.save(obj, f))
    # torch.save's zip writer reports a full disk as a RuntimeError
    except (OSError, RuntimeError) as e:
        reason = (
            e.strerror
            if isinstance(e, OSError) and e.strerror
            else "the write failed; is the disk full?"
        )
        raise errors.UserError(
            f"could not write {path}: {reason}; free some disk space or choose another --log_dir "
            "(earlier checkpoints are intact), then continue with --resume auto"
        ) from None


def save(path, model, optimizer, scaler, step, loader, train_config, wandb_id=None, fsdp=False,
         data=None):
    """Called on every rank (under FSDP all of them gather the state); rank 0 writes the file. data:
    data_files as the run found them when it opened them (None: as they are now)."""
    model_sd, optimizer_sd = training_state(model, optimizer, fsdp)
    # every rank's own generators, gathered to rank 0
    rng = [rng_state(next(model.parameters()).device)]
    if dist.is_initialized():
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, rng_state(next(model.parameters()).device))
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    atomic_save(
        {
            "format_version": CHECKPOINT_FORMAT,
            "model": model_sd,
            "optimizer": optimizer_sd,
            # train_gpt2.GPTConfig(**ckpt["config"]) rebuilds the model
            "config": dataclasses.asdict(model.config),
            "train_config": dataclasses.asdict(train_config),
            # what --data held: a resume on other files is refused
            "data_files": data if data is not None else data_files(train_config.data),
            "step": step,  # optimizer steps done
            "loader": loader.state_dict(),
            # "ranks": each rank's; "torch"/"cuda": rank 0's, where checkpoints from before per-rank
            # streams kept theirs
            "rng": {
                "torch": rng[0]["torch"],
                "cuda": [rng[0]["cuda"]] if rng[0]["cuda"] is not None else [],
                "ranks": rng,
            },
            "scaler": scaler.state_dict(),
            "wandb_id": wandb_id,  # the W&B run that a resumed run continues (a str), or None
        },
        path,
    )


def rng_state(device):
    """This process's generators: the CPU's, and its GPU's (None off CUDA). Plain tensors, which
    torch.load(weights_only=True) reads. Nothing of this program draws from Python's or NumPy's
    global ones."""
    device = torch.device(device)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def load(path, mmap=False, init_report=False):
    """A checkpoint dict, read without unpickling arbitrary objects (weights_only=True), or a
    UserError. Recognized by content: ours, build-nanogpt's, nanoGPT's and llm.c's
    (read_foreign_checkpoint), the others' turned into ours with their own "source" and (if known)
    "step", and no training state. mmap: tensors are read from disk only when used (FSDP's other
    ranks never use the weights: rank 0 broadcasts them). init_report: print what --init_from
    read (formats.init_report)."""
    ckpt = read(path, mmap)
    if init_report:
        print(formats.init_report(path, ckpt))
    return ckpt


def read(path, mmap=False):
    """load's checkpoint dict, without the report."""
    if not os.path.isfile(path):
        raise errors.UserError(
            f"checkpoint {path} does not exist; check the path (or use --resume auto)"
        )
    with open(path, "rb") as f:
        if f.read(4) == formats.LLMC_MODEL_MAGIC.to_bytes(4, "little"):
            return formats.read_llmc_model(path)
    # the one class another program pickles beside its weights may be built, as a stand-in (see
    # below)
    try:
        with torch.serialization.safe_globals([(formats.PickledGPTConfig, "__main__.GPTConfig")]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        name = re.search(r"GLOBAL (\S+)", str(e)) if "weights_only" in str(e) else None
        reason = (
            f"it holds a pickled {name[1] if name else 'object'}, and only tensors and plain "
            "values are read"
            if "weights_only" in str(e)
            else "it is truncated or not a PyTorch file"
        )
        raise errors.UserError(
            f"{path} is not a valid checkpoint ({reason}); point to another checkpoint"
        ) from None
    if isinstance(ckpt, dict) and (
        isinstance(ckpt.get("config"), formats.PickledGPTConfig) or "model_args" in ckpt
    ):
        return formats.read_foreign_checkpoint(ckpt, path)
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= ckpt.keys():
        raise errors.UserError(
            f"{path} is not a checkpoint of train_gpt2.py (no model/config/step), nor one of "
            "build-nanogpt, nanoGPT or llm.c; point to another one"
        )
    if ckpt.get("format_version", 0) > CHECKPOINT_FORMAT:
        raise errors.UserError(
            f"{path} has checkpoint format {ckpt['format_version']}, newer than this train_gpt2.py "
            f"reads ({CHECKPOINT_FORMAT}); update train_gpt2.py"
        )
    ckpt["path"] = path  # for messages; not stored in the file
    return ckpt


def find(log_dir):
    """Checkpoint paths in log_dir, newest step first."""
    names = (
        [n for n in os.listdir(log_dir) if CHECKPOINT_RE.match(n)] if os.path.isdir(log_dir) else []
    )
    return [
        os.path.join(log_dir, n)
        for n in sorted(names, key=lambda n: -int(CHECKPOINT_RE.match(n)[1]))
    ]


def prune(log_dir, keep, step, protect=None):
    """--keep_checkpoints: delete all but the `keep` newest checkpoints of steps up to `step`, the
    one just written. Called only after that one is completely on disk (write_atomic), so a crash at
    any moment leaves at least one whole checkpoint. Checkpoints of later steps (left by an earlier
    life of the run, e.g. truncated ones that --resume auto skipped) are left alone: training
    overwrites them when it gets there. `protect` is never deleted: the newest checkpoint known to
    give a finite loss (at first the one this run resumed from), the one a NaN stop tells the user
    to go back to."""
    done = [p for p in find(log_dir) if int(CHECKPOINT_RE.match(os.path.basename(p))[1]) <= step]
    for path in done[keep:]:
        if not (protect and os.path.abspath(path) == os.path.abspath(protect)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def data_files(data):
    """What --data holds, as checkpoints record it: [name, bytes] of a text file, or of each token
    file in a directory (.npy, and llm.c's or nanoGPT's .bin). Names and sizes, not paths: the same
    files moved to another disk or node still resume."""
    paths = [data]
    if os.path.isdir(data):
        paths = sorted(p for ext in ("*.npy", "*.bin") for p in glob.glob(os.path.join(data, ext)))
    return [[os.path.basename(p), os.path.getsize(p)] for p in paths if os.path.isfile(p)]


def dcp_options(**kw):
    """Options for torch.distributed.checkpoint's state dicts: whole tensors, so that a file holds a
    plain model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def training_state(model, optimizer, fsdp):
    """The model and optimizer state dicts as one unsharded process has them: what a checkpoint
    holds, so that it resumes in any mode. Under FSDP every rank must call this: the shards are
    gathered to rank 0, in CPU memory (the other ranks get empty dicts)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    model_sd = get_model_state_dict(model, options=dcp_options(cpu_offload=True))
    optim_sd = get_optimizer_state_dict(model, optimizer, options=dcp_options(cpu_offload=True))
    if dist.get_rank() != 0:
        return {}, {}
    # These helpers key the optimizer state by parameter name; torch.optim, and so our checkpoints,
    # by the parameter's position in the param groups.
    ids = {
        name: i for i, name in enumerate(n for g in optim_sd["param_groups"] for n in g["params"])
    }
    groups = [{**g, "params": [ids[n] for n in g["params"]]} for g in optim_sd["param_groups"]]
    return model_sd, {
        "state": {ids[n]: v for n, v in optim_sd["state"].items()},
        "param_groups": groups,
    }


