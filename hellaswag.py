"""
HellaSwag evaluation: does the model pick the right ending of a short everyday story?

Each example is a context and 4 candidate endings. We feed context + ending to the model and take the
cross-entropy of the ending tokens only; the ending the model finds least surprising is its answer.
`acc` uses the summed loss, `acc_norm` the mean loss per ending token (longer endings are not punished).
This is the GPT-2/GPT-3-era protocol (context tokens = encode(ctx), ending tokens = encode(" " + ending)).

Launch:
    python hellaswag.py --model gpt2                         # OpenAI GPT-2 124M from the hub: acc_norm 0.2955
    python hellaswag.py --model log/model_19073.pt           # one of our training checkpoints
    python hellaswag.py --model gpt2 --data hellaswag_val.jsonl --limit 500 --device cpu  # a local copy
The last line of stdout is one JSON object: {"n": ..., "acc": ..., "acc_norm": ..., "examples_per_s": ...}.

As a library (train_gpt2.py --hellaswag_every does this on every DDP rank, then all-reduces the counts):
    examples = load_examples(split="val")
    counts = score(model, examples, enc, device, rank=rank, world_size=world_size)  # {n, correct, correct_norm}
    accuracies(counts)                                                                # {n, acc, acc_norm}
"""

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_CACHE_DIR = Path(__file__).resolve().parent / ".cache" / "hellaswag"
BASE_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"
# Only the validation file is pinned: the official file of 10,042 examples, 12,246,618 bytes.
SHA256 = {"val": "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"}


class HellaSwagError(Exception):
    """Bad or missing data: the CLI prints the message as one line and exits with code 2."""


# -----------------------------------------------------------------------------
# data: download, verify, parse


