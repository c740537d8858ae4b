"""
Every flag of `python train_gpt2.py` (TrainConfig: its default, what it accepts, its help), parsed
from the command line and checked, each against its domain and then the pairs that exclude each
other, before any device or process-group setup. The defaults are GPT-2 124M on 10B tokens of
FineWeb-Edu."""

import dataclasses
import os

from plumbing import errors, flags, runtime

# The names of OpenAI's four GPT-2 shapes: train_gpt2.PRESETS holds the shapes themselves
MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


@dataclasses.dataclass
class TrainConfig:
    """Every flag of `python train_gpt2.py` (flags.arg): its default, what it accepts (argparse's
    type= or choices=), its help."""

    data: str = flags.arg(
        "input.txt", flags.path("exists", hint="; give a text file or a directory of token shards"),
        "a text file (last 10%% is val) or a directory of token shards: "
        "fineweb.py's .npy, llm.c's .bin, nanoGPT's train.bin and val.bin")
    log_dir: str = flags.arg(
        "log", flags.path("out_dir"), "where log.txt and the model_<step>.pt checkpoints go")
    model: str = flags.arg("gpt2", MODELS, "model shape preset: " + ", ".join(MODELS))
    n_layer: int = flags.arg(None, flags.POSITIVE, "number of layers (overrides the preset)")
    n_head: int = flags.arg(
        None, flags.POSITIVE, "number of attention heads (overrides the preset)")
    n_embd: int = flags.arg(None, flags.POSITIVE, "embedding width (overrides the preset)")
    init_from: str = flags.arg(
        None, flags.path("exists", also=MODELS,
                         hint="; give a checkpoint, a Hugging Face GPT-2 directory or one of "
                         + ", ".join(MODELS)),
        "start from these weights: a Hugging Face GPT-2 name/directory or a checkpoint "
        "(ours, build-nanogpt's, nanoGPT's or llm.c's), with a new optimizer")
    init_step: int = flags.arg(
        0, flags.COUNT, "with --init_from: start at this step of the learning-rate schedule "
        "(e.g. the checkpoint's, to finish its run with its --max_steps and --warmup_steps)")
    resume: str = flags.arg(
        None, flags.path("file", also=("auto",), hint="; give a checkpoint file, or auto"),
        "'auto': continue from the newest valid checkpoint in --log_dir; or a checkpoint path")
    # batch: the GPT-3 paper's 124M ("Small") recipe uses 0.5M tokens per optimizer step
    total_batch_size: int = flags.arg(
        524288, flags.POSITIVE, "tokens per optimizer step, all ranks and micro-steps (2**19)")
    batch_size: int | str = flags.arg(
        16, flags.number(int, 1, also=("auto",)), "sequences per micro-step on each rank, or "
        "'auto': the largest that fits in memory (gradient accumulation makes up the rest)")
    seq_len: int = flags.arg(
        1024, flags.POSITIVE, "tokens per sequence, at most the model's block size")
    # optimizer and schedule: GPT-3 paper, appendix B; step counts from the 10B-token reproduction
    max_lr: float = flags.arg(
        6e-4, flags.number(float, 0, lo_open=True), "peak learning rate, reached after warmup")
    min_lr_ratio: float = flags.arg(
        0.1, flags.number(float, 0, 1), "the cosine decays to max_lr * min_lr_ratio at max_steps")
    warmup_steps: int = flags.arg(715, flags.COUNT, "linear warmup steps (375M tokens / 2**19)")
    max_steps: int = flags.arg(
        19073, flags.POSITIVE, "optimizer steps in all (10B tokens / 2**19: sample-10BT once)")
    weight_decay: float = flags.arg(
        0.1, flags.number(float, 0), "AdamW weight decay on 2-D tensors")
    # --optimizer muon: Muon for the blocks' matrices (train_gpt2.Muon). --muon_lr is the best of
    # bench/bench_muon.py's sweeps, --muon_momentum Jordan's (docs/training.md)
    optimizer: str = flags.arg(
        "adamw", ("adamw", "muon"), "adamw (GPT-2's recipe), or muon: Muon for the matrices "
        "inside the blocks, AdamW for the embeddings and 1-D tensors "
        "(fewer tokens to the same loss: docs/training.md)")
    muon_lr: float = flags.arg(
        0.02, flags.number(float, 0, lo_open=True), "--optimizer muon: Muon's peak learning rate, "
        "on the same warmup and cosine schedule as --max_lr")
    muon_momentum: float = flags.arg(0.95, flags.number(float, 0, 1, hi_open=True),
                                     "--optimizer muon: Muon's momentum (Nesterov)")
    grad_clip: float = flags.arg(
        1.0, flags.number(float, 0), "clip the global gradient norm to this (0 = no clipping)")
    grad_checkpoint: int = flags.arg(
        0, flags.BIT, "1: recompute blocks in backward (less memory, ~30%% slower)")
    dropout: float = flags.arg(
        0.0, flags.number(float, 0, 1, hi_open=True, hint="; GPT-2 used 0.1"),
        "dropout on the embeddings, attention weights, residual branches "
        "(GPT-2's config: 0.1; 0 on plenty of data)")
    # machine
    device: str = flags.arg("auto", runtime.DEVICES, "auto, cpu, cuda or mps")
    dtype: str = flags.arg(
        "auto", runtime.DTYPES, "auto (bf16 where native, fp16 on older GPUs, else fp32) or one")
    compile: str = flags.arg(
        "auto", ("auto", "on", "off"), "torch.compile the model: on, off, or auto "
        "(on for CUDA and CPU, falling back to eager if compilation fails)")
    seed: int = flags.arg(
        1337, flags.SEED, "random seed (model init, data order, dropout, sampling)")
    dist_timeout: int = flags.arg(
        60, flags.number(int, 1, 525600), "minutes (at most a year) a rank waits in a collective "
        "(e.g. while rank 0 writes a checkpoint) before NCCL/gloo abort the job")
    # periodic work, in optimizer steps
    eval_every: int = flags.arg(250, flags.COUNT, "val loss every this many steps (0 = off)")
    val_tokens: int = flags.arg(
        20 * 65536, flags.POSITIVE, "val tokens per evaluation: always the val split's first")
    sample_every: int = flags.arg(250, flags.COUNT, "print samples every this many steps (0 = off)")
    prompt: str = flags.arg(
        "Hello, I'm a language model,", None, "prompt of the samples during training")
    hellaswag_every: int = flags.arg(
        0, flags.COUNT, "HellaSwag accuracy every this many steps (0 = off)")
    hellaswag_data: str = flags.arg(
        None, flags.path("file", hint="; give a HellaSwag .jsonl, "
                         "or drop the flag to download the official file"),
        "local hellaswag_val.jsonl; None: download the official file once")
    hellaswag_limit: int = flags.arg(
        0, flags.COUNT, "score only the first N HellaSwag examples (0 = all 10,042)")
    checkpoint_every: int = flags.arg(
        5000, flags.COUNT, "model_<step>.pt every this many steps and at the end (0 = off)")
    keep_checkpoints: int = flags.arg(
        0, flags.COUNT, "keep only the newest K model_*.pt (and the newest one known to give a "
        "finite loss), deleting older ones once a newer one is written (0 = keep all)")
    shuffle: int = flags.arg(
        None, flags.BIT, "1: a new seeded order of the shards, and of T-token blocks within them, "
        "every epoch; 0: file order; None: 1 for a shard directory, 0 for a text file, "
        "and a resumed run keeps its checkpoint's")
    wandb_project: str = flags.arg(
        None, flags.text, "also log to this Weights & Biases project, from rank 0 "
        "(pip install wandb; WANDB_MODE=offline: no network); a resumed run continues its W&B run")
    fsdp: int = flags.arg(
        0, flags.BIT, "1: shard weights, gradients and AdamW state over the ranks (FSDP2), "
        "not a full copy on each (DDP); checkpoints move freely between FSDP, DDP, one process")
    fsdp_sync: str = flags.arg(
        "auto", ("auto", "step", "micro"), "--fsdp 1 with gradient accumulation: 'step' reduces "
        "the gradients once per optimizer step (each rank holds the whole gradient and weights "
        "meanwhile), 'micro' in every micro-step (only shards, more communication); "
        "auto: step where that fits (docs/scale.md)")


