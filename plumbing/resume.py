"""
--resume: which checkpoint a run continues from (the one named, or the newest valid one in
--log_dir), what may change on resume (the resume table in docs/checkpoints.md), and the exact
restore of a training state into any mode (one process, DDP, FSDP), on any number of ranks.
"""

import os
import sys

import torch
import torch.distributed as dist

from plumbing import checkpoints, errors, runtime, token_files

# What a resumed run may change (the resume table in docs/checkpoints.md). A flag that decides which
# tokens come next, or what the model is, must stay: a new value would repeat or skip data, or
# continue another model than the one saved. The optimizer's and the schedule's settings may change
# (a NaN stop says: resume with a lower --max_lr); each new value takes effect from the resumed
# step, with one line saying so. Everything else (the machine, --batch_size, the world size,
# periodic work, where the log goes) is free: exact resume on any number of ranks is a promise.
KEEP = {  # flag: why it must stay
    "data": "the data position counts tokens of these files",
    "seq_len": "the data position counts seq_len-token blocks, and a shuffled epoch permutes them",
    "seed": "the data order and the samples come from it",
    "model": "the model's shape comes from it",
    "optimizer": "the checkpoint holds that optimizer's state",
}


APPLIED = ("max_lr", "min_lr_ratio", "warmup_steps", "max_steps", "weight_decay", "muon_lr",
           "muon_momentum", "grad_clip", "dropout", "total_batch_size")


def check(cfg, ckpt, master):
    """The flags against the checkpoint's own (train_config), before anything is loaded: a change
    that would repeat or skip data or change the model is refused; a new optimizer or schedule
    setting is applied, said in one line. A checkpoint from before some flag existed is not checked
    for it."""
    path, saved, step = ckpt["path"], ckpt.get("train_config") or {}, ckpt["step"]
    saved = {"optimizer": "adamw", **saved}  # from before --optimizer: AdamW's
    keep = ("resume with --{0} {1}, or start a new run from its weights: "
            "--init_from {2} and another --log_dir")
    for name, why in KEEP.items():
        # by content: the same files elsewhere are the same data (a .bin directory recorded no
        # files before the .bin files counted: its path is checked as an old checkpoint's)
        if name == "data" and ckpt.get("data_files"):
            if checkpoints.data_files(cfg.data) != ckpt["data_files"]:
                raise errors.UserError(
                    f"{path} was trained on --data {saved.get('data')}, and --data {cfg.data} "
                    f"holds other files ({why}); " + keep.format(name, saved.get("data"), path))
            continue
        if name not in saved or saved[name] == getattr(cfg, name):
            continue
        # from before data_files: the path is all there is, and it may have moved
        if name == "data":
            if master:
                print(f"note: {path} does not record its data files; "
                      f"continuing on --data {cfg.data}")
            continue
        raise errors.UserError(
            f"{path} was trained with --{name} {saved[name]}, not {getattr(cfg, name)} ({why}); "
            + keep.format(name, saved[name], path))
    if cfg.max_steps < step:
        raise errors.UserError(f"{path} is at step {step}, past --max_steps {cfg.max_steps}; "
                               f"give --max_steps {step} or more")
    for name in APPLIED:
        if name in saved and saved[name] != getattr(cfg, name) and master:
            print(f"resume: --{name} {getattr(cfg, name)} (the checkpoint's was {saved[name]}) "
                  f"applies from step {step}")


def check_data_order(cfg, ckpt, master):
    """A resumed run continues in its checkpoint's data order: changing it mid-epoch would repeat or
    skip data."""
    was = int(ckpt["loader"].get("shuffle", 0))
    if cfg.shuffle is not None and cfg.shuffle != was:
        raise errors.UserError(f"{ckpt['path']} was trained with --shuffle {was}; "
                               f"resume with --shuffle {was} or without the flag")
    if master and "shuffle" not in ckpt["loader"] and token_files.data_shuffle(cfg):
        print(f"{ckpt['path']} is from before --shuffle: the data continues in file order")


def to_resume(cfg, rt):
    """The checkpoint dict that --resume names (None: a new run), checked against the flags (check).
    Rank 0 chooses; every rank loads that one."""
    if not cfg.resume and checkpoints.find(cfg.log_dir):
        raise errors.UserError(f"{cfg.log_dir} already holds checkpoints of a run; continue it "
                               "with --resume auto, or start a new run with another --log_dir")
    ckpt = resume_checkpoint(cfg.resume, cfg.log_dir) if cfg.resume and rt.master else None
    if cfg.resume and rt.ddp:
        chosen = [ckpt["path"] if ckpt else None]
        dist.broadcast_object_list(chosen, src=0)
        if not rt.master and chosen[0]:
            if not os.path.isfile(chosen[0]):
                raise errors.UserError(f"rank {rt.rank} cannot see {chosen[0]}; "
                                       "put --log_dir on storage every node shares")
            ckpt = checkpoints.load(chosen[0], mmap=bool(cfg.fsdp))
    if ckpt is not None:
        check(cfg, ckpt, rt.master)
    return ckpt


