"""
Other programs' files, read by content: build-nanogpt's and nanoGPT's checkpoints (torch.save of
their own dicts), llm.c's model files and token shards (a 256-int32 header, then raw values),
nanoGPT's train.bin and val.bin (raw uint16). The facts of each format and their sources are in
docs/coming-from.md."""

import math
import os
import re

import numpy as np
import torch

from plumbing import errors


class PickledGPTConfig:
    """Stands in for build-nanogpt's GPTConfig, a dataclass of its training script that torch.save
    pickles as __main__.GPTConfig beside the weights. torch.load(weights_only=True) may create this
    class under that name and fill its __dict__ with the pickled fields; no code of the file runs,
    and every other class stays refused."""


# llm.c model files (train_gpt2.py write_model, train_gpt2.cu gpt2_write_to_checkpoint)
LLMC_MODEL_MAGIC = 20240326


# header version -> dtype on disk (5: bf16, as its 16 bits)
LLMC_MODEL_DTYPES = {1: "<f4", 3: "<f4", 5: "<i2"}


# llm.c GPT-2 token shards, version 1 (dev/data/data_common.py write_datafile)
LLMC_TOKENS_MAGIC = 20240520


# nanoGPT's token files, one a split (data/openwebtext/prepare.py: np.memmap(..., dtype=np.uint16,
# mode='w+'); data/shakespeare/prepare.py: ndarray.tofile): raw uint16 ids, no header
NANOGPT_TOKEN_FILES = ("train.bin", "val.bin")


GPT2_VOCAB = 50257  # GPT-2's BPE; the others pad their tables to 50304 rows, as we do