def check(cfg):
    """The training flags that need no model: each as the command line checks it, its text through
    parser(), then the pairs that exclude each other. train_gpt2.check_config adds the model's
    shape and the batch arithmetic, then check_run_outputs."""
    given = dataclasses.asdict(cfg)
    parsed = vars(parser().parse_args([f"--{k}={v}" for k, v in given.items() if v is not None]))
    for k, v in given.items():  # 16, not "16"; None where it is the default (a path's text is one)
        if parsed[k] != v and (v is None or not isinstance(parsed[k], str)):
            raise errors.UserError(f"--{k} must be {type(parsed[k]).__name__}, got {v!r}")
    problems = [  # (is it wrong?, what to say)
        (cfg.resume and cfg.init_from, "--resume and --init_from exclude each other: "
         "resume continues a run, init_from starts one"),
        (cfg.init_step and not cfg.init_from,
         "--init_step needs --init_from: it is where the schedule starts for those weights"),
        (not 0 <= cfg.init_step < cfg.max_steps,
         f"--init_step must be in [0, --max_steps), got {cfg.init_step}"),
        (cfg.init_from and os.path.isdir(cfg.init_from)
         and not os.path.isfile(f"{cfg.init_from}/config.json"),
         f"{cfg.init_from} has no config.json; give a Hugging Face GPT-2 directory"),
        (cfg.fsdp and cfg.optimizer == "muon", "--optimizer muon orthogonalizes each matrix whole, "
         "which --fsdp 1 keeps in shards; train with DDP (drop --fsdp) or --optimizer adamw"),
    ]
    for wrong, message in problems:
        if wrong:
            raise errors.UserError(message)


