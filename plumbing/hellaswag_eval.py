"""
HellaSwag (Zellers et al. 2019) but its scoring (train_gpt2.hellaswag_score: the ending the model
finds least surprising): the official files downloaded once and verified, parsed, rendered into
tokens; the losses of each example's 4 endings, batched; and the scoring's counts summed over the
ranks, as --hellaswag_every runs it during training; hellaswag.py is the command line."""

import contextlib
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from plumbing import chunked_loss, errors, files, sharding

# the official files, downloaded once into the cache beside train_gpt2.py
CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "hellaswag"


URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"


# Only the validation file is pinned: the official file of 10,042 examples, 12,246,618 bytes.
SHA256 = {"val": "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"}


def parse(path, need_label=True):
    """Every line of a HellaSwag .jsonl as a dict; a clear UserError on the first bad line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise errors.UserError(f"cannot read HellaSwag file {path}: {e}") from None
    examples = []
    for i, line in enumerate(lines, 1):
        try:
            ex = json.loads(line)
        except json.JSONDecodeError:
            raise errors.UserError(
                f"{path} line {i} is not valid JSON (corrupted or partial file?)"
            ) from None
        ok = (isinstance(ex, dict) and isinstance(ex.get("ctx"), str)
              and isinstance(ex.get("endings"), list) and len(ex["endings"]) == 4
              and all(isinstance(e, str) for e in ex["endings"])
              and (not need_label or ex.get("label") in (0, 1, 2, 3)))
        if not ok:
            raise errors.UserError(f"{path} line {i} is not a HellaSwag example "
                                 f"(needs ctx, 4 endings{', label 0-3' if need_label else ''})")
        examples.append(ex)
    if not examples:
        raise errors.UserError(f"{path} is empty")
    return examples


def verify(path, split):
    """Raise UserError unless `path` is a complete, intact copy of the official file."""
    if split in SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != SHA256[split]:
            raise errors.UserError(
                f"{path}: sha256 {h.hexdigest()} is not the official {split} file's"
            )
    else:
        # train/test have no pinned hash here: the best we can check is that the file is non-empty
        # and every line parses as an example. (The test split has no labels: its answers are
        # hidden.)
        parse(path, need_label=(split != "test"))


def cached(path, split):
    """Whether path holds a verified copy: a partial or corrupted one is never used (it is fetched
    again)."""
    try:
        verify(path, split)
        return True
    except (errors.UserError, OSError):
        return False


def download(split="val", cache_dir=CACHE_DIR, base_url=None):
    """Path to a verified local copy of hellaswag_{split}.jsonl, downloaded into cache_dir if needed
    from base_url (None: URL, read at the call)."""
    import requests  # only needed here

    base_url = base_url or URL
    path = Path(cache_dir) / f"hellaswag_{split}.jsonl"
    if cached(path, split):
        return path
    url = f"{base_url}/hellaswag_{split}.jsonl"

    # into write_atomic's temporary file, verified before it is renamed: the final name always
    # means "a good file", even to a concurrent reader
    def fetch(f):
        with requests.get(url, stream=True, timeout=60) as r:
            r.raise_for_status()
            for chunk in r.iter_content(1 << 20):
                f.write(chunk)
        f.flush()
        try:
            verify(f.name, split)
        except errors.UserError as e:
            raise errors.UserError(
                f"download of {url} is corrupted or incomplete ({e}); not cached"
            ) from None

    try:
        # one download at a time: another process's (a rank of another node sharing the cache, a
        # second run) is waited for, then used; a killed download's half file goes
        with files.DirLock(path.parent, "the HellaSwag cache", re.escape(path.name), wait=True):
            if not cached(path, split):
                files.write_atomic(str(path), fetch)
    except (requests.RequestException, OSError) as e:
        raise errors.UserError(
            f"could not download {url} to {path}: {type(e).__name__}: {e}"
        ) from None
    return path


def load_examples(path=None, split="val", limit=0):
    """The examples of a local .jsonl file if `path` is given, else of the (downloaded) official
    split; only the first `limit` if limit > 0."""
    if path is None:
        path = download(split)
    elif not os.path.isfile(path):
        raise errors.UserError(f"HellaSwag file {path} does not exist")
    examples = parse(path)
    return examples[:limit] if limit > 0 else examples


def for_training(cfg, rt):
    """The HellaSwag examples for --hellaswag_every: --hellaswag_data, or the official file
    (downloaded once per machine, by its local rank 0, into the cache of its copy of this program,
    and verifies it)."""
    try:
        # one download per node, then every rank reads its node's cached file
        if rt.local_rank == 0:
            load_examples(cfg.hellaswag_data, limit=cfg.hellaswag_limit)
        if rt.ddp:
            dist.barrier()
        return load_examples(cfg.hellaswag_data, limit=cfg.hellaswag_limit)
    except errors.UserError as e:
        raise errors.UserError(
            f"{e}; fix --hellaswag_data or leave --hellaswag_every at 0"
        ) from None


def render_example(example, enc):
    """(context tokens, [tokens of each of the 4 endings], label). The leading space makes the
    ending's first word tokenize as it would mid-sentence, as in the GPT-2/GPT-3 evaluations."""
    ctx = enc.encode(example["ctx"])
    endings = [enc.encode(" " + e) for e in example["endings"]]
    return ctx, endings, example["label"]