def read_foreign_checkpoint(ckpt, path):
    """build-nanogpt's {'model', 'config': GPTConfig, 'step', 'val_loss'} or nanoGPT's {'model',
    'model_args', 'iter_num', 'config', 'optimizer', ...} -> our checkpoint dict (weights only: a
    new run starts from it)."""
    if isinstance(ckpt.get("config"), PickledGPTConfig):
        source, shape, step = "build-nanogpt", vars(ckpt["config"]), ckpt.get("step")
    else:
        source, shape, step = "nanoGPT", ckpt["model_args"], ckpt.get("iter_num")
    try:
        shape = {k: int(shape[k])
                 for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")}
    except (KeyError, TypeError, ValueError) as e:
        raise errors.UserError(f"{path} looks like a {source} checkpoint but its config lacks {e}; "
                               "point to another one") from None
    return foreign_checkpoint(path, source, shape, dict(ckpt["model"]), step,
                              ckpt.get("config") if source == "nanoGPT" else None)


def foreign_checkpoint(path, source, shape, sd, step, recipe=None):
    """Another program's GPT-2 (our parameter names, nn.Linear's layout) as our checkpoint dict:
    prefixes of torch.compile and DDP off, causal-mask buffers dropped, zero biases where the model
    had none (nanoGPT's bias=False: a zero bias computes the same), the token table padded (or cut)
    to our 50304 rows and tied."""
    vocab = shape["vocab_size"]
    if not GPT2_VOCAB <= vocab <= 50304:
        raise errors.UserError(
            f"{path} ({source}) has a vocabulary of {vocab} tokens, not GPT-2's {GPT2_VOCAB} "
            "(a character-level model uses its own tokenizer); this program reads GPT-2 BPE models")
    # rows past 50257 are padding: never a token (see GPTConfig)
    config = {**shape, "vocab_size": GPT2_VOCAB}
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("_orig_mod.").removeprefix("module.")
        if not k.endswith((".attn.bias", ".attn.masked_bias")):
            out[k] = v
    for k in [k for k in out
              if k.endswith(".weight") and not k.startswith(("transformer.w", "lm_head"))]:
        out.setdefault(k.removesuffix(".weight") + ".bias", out[k].new_zeros(out[k].size(0)))
    if "transformer.wte.weight" in out:
        wte, rows = out["transformer.wte.weight"], 50304  # (rows in the file, C) -> (50304, C)
        out["transformer.wte.weight"] = torch.cat(
            [wte[:rows], wte.new_zeros(max(0, rows - len(wte)), wte.size(1))])
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return {"model": out, "config": config, "step": step, "source": source, "recipe": recipe,
            "path": path}


def schedule_flags(ckpt):
    """The flags that continue another program's learning-rate schedule, as far as its file tells
    them."""
    c = ckpt.get("recipe") or {}
    # its script's constants, which are this program's defaults
    if ckpt.get("source") == "build-nanogpt":
        return ("--max_lr 6e-4 --warmup_steps 715 --max_steps 19073 (build-nanogpt's script, "
                "and the defaults here)")
    # nanoGPT's config
    if all(k in c for k in ("learning_rate", "warmup_iters", "lr_decay_iters", "min_lr")):
        return (f"--max_lr {c['learning_rate']} --warmup_steps {c['warmup_iters']} "
                f"--max_steps {c['lr_decay_iters']} "
                f"--min_lr_ratio {c['min_lr'] / c['learning_rate']:.4g} (from its config)")
    return "its --max_steps and --warmup_steps"


def init_report(path, ckpt):
    """What --init_from read: whose checkpoint, at which step, and the flags that continue its
    schedule."""
    step = ckpt.get("step")
    return (f"--init_from {path}: the weights of a {ckpt.get('source', 'train_gpt2.py')} "
            f"checkpoint at step {'?' if step is None else step}, with a new AdamW optimizer "
            "and the data from its start; "
            + (f"--init_step {step} with {schedule_flags(ckpt)} continues its "
               "learning-rate schedule" if step
               else "the learning-rate schedule starts at --init_step"))


def read_llmc_model(path):
    """An llm.c model file: 256 int32 header words (magic, version, max_seq_len, vocab_size,
    num_layers, num_heads, channels, padded_vocab_size), then every parameter in llm.c's order, fp32
    or bf16."""
    header = np.fromfile(path, dtype="<i4", count=256)
    version = int(header[1]) if len(header) == 256 else -1
    if version not in LLMC_MODEL_DTYPES:
        raise errors.UserError(
            f"{path} is an llm.c model file of version {version}, which is not read here "
            "(versions 1, 3: fp32; 5: bf16); write it again with llm.c's current train_gpt2.py")
    maxT, V, L, nh, C = (int(x) for x in header[2:7])
    dtype = LLMC_MODEL_DTYPES[version]
    data = np.memmap(path, dtype=dtype, mode="r", offset=1024)
    per_layer = [("ln_1.weight", (C,)), ("ln_1.bias", (C,)),
                 ("attn.c_attn.weight", (3 * C, C)), ("attn.c_attn.bias", (3 * C,)),
                 ("attn.c_proj.weight", (C, C)), ("attn.c_proj.bias", (C,)),
                 ("ln_2.weight", (C,)), ("ln_2.bias", (C,)),
                 ("mlp.c_fc.weight", (4 * C, C)), ("mlp.c_fc.bias", (4 * C,)),
                 ("mlp.c_proj.weight", (C, 4 * C)), ("mlp.c_proj.bias", (C,))]
    rest = maxT * C + L * sum(math.prod(s) for _, s in per_layer) + 2 * C
    # the padded vocabulary: whatever the file size leaves
    Vp = (len(data) - rest) // C if C > 0 else 0
    if C <= 0 or L <= 0 or Vp < V or Vp * C + rest != len(data) or int(header[7]) not in (0, Vp):
        raise errors.UserError(
            f"{path} has an llm.c header (version {version}) that does not match its size; "
            "it is truncated or was written by another program; point to another checkpoint")
    # llm.c stores each kind of tensor for all layers together: wte, wpe, then (L, ...) stacks,
    # then ln_f
    order = [("transformer.wte.weight", (Vp, C)), ("transformer.wpe.weight", (maxT, C))]
    order += [(f"transformer.h.*.{name}", (L, *s)) for name, s in per_layer]
    order += [("transformer.ln_f.weight", (C,)), ("transformer.ln_f.bias", (C,))]
    sd, at = {}, 0
    for name, s in order:
        t = torch.from_numpy(np.array(data[at:at + math.prod(s)])).view(s)
        at += math.prod(s)
        # bf16: the upper 16 bits of an fp32
        t = t.view(torch.bfloat16).float() if dtype == "<i2" else t
        for i, part in enumerate(t if "*" in name else [t]):
            sd[name.replace("*", str(i))] = part.clone()
    # llm.c names its files by step
    step = re.search(r"model_0*(\d+)\.bin$", os.path.basename(path))
    return foreign_checkpoint(path, "llm.c",
                              dict(block_size=maxT, vocab_size=V, n_layer=L, n_head=nh, n_embd=C),
                              sd, int(step[1]) if step else None)


def read_llmc_tokens(path):
    """An llm.c GPT-2 token shard: 256 int32 header words (magic, version 1, token count), then
    uint16 tokens."""
    header = np.fromfile(path, dtype="<i4", count=256)
    n = int(header[2]) if len(header) == 256 else -1
    if len(header) < 2 or (int(header[0]), int(header[1])) != (LLMC_TOKENS_MAGIC, 1) or \
            os.path.getsize(path) != 1024 + 2 * n:
        raise errors.UserError(
            f"{path} is not an llm.c GPT-2 token shard (magic {LLMC_TOKENS_MAGIC}, version 1, "
            "uint16 tokens, of the size its header says); "
            "give .npy shards of fineweb.py or llm.c's GPT-2 .bin")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=1024, shape=(n,))


def read_nanogpt_tokens(path):
    """nanoGPT's train.bin or val.bin, memory-mapped as its train.py maps it (np.memmap(path,
    dtype=np.uint16, mode='r')). A meta.pkl beside it is data/shakespeare_char/prepare.py's own
    character vocabulary, not GPT-2's: refused, as garbage to train on."""
    size = os.path.getsize(path)
    if size >= 4 and np.fromfile(path, "<i4", count=1)[0] == LLMC_TOKENS_MAGIC:
        return read_llmc_tokens(path)  # GPT-2 ids cannot start so: the magic's low half is id 55000
    if os.path.exists(os.path.join(os.path.dirname(path), "meta.pkl")):
        raise errors.UserError(
            f"{path} has a meta.pkl beside it: nanoGPT's character-level tokens, not GPT-2's BPE; "
            "give the text itself (its input.txt) as --data")
    if size == 0 or size % 2:
        raise errors.UserError(f"{path} holds {size} bytes, "
                               f"{'no' if size == 0 else 'not a whole number of'} uint16 tokens; "
                               "run nanoGPT's prepare.py again")
    return np.memmap(path, dtype=np.uint16, mode="r")