def parse_file(path, need_label=True):
    """Every line of a HellaSwag .jsonl as a dict; a clear HellaSwagError on the first bad line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HellaSwagError(f"cannot read HellaSwag file {path}: {e}") from None
    examples = []
    for i, line in enumerate(lines, 1):
        try:
            ex = json.loads(line)
        except json.JSONDecodeError:
            raise HellaSwagError(f"{path} line {i} is not valid JSON (corrupted or partial file?)") from None
        ok = (isinstance(ex, dict) and isinstance(ex.get("ctx"), str)
              and isinstance(ex.get("endings"), list) and len(ex["endings"]) == 4
              and all(isinstance(e, str) for e in ex["endings"])
              and (not need_label or ex.get("label") in (0, 1, 2, 3)))
        if not ok:
            raise HellaSwagError(f"{path} line {i} is not a HellaSwag example "
                                 f"(needs ctx, 4 endings{', label 0-3' if need_label else ''})")
        examples.append(ex)
    if not examples:
        raise HellaSwagError(f"{path} is empty")
    return examples


def verify(path, split):
    """Raise HellaSwagError unless `path` is a complete, intact copy of the official file."""
    if split in SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != SHA256[split]:
            raise HellaSwagError(f"{path}: sha256 {h.hexdigest()} is not the official {split} file's")
    else:
        # train/test have no pinned hash here: the best we can check is that the file is non-empty and
        # every line parses as an example. (The test split has no labels: its answers are hidden.)
        parse_file(path, need_label=(split != "test"))


def download(split="val", cache_dir=DEFAULT_CACHE_DIR, base_url=BASE_URL):
    """Path to a verified local copy of hellaswag_{split}.jsonl, downloaded into cache_dir if needed."""
    import requests  # only needed here

    path = Path(cache_dir) / f"hellaswag_{split}.jsonl"
    if path.exists():
        try:
            verify(path, split)
            return path
        except HellaSwagError:
            path.unlink(missing_ok=True)  # a partial or corrupted copy is never used: fetch it again
    url = f"{base_url}/hellaswag_{split}.jsonl"
    # Write to a temporary name and rename only once verified, so the final name always means "good file"
    # (an interrupted download or a concurrent reader never sees a partial file there).
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with requests.get(url, stream=True, timeout=60) as r:
            r.raise_for_status()
            with open(tmp, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
        try:
            verify(tmp, split)
        except HellaSwagError as e:
            raise HellaSwagError(f"download of {url} is corrupted or incomplete ({e}); not cached") from None
        os.replace(tmp, path)
    except (requests.RequestException, OSError) as e:
        raise HellaSwagError(f"could not download {url} to {path}: {type(e).__name__}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_examples(path=None, split="val", limit=0):
    """The examples of a local .jsonl file if `path` is given, else of the (downloaded) official split;
    only the first `limit` if limit > 0."""
    if path is None:
        path = download(split)
    elif not os.path.isfile(path):
        raise HellaSwagError(f"HellaSwag file {path} does not exist")
    examples = parse_file(path)
    return examples[:limit] if limit > 0 else examples


# -----------------------------------------------------------------------------
# scoring


def render_example(example, enc):
    """(context tokens, [tokens of each of the 4 endings], label). The leading space makes the ending's first
    word tokenize as it would mid-sentence, as in the GPT-2/GPT-3 evaluations."""
    ctx = enc.encode(example["ctx"])
    endings = [enc.encode(" " + e) for e in example["endings"]]
    return ctx, endings, example["label"]


@torch.no_grad()
def ending_losses(model, rendered, device="cpu", batch_size=16, autocast=contextlib.nullcontext, progress=False):
    """Summed cross-entropy of each ending and its token count: two (n, 4) tensors, in `rendered` order.
    The model should be in eval mode (score() sees to it).

    A row is context + ending. Rows longer than block_size lose tokens from the LEFT (the start of the
    context), so the whole ending is always kept; in the extreme case that the ending alone fills the block,
    its first token has no context and is not scored. Real HellaSwag (<= 166 tokens) is never truncated.
    """
    from tqdm import tqdm

    block_size = model.config.block_size
    rows = []  # per example: 4 x (tokens, number of ending tokens scored)
    for ctx, endings, _ in rendered:
        ex_rows = []
        for end in endings:
            toks = (ctx + end)[-block_size:]
            ex_rows.append((toks, min(len(end), len(toks) - 1)))
        rows.append(ex_rows)
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory shows up at once.
    order = sorted(range(len(rows)), key=lambda i: -max(len(t) for t, _ in rows[i]))
    total = torch.zeros(len(rows), 4, dtype=torch.float64)
    count = torch.zeros(len(rows), 4, dtype=torch.long)
    bar = tqdm(total=len(rows), desc="hellaswag", unit="ex", file=sys.stderr, disable=not progress)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        batch = [r for i in idx for r in rows[i]]  # 4 rows per example, all in one forward
        T = max(len(t) for t, _ in batch)
        # Right padding: with causal attention a position only sees positions before it, so the pad
        # tokens after a row's end cannot change its logits; they are also left out of the loss.
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.bool)  # True where logits[t] predicts an ending token
        for r, (toks, n_end) in enumerate(batch):
            x[r, :len(toks)] = torch.tensor(toks)
            y[r, :len(toks) - 1] = torch.tensor(toks[1:])  # logits at t predict token t+1
            mask[r, len(toks) - 1 - n_end:len(toks) - 1] = True
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        with autocast():
            # Only the ending positions need the output layer: the hidden states of the others are dropped
            # before it, which saves most of the largest matmul and all of its (rows, T, vocab) logits.
            logits = model.head(model.features(x)[mask])  # (ending tokens, padded_vocab); padding is -inf
        tok_loss = F.cross_entropy(logits.float(), y[mask], reduction="none")
        losses = torch.zeros(mask.shape, device=device)
        losses[mask] = tok_loss  # scatter back, then sum each row: a fixed order, so deterministic
        total[idx] = losses.cpu().double().sum(1).view(-1, 4)  # float64 on the CPU: MPS has no float64
        count[idx] = mask.sum(1).view(-1, 4).cpu()
        bar.update(len(idx))
    bar.close()
    return total, count


def score(model, examples, enc, device="cpu", batch_size=16, autocast=contextlib.nullcontext,
          rank=0, world_size=1, progress=False):
    """Count right answers on this rank's share of the examples, examples[rank::world_size].
    `batch_size` examples (x 4 endings) go through the model per forward; `autocast` is a function that
    returns a context manager (e.g. bf16 autocast). Returns {n, correct, correct_norm}: sum these over
    ranks, then call accuracies()."""
    mine = examples[rank::world_size]
    rendered = [render_example(e, enc) for e in mine]
    was_training = model.training
    model.eval()  # no dropout in our GPT, but a caller's model may have some
    try:
        total, count = ending_losses(model, rendered, device, batch_size, autocast, progress)
    finally:
        model.train(was_training)
    labels = torch.tensor([label for _, _, label in rendered], dtype=torch.long)
    return dict(n=len(mine),
                correct=int((total.argmin(1) == labels).sum()),
                correct_norm=int(((total / count.clamp(min=1)).argmin(1) == labels).sum()))


def accuracies(counts):
    """{n, correct, correct_norm} (summed over ranks) -> {n, acc, acc_norm}."""
    n = int(counts["n"])
    return dict(n=n, acc=int(counts["correct"]) / max(n, 1), acc_norm=int(counts["correct_norm"]) / max(n, 1))


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="HellaSwag accuracy of a GPT-2 (see the module docstring).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, default=argparse.SUPPRESS,
                   help="required: Hugging Face GPT-2 name (gpt2, gpt2-xl, ...) or directory, or our checkpoint .pt")
    p.add_argument("--data", default=None, help="local HellaSwag .jsonl; None: download the official file once")
    p.add_argument("--split", default="val", choices=["val", "train"], help="split to download when --data is None")
    p.add_argument("--limit", type=int, default=0, help="score only the first N examples (0 = all)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    p.add_argument("--dtype", default="fp32", help="fp32 (full precision, as the published scores were taken; TF32 "
                   "matmuls on CUDA), or autocast to bf16, fp16, or auto (bf16 if native, fp16 on older CUDA): faster, "
                   "but a few examples may flip")
    p.add_argument("--batch_size", type=int, default=16,
                   help="examples per forward (x4 rows, one per ending): faster until memory runs out")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)

    import tiktoken
    import train_gpt2  # here, not at the top: train_gpt2 imports this module too

    try:
        if args.batch_size < 1:
            raise HellaSwagError("--batch_size must be at least 1")
        rt = train_gpt2.setup_runtime(args.device, args.dtype)
        examples = load_examples(args.data, args.split, args.limit)  # before the model: bad data fails fast
        model = train_gpt2.load_model(args.model).to(rt.device)
    except (HellaSwagError, train_gpt2.UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    enc = tiktoken.get_encoding("gpt2")
    t0 = time.time()
    counts = score(model, examples, enc, rt.device, args.batch_size, rt.autocast, progress=True)
    dt = time.time() - t0
    print(json.dumps(dict(accuracies(counts), model=args.model, device=rt.device, dtype=rt.dtype,
                          examples_per_s=round(counts["n"] / dt, 2), seconds=round(dt, 1))))


if __name__ == "__main__":
    main()
