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

The scoring itself is train_gpt2.py's (its evaluation section), which --hellaswag_every also runs during
training; this file downloads and verifies the data and is the command line:
    examples = load_examples(split="val")
    counts = score(model, examples, enc, device, rank=rank, world_size=world_size)  # {n, correct, correct_norm}
    accuracies(counts)                                                                # {n, acc, acc_norm}
"""

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import train_gpt2
from train_gpt2 import accuracies, score
from train_plumbing import DEVICES, DTYPES, Flag, FlagParser, UserError, cli, setup_runtime, write_atomic

DEFAULT_CACHE_DIR = Path(__file__).resolve().parent / ".cache" / "hellaswag"
BASE_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"
# Only the validation file is pinned: the official file of 10,042 examples, 12,246,618 bytes.
SHA256 = {"val": "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"}


# -----------------------------------------------------------------------------
# data: download, verify, parse


def parse_file(path, need_label=True):
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


def verify(path, split):
    """Raise UserError unless `path` is a complete, intact copy of the official file."""
    if split in SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != SHA256[split]:
            raise UserError(f"{path}: sha256 {h.hexdigest()} is not the official {split} file's")
    else:
        # train/test have no pinned hash here: the best we can check is that the file is non-empty and
        # every line parses as an example. (The test split has no labels: its answers are hidden.)
        parse_file(path, need_label=(split != "test"))


def download(split="val", cache_dir=DEFAULT_CACHE_DIR, base_url=None):
    """Path to a verified local copy of hellaswag_{split}.jsonl, downloaded into cache_dir if needed from
    base_url (None: BASE_URL, read at the call)."""
    import requests  # only needed here

    base_url = base_url or BASE_URL
    path = Path(cache_dir) / f"hellaswag_{split}.jsonl"
    if path.exists():
        try:
            verify(path, split)
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
            verify(f.name, split)
        except UserError as e:
            raise UserError(f"download of {url} is corrupted or incomplete ({e}); not cached") from None

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(str(path), fetch)
    except (requests.RequestException, OSError) as e:
        raise UserError(f"could not download {url} to {path}: {type(e).__name__}: {e}") from None
    return path


def load_examples(path=None, split="val", limit=0):
    """The examples of a local .jsonl file if `path` is given, else of the (downloaded) official split;
    only the first `limit` if limit > 0."""
    if path is None:
        path = download(split)
    elif not os.path.isfile(path):
        raise UserError(f"HellaSwag file {path} does not exist")
    examples = parse_file(path)
    return examples[:limit] if limit > 0 else examples


# -----------------------------------------------------------------------------
# command line


def parser():
    p = FlagParser(prog="hellaswag.py", description="HellaSwag accuracy of a GPT-2 (see the module docstring).")
    p.flag("model", Flag(path="exists", also=tuple(train_gpt2.PRESETS), hint="; give a Hugging Face GPT-2 name ("
           + ", ".join(train_gpt2.PRESETS) + ") or directory, or a checkpoint file"), argparse.SUPPRESS,
           "required: Hugging Face GPT-2 name (gpt2, gpt2-xl, ...) or directory, or a checkpoint file: ours, or "
           "build-nanogpt's, nanoGPT's or llm.c's", required=True)
    p.flag("data", Flag(path="file"), None, "local HellaSwag .jsonl; None: download the official file once")
    p.flag("split", Flag(choices=("val", "train")), "val", "split to download when --data is None")
    p.flag("limit", Flag(int, lo=0), 0, "score only the first N examples (0 = all)")
    p.flag("device", Flag(choices=DEVICES), "auto", "auto (cuda > mps > cpu), cpu, cuda or mps")
    p.flag("dtype", Flag(choices=DTYPES), "fp32", "fp32 (full precision, as the published scores were taken; TF32 "
           "matmuls on CUDA), or autocast to bf16, fp16, or auto (bf16 if native, fp16 on older CUDA): faster, but a "
           "few examples may flip")
    p.flag("batch_size", Flag(int, lo=1), 16, "examples per forward (x4 rows, one per ending): faster until memory "
           "runs out")
    return p


def parse_args(argv=None):
    """The flags as parsed, not yet checked (parser().parse also checks them)."""
    return parser().parse_args(argv)


@cli
def main(argv):
    args = parser().parse(argv)
    rt = setup_runtime(args.device, args.dtype)
    examples = load_examples(args.data, args.split, args.limit)  # before the model: bad data fails fast
    model = train_gpt2.load_model(args.model).to(rt.device)
    enc = train_gpt2.get_encoding()
    t0 = time.time()
    counts = score(model, examples, enc, rt.device, args.batch_size, rt.autocast, progress=True)
    dt = time.time() - t0
    print(json.dumps(dict(accuracies(counts), model=args.model, device=rt.device, dtype=rt.dtype,
                          examples_per_s=round(counts["n"] / dt, 2), seconds=round(dt, 1))))


if __name__ == "__main__":
    main()