def resume_checkpoint(resume, log_dir):
    """The checkpoint dict to resume from, or None to start fresh (only where log_dir has none)."""
    def load_resumable(path):
        """A checkpoint that can be resumed (it has the optimizer, data position, random state),
        else an error."""
        ckpt = checkpoints.load(path)
        missing = {"optimizer", "loader", "rng", "scaler"} - ckpt.keys()
        if missing:
            raise errors.UserError(
                f"{path} holds weights but not the training state ({', '.join(sorted(missing))}); "
                "start a new run from it with --init_from instead")
        return ckpt

    if resume != "auto":
        return load_resumable(resume)
    paths = checkpoints.find(log_dir)
    for path in paths:
        try:
            return load_resumable(path)
        except errors.UserError as e:
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
    if paths:
        raise errors.UserError(
            f"--resume auto: none of the {len(paths)} checkpoints in {log_dir} is valid; "
            "move them away to start fresh, or --resume a good checkpoint")
    return None


def restore(s, ckpt, cfg, rt):
    """Puts a checkpoint's training state into s: weights, AdamW's moments, the loss scale, the data
    position, every random generator and the step, so that training continues exactly as if it had
    never stopped."""
    load_training_state(s.model, s.optimizer, ckpt, cfg.fsdp, rt.device_type)
    # a bf16/fp32 run's scaler holds nothing to restore
    if s.scaler.is_enabled() and ckpt["scaler"]:
        s.scaler.load_state_dict(ckpt["scaler"])
    if ckpt["loader"]["shard"] >= len(s.loader.shards):
        raise errors.UserError(f"{ckpt['path']} was trained on more shards than --data {cfg.data} "
                               "has; resume with the same --data")
    check_data_order(cfg, ckpt, rt.master)
    s.loader.load_state_dict(ckpt["loader"])
    set_rng_state(ckpt["rng"], rt.rank, rt.device, cfg.seed, ckpt["step"])
    s.step, s.last_good, s.wandb_id = ckpt["step"], ckpt["path"], ckpt.get("wandb_id")


def load_training_state(model, optimizer, ckpt, fsdp, device_type):
    """Loads a checkpoint's model and optimizer state (written in any mode), the optimizer's
    settings staying this run's (load_optimizer_state). Under FSDP rank 0's copy is broadcast and
    each rank keeps its shard."""
    if not fsdp:
        model.load_state_dict(ckpt["model"])
        load_optimizer_state(optimizer, ckpt["optimizer"], device_type)
        return
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    name = {p: n for n, p in model.named_parameters()}
    # position -> parameter name
    names = [name[p] for g in optimizer.param_groups for p in g["params"]]
    model_sd, optim_sd = {}, {}
    if dist.get_rank() == 0:
        model_sd, sd = ckpt["model"], ckpt["optimizer"]
        groups = zip(sd["param_groups"], optimizer.param_groups)
        optim_sd = {"state": {names[i]: v for i, v in sd["state"].items()},
                    "param_groups": [
                        {**g, **settings(mine), "params": [names[i] for i in g["params"]]}
                        for g, mine in groups]}
    set_model_state_dict(model, model_sd,
                         options=checkpoints.dcp_options(broadcast_from_rank0=True))
    set_optimizer_state_dict(model, optimizer, optim_sd,
                             options=checkpoints.dcp_options(broadcast_from_rank0=True))


def load_optimizer_state(optimizer, state, device_type):
    """The saved state (AdamW's moments, Muon's momentum) into optimizer, whose settings stay this
    run's: its flags (--weight_decay, --muon_momentum, ... may change on resume) and this device's
    options (load_state_dict would restore the saved groups' own `fused` flag, so a CPU checkpoint
    would resume unfused on CUDA, and a CUDA one ask for fused on a CPU)."""
    if hasattr(optimizer, "parts"):  # --optimizer muon (train_gpt2.Combined): {name: its state}
        for name, part in optimizer.parts.items():
            load_optimizer_state(part, state[name], device_type)
        return
    # before loading: load_state_dict also moves AdamW's step counters by the groups' flag
    groups = [{**saved, **settings(group)}
              for saved, group in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})


def settings(group):
    """An optimizer group's settings (lr, weight_decay, fused, ...): all but its parameters."""
    return {k: v for k, v in group.items() if k != "params"}


def set_rng_state(state, rank, device, seed, step):
    """Rank `rank` continues the random streams that rank saved in the checkpoint's state["ranks"].
    A checkpoint of N ranks resumed on M: ranks below N continue theirs (rank 0 also from a
    checkpoint from before per-rank streams, which held rank 0's alone, and whose Python and NumPy
    states are ignored); ranks from N up start new streams, rank_seed(seed, rank, step); the streams
    of ranks from M up end with the checkpoint."""
    saved = state.get("ranks") or [{"torch": state["torch"],
                                    "cuda": state["cuda"][0] if state["cuda"] else None}]
    device = torch.device(device)
    if rank >= len(saved):
        # the CPU's generator and every GPU's
        torch.manual_seed(runtime.rank_seed(seed, rank, step))
        return
    torch.set_rng_state(saved[rank]["torch"])
    if device.type == "cuda":
        if saved[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(saved[rank]["cuda"], device)
        else:  # a checkpoint written off CUDA
            torch.cuda.manual_seed(runtime.rank_seed(seed, rank, step))
