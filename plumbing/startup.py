"""
What training starts from beyond the lesson (train_gpt2.build_state), at the points it calls: the
checkpoint to resume (--resume) and its exact restore; the model placed on this machine:
torch.compile on or off, FSDP's shards (--fsdp 1), the micro-batch that fits (--batch_size auto)."""

from plumbing import memory, resume, runtime, sharding


def checkpoint_to_resume(cfg, rt):
    """The checkpoint dict --resume names, checked against the flags (None: a new run); --fsdp
    checked against the runtime first."""
    sharding.check_fsdp(cfg, rt)
    return resume.to_resume(cfg, rt)


def place_model(model, cfg, rt):
    """(sequences per micro-step, whether to compile) for model on rt's device: --fsdp 1 shards it
    in place (its blocks compiled, if so, as they are sharded), before the optimizer and the
    checkpoint's load, which work on the shards; --batch_size auto finds what fits."""
    compile_model = runtime.use_compile(cfg.compile, rt)
    if cfg.fsdp:
        sharding.shard_model(model, rt, compile_model)
    auto = cfg.batch_size == "auto"
    return (memory.auto_batch_size(model, cfg, rt) if auto else cfg.batch_size), compile_model


def restore(s, ckpt, cfg, rt):
    """Into the training state s: FSDP's gradient sync (--fsdp_sync), then the checkpoint's weights,
    optimizer state, data position, random state and step (resume.restore; ckpt None: a new run);
    --init_from's run starts the schedule at --init_step."""
    s.sync_once = sharding.fsdp_sync_once(cfg, s.model, rt, s.grad_accum) if cfg.fsdp else True
    if ckpt is not None:
        resume.restore(s, ckpt, cfg, rt)
    s.step = s.step or cfg.init_step  # --init_from: new moments, the schedule at --init_step