def check_shape(config, seq_len, overrides):
    """The model's shape (a GPTConfig, from the flags or a checkpoint's or weights' own), the shape
    flags that overrides gives ({name: value}) and --seq_len against it."""
    if any(getattr(config, k) != v for k, v in overrides.items()):
        raise errors.UserError(f"the checkpoint holds a model of shape {vars(config)}, not the "
                               f"{overrides} asked for; drop the shape flags or start a new "
                               "--log_dir")
    if config.n_embd % config.n_head:
        raise errors.UserError(f"n_embd {config.n_embd} is not divisible by n_head "
                               f"{config.n_head}; change one of them")
    flags.check_seq_len(seq_len, config.block_size)  # the position table has block_size rows


def indivisible_batch(total, batch_size, seq_len, world_size):
    """The line for a --total_batch_size that micro-steps of batch_size (None: --batch_size auto,
    whole sequences) * seq_len * world_size tokens do not make up exactly."""
    per_micro = (batch_size or 1) * seq_len * world_size
    what, fix = ("batch_size * ", f"{batch_size} * ") if batch_size else ("", "")
    return (f"--total_batch_size {total} is not a multiple of {what}seq_len * world_size = "
            f"{fix}{seq_len} * {world_size} = {per_micro}; change --total_batch_size "
            f"(e.g. to {max(1, total // per_micro) * per_micro}) or "
            f"{'--batch_size' if batch_size else '--seq_len'}")


def parser():
    """TrainConfig's parser: a flag a field, with its default, type or choices, and help."""
    p = flags.Parser(prog="train_gpt2.py", description="Train GPT-2. Subcommands: sample, export, "
                     "plot, evaluate (python train_gpt2.py sample --help).")
    for f in dataclasses.fields(TrainConfig):
        p.add_argument(f"--{f.name}", default=f.default, **f.metadata)
    return p


def parse(argv):
    """A TrainConfig from the command line, each value checked (the pairs: by check(), once the
    world size is known)."""
    return TrainConfig(**vars(parser().parse_args(argv)))