def totals(score, model, examples, enc, batch_size, rt, fsdp):
    """HellaSwag counts {n, correct, correct_norm} of score (train_gpt2.hellaswag_score) over the
    examples, each rank scoring examples[rank::world_size], summed over the ranks. Under FSDP each
    forward gathers weights from every rank, so all ranks must run the same number: the examples
    that do not split evenly are scored on every rank and counted once; and the root's weights,
    which the calls to features() and the loss (not forward()) would find sharded, are gathered for
    the duration."""
    split = len(examples) - len(examples) % rt.world_size if fsdp else len(examples)
    with sharding.gathered_root(model, rt, fsdp):
        mine = examples[:split][rt.rank::rt.world_size]
        parts = [score(model, mine, enc, rt.device, batch_size, rt.autocast)]
        if split < len(examples):
            rest = score(model, examples[split:], enc, rt.device, batch_size, rt.autocast)
            parts.append(rest if rt.master else dict.fromkeys(rest, 0))
    keys = ("n", "correct", "correct_norm")
    totals = torch.tensor([sum(p[k] for p in parts) for k in keys], device=rt.device)
    if rt.ddp:
        dist.all_reduce(totals)
    return dict(zip(keys, totals.tolist()))


@torch.no_grad()
def ending_losses(model, rendered, device="cpu", batch_size=16, autocast=contextlib.nullcontext,
                  progress=False):
    """Summed cross-entropy of each ending and its token count: two (n, 4) tensors, in `rendered`
    order, from a model in eval mode. A row is context + ending; rows over block_size lose tokens
    from the LEFT, so the whole ending is kept. Real HellaSwag (<= 166 tokens) is never cut."""
    from tqdm import tqdm

    block_size = model.config.block_size
    # per example: 4 x (tokens, number of ending tokens scored)
    rows = [[((ctx + end)[-block_size:], min(len(end), len((ctx + end)[-block_size:]) - 1))
             for end in endings] for ctx, endings, _ in rendered]
    # Longest first: similar lengths share a batch (little padding); an out-of-memory shows at once
    order = sorted(range(len(rows)), key=lambda i: -max(len(t) for t, _ in rows[i]))
    total = torch.zeros(len(rows), 4, dtype=torch.float64)
    count = torch.zeros(len(rows), 4, dtype=torch.long)
    bar = tqdm(total=len(rows), desc="hellaswag", unit="ex", file=sys.stderr, disable=not progress)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        batch = [r for i in idx for r in rows[i]]  # 4 rows per example, all in one forward
        T = max(len(t) for t, _ in batch)
        # Right padding: with causal attention a position only sees those before it, so the pad
        # tokens after a row's end cannot change its logits; they are also left out of the loss.
        x, y = torch.zeros(2, len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.bool)  # where logits[t] predicts the ending
        for r, (toks, n_end) in enumerate(batch):
            x[r, :len(toks)] = torch.tensor(toks)
            y[r, :len(toks) - 1] = torch.tensor(toks[1:])  # logits at t predict token t+1
            mask[r, len(toks) - 1 - n_end:len(toks) - 1] = True
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        with autocast():
            # Only the ending positions need the output layer: the other hidden states are dropped
            # before it, which saves most of the largest matmul and its (rows, T, vocab) logits.
            h = model.features(x)[mask]  # (ending tokens, C)
            rows_per_block = model.loss_block_rows(len(h), device, grad=False)
            tok_loss = chunked_loss.token_losses(h, model.lm_head.weight, y[mask],
                                                 model.config.vocab_size, rows_per_block)  # (n,)
        losses = torch.zeros(mask.shape, device=device)
        losses[mask] = tok_loss  # scatter back, then sum each row: a fixed order, deterministic
        total[idx] = losses.cpu().double().sum(1).view(-1, 4)  # float64 on the CPU (MPS has none)
        count[idx] = mask.sum(1).view(-1, 4).cpu()
        bar.update(len(idx))
    bar.close()
    return total, count


def accuracies(counts):
    """{n, correct, correct_norm} (summed over ranks) -> {n, acc, acc_norm}."""
    n = int(counts["n"])
    return dict(n=n, acc=int(counts["correct"]) / max(n, 1),
                acc_norm=int(counts["correct_norm"]) / max(n, 1))
