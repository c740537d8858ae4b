"""
Prepare the training data for the GPT-2 (124M) reproduction: FineWeb-Edu sample-10BT, ~10B GPT-2
tokens.

    python fineweb.py         # HuggingFaceFW/fineweb-edu, sample-10BT -> edu_fineweb10B/
    python fineweb.py --source my_docs.jsonl --out my_shards --shard_size 10_000_000
    python fineweb.py --source some/hub-dataset --name some-config --text_field content

Documents are streamed (no 100 GB download first), tokenized with tiktoken's GPT-2 encoding on all
cores, and written as shards of --shard_size tokens, each a 1-D uint16 .npy file (np.save):

    <out>/<prefix>_val_000000.npy, <prefix>_train_000001.npy, <prefix>_train_000002.npy, ...

--source may also be local: a .txt file is one document (its whole text); .jsonl/.json/.parquet
files hold one document per row (field --text_field); a directory means every such file under it, in
sorted path order.

Every document is <|endoftext|> (50256) followed by its tokens; a document that does not fit is
continued in the next shard, so every shard holds exactly --shard_size tokens except the last. Shard
0 is the validation shard. Interrupted? Run the same command again: it continues after the last
complete shard, and the shards come out byte-identical to an uninterrupted run (progress is kept in
<out>/<prefix>_progress.json)."""

import itertools
import json
import os
import re
import signal
import sys
from collections import deque
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

# the plumbing's errors, atomic writes and flags: none of them imports torch, which the tokenizer
# processes that import this file do not need (~2 s and ~200 MB each)
from plumbing import errors, files, flags

EOT = 50256  # <|endoftext|>: starts every document, so documents are separated
ENCODING = "gpt2"
BATCH_DOCS = 256  # documents per task sent to a worker: big enough that sending them costs little
LOCAL_TYPES = (".txt", ".jsonl", ".json", ".parquet")


# --------------------------------------------------------------------------- reading documents
# Every reader yields the documents' texts (str) in a fixed order: that order is what makes resume
# exact.

def read_txt(path):
    # Rule: a .txt file is ONE document, its whole content (an empty file holds no document).
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise errors.UserError(
            f"{path}: not UTF-8 (byte {e.start}); convert it to UTF-8 first"
        ) from None
    if text:
        yield text


def parse_json(raw, path, where):
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise errors.UserError(
            f"{path}: {where} is not UTF-8 (byte {e.start}); convert the file to UTF-8"
        ) from None
    except json.JSONDecodeError as e:
        raise errors.UserError(
            f"{path}: {where} is not valid JSON ({e.msg}); fix or remove it"
        ) from None


def read_json(path, text_field):
    # JSON Lines: one object per line (blank lines skipped). A .json file may instead hold one array
    # of objects.
    with open(path, "rb") as f:
        if path.suffix == ".json" and f.read(1024).lstrip()[:1] == b"[":
            f.seek(0)
            rows = enumerate(parse_json(f.read(), path, "the file"), 1)
            what = "item"
        else:
            f.seek(0)
            rows = (
                (i, parse_json(line, path, f"line {i}"))
                for i, line in enumerate(f, 1)
                if line.strip()
            )
            what = "line"
        for i, row in rows:
            text = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise errors.UserError(
                    f"{path}: {what} {i} has no text field {text_field!r}; fix the file or set "
                    "--text_field"
                )
            yield text


def read_parquet(path, text_field):
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise errors.UserError(
            f"{path}: not a readable parquet file ({e}); check the file"
        ) from None
    if text_field not in pf.schema_arrow.names:
        raise errors.UserError(
            f"{path}: no column {text_field!r} (has {pf.schema_arrow.names}); set --text_field"
        )
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise errors.UserError(
                    f"{path}: row {row} has no text in {text_field!r}; fix the file or set "
                    "--text_field"
                )
            yield text


def read_hf(source, name, text_field):
    import datasets  # imported here so that local sources do not pay for it
    try:  # streaming: rows arrive as they download, no 100 GB on disk first
        ds = datasets.load_dataset(source, name=name, split="train", streaming=True)
    except Exception as e:  # the hub raises many kinds; all mean "cannot open this"
        msg = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise errors.UserError(
            f"cannot open {source!r} (name={name!r}) as a local path or Hugging Face dataset: {msg}"
        ) from None

    def texts():
        for i, row in enumerate(ds, 1):
            text = row.get(text_field)
            if not isinstance(text, str):
                raise errors.UserError(
                    f"{source}: row {i} has no text field {text_field!r} (has {list(row)}); set "
                    "--text_field"
                )
            yield text
    return texts()


def open_source(source, name, text_field):
    """Check the source now (so mistakes show before any work) and return an iterator over its
    texts."""
    path = Path(source).expanduser()
    if not path.exists():
        if path.suffix in LOCAL_TYPES or source.startswith((".", "/", "~")):
            raise errors.UserError(f"{source}: no such file or directory; check --source")
        return read_hf(source, name, text_field)
    if path.is_file() and path.suffix not in LOCAL_TYPES:
        raise errors.UserError(
            f"{source}: unsupported file type; use one of {', '.join(LOCAL_TYPES)}"
        )
    paths = (
        sorted(f for f in path.rglob("*") if f.suffix in LOCAL_TYPES and f.is_file())
        if path.is_dir()
        else [path]
    )
    if not paths:
        raise errors.UserError(
            f"{source}: no {'/'.join(LOCAL_TYPES)} files in this directory; check --source"
        )
    return itertools.chain.from_iterable(read_file(f, text_field) for f in paths)


def read_file(path, text_field):
    if path.suffix == ".txt":
        return read_txt(path)
    return (
        read_parquet(path, text_field) if path.suffix == ".parquet" else read_json(path, text_field)
    )


# --------------------------------------------------------------------------- tokenizing in parallel

_enc = None  # one tokenizer per process, loaded on first use (not at import time)


def tokenize_batch(texts):
    """Texts -> (one uint16 array of all documents, each as EOT + its tokens; the end of each
    document
    in it)."""
    global _enc
    if _enc is None:
        _enc = tiktoken.get_encoding(ENCODING)
    flat, ends = [], []
    # encode_ordinary per document: faster than encode_ordinary_batch's thread pool here
    for text in texts:
        flat.append(EOT)
        # ordinary: "<|endoftext|>" inside a text is just text
        flat.extend(_enc.encode_ordinary(text))
        ends.append(len(flat))
    return np.array(flat, dtype=np.uint16), np.array(ends, dtype=np.int64)


def batched(iterable, n):
    it = iter(iterable)
    while batch := list(itertools.islice(it, n)):
        yield batch


def tokenize(batches, workers):
    """Yield tokenize_batch() of each batch, in input order, computed by `workers` processes."""
    if workers == 1:
        yield from map(tokenize_batch, batches)
        return
    # spawn: clean children, safe even after `datasets` has started network threads in this process.
    # Workers ignore Ctrl-C: the main process alone handles it (and the `with` ends them).
    with get_context("spawn").Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)) as pool:
        pending = deque()
        for batch in batches:
            pending.append(pool.apply_async(tokenize_batch, (batch,)))
            # bounded read-ahead keeps memory flat (Pool.imap reads all input)
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# --------------------------------------------------------------------------- shards and progress

def shard_path(out, prefix, k):
    return out / f"{prefix}_{'val' if k == 0 else 'train'}_{k:06d}.npy"


def progress_path(out, prefix):
    return out / f"{prefix}_progress.json"


def own_files(prefix):
    """A regex of the names shard_path and progress_path give: what an interrupted run's temporaries
    are of."""
    return rf"{re.escape(prefix)}_(?:val|train)_\d{{6,}}\.npy|{re.escape(prefix)}_progress\.json"


def save_atomic(path, write):
    """Write to a unique temporary name, then rename: a reader (or a resumed run) never sees half a
    file."""
    files.write_atomic(str(path), write)


def save_json(path, obj):
    save_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def load_progress(out, params):
    """The progress of an earlier run with the same parameters in `out`, or a fresh start; refuse
    anything else."""
    meta = progress_path(out, params["prefix"])
    if out.exists() and not out.is_dir():
        raise errors.UserError(f"--out {out} is a file, not a directory; give a directory path")
    if meta.exists():
        try:
            state = json.loads(meta.read_text())
            was = state["params"]
        except (ValueError, KeyError, TypeError):
            raise errors.UserError(
                f"{meta}: not a progress file of this script; use another --out or delete it"
            ) from None
        if was != params:
            diff = ", ".join(
                f"{k}={was.get(k)!r} (now {v!r})" for k, v in params.items() if was.get(k) != v
            )
            raise errors.UserError(
                f"{out} holds a run with other parameters: {diff}; use another --out or the same "
                "parameters"
            )
        return state
    if any(out.glob(f"{params['prefix']}_*.npy")):
        raise errors.UserError(
            f"{out} holds {params['prefix']} shards but no {meta.name}; use another --out or "
            "delete them"
        )
    return {
        "params": params,
        "shards": 0,
        "next_doc": 0,
        "next_offset": 0,
        "tokens": 0,
        "done": False,
    }


def write_shards(texts, out, state, workers):
    """Tokenize `texts` (the whole corpus, from its first document) into shards in `out`, continuing
    from `state`.

    state["next_doc"], state["next_offset"]: the document the next shard starts in, and how many of
    its tokens (its EOT counted) earlier shards already hold. Documents before it are read but not
    tokenized again."""
    out, params = Path(out), state["params"]
    size, prefix = params["shard_size"], params["prefix"]
    meta = progress_path(out, prefix)

    def commit(shard, next_doc, next_offset, done=False):
        k = state["shards"]
        out.mkdir(parents=True, exist_ok=True)
        if not meta.exists():  # written before shard 0, so our shards never exist without it
            save_json(meta, state)
        save_atomic(shard_path(out, prefix, k), lambda f: np.save(f, shard))
        state.update(shards=k + 1, next_doc=int(next_doc), next_offset=int(next_offset),
                     tokens=state["tokens"] + len(shard), done=done)
        save_json(meta, state)

    buf = np.empty(size, dtype=np.uint16)  # one preallocated shard, filled in place
    fill, doc, skip = 0, state["next_doc"], state["next_offset"]
    batches = batched(itertools.islice(texts, doc, None), BATCH_DOCS)
    bar = tqdm(unit="tok", unit_scale=True, initial=state["tokens"], file=sys.stdout, desc=str(out))
    for tokens, ends in tokenize(batches, workers):
        # on resume, the first document's first `skip` tokens are in earlier shards
        pos, skip = skip, 0
        bar.update(len(tokens) - pos)
        while pos < len(tokens):
            n = min(size - fill, len(tokens) - pos)
            buf[fill:fill + n] = tokens[pos:pos + n]
            fill, pos = fill + n, pos + n
            # shard full: the next one starts in this batch's document j, at token `pos`
            if fill == size:
                j = np.searchsorted(ends, pos, side="right")
                commit(buf, doc + j, pos - (ends[j - 1] if j else 0))
                fill = 0
        doc += len(ends)
    bar.close()
    if doc == 0:
        raise errors.UserError("the source holds no documents; check --source (and --text_field)")
    if fill:
        commit(buf[:fill], doc, 0, done=True)
    elif not state["done"]:  # the corpus ended exactly at a shard boundary
        state["done"] = True
        save_json(meta, state)
    return state


# --------------------------------------------------------------------------- command line

def main(argv=None):
    p = flags.Parser(
        prog="fineweb.py",
        description="Tokenize a corpus (FineWeb-Edu by default) into GPT-2 uint16 .npy shards.",
    )
    p.add_argument("--source", type=flags.text, default="HuggingFaceFW/fineweb-edu",
                   help="Hugging Face dataset name, or a local .txt/.jsonl/.json/.parquet file or "
                   "a directory of them")
    p.add_argument("--name", type=flags.text, help="dataset config; None means sample-10BT for "
                   "fineweb-edu, none otherwise (unused for local files)")
    p.add_argument("--text_field", type=flags.text, default="text",
                   help="field/column with each document's text (json/parquet/hub)")
    p.add_argument("--out", type=flags.path("out_dir"), default="edu_fineweb10B",
                   help="output directory for the shards and the progress file")
    p.add_argument("--shard_size", type=flags.number(int, 1, 2**32, hint="; e.g. 100_000_000"),
                   default=100_000_000, help="tokens per shard (the last shard holds the rest); "
                   "100_000_000 is read too")
    p.add_argument("--workers", type=flags.number(int, 1, 4096), default=os.cpu_count(),
                   help="tokenizer processes; the default is one per core")
    p.add_argument("--prefix", type=flags.path("name"), default="edufineweb",
                   help="shard names: <prefix>_val_000000.npy, <prefix>_train_000001.npy, ...")
    try:
        args = p.parse_args(argv)
        local = Path(args.source).expanduser().exists()
        # same file, same name
        source = str(Path(args.source).expanduser().resolve()) if local else args.source
        name = (
            None
            if local
            else args.name or ("sample-10BT" if source == "HuggingFaceFW/fineweb-edu" else None)
        )
        params = {"source": source, "name": name, "text_field": args.text_field,
                  "shard_size": args.shard_size, "prefix": args.prefix}
        out = Path(args.out)
        state = load_progress(out, params)
        if not state["done"]:
            enc = tiktoken.get_encoding(ENCODING)
            if enc.max_token_value >= 2**16:  # shards are uint16
                raise errors.UserError(
                    f"{ENCODING} has token ids up to {enc.max_token_value}, more than uint16 "
                    "holds; use a wider dtype"
                )
            texts = open_source(source, name, args.text_field)
            # one run an --out, once the inputs are checked: the temporaries of the shards an
            # interrupted run was writing go (they are written again)
            with files.DirLock(out, "--out", own_files(args.prefix)):
                state = write_shards(texts, out, state, args.workers)
    except errors.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(
            "interrupted: run the same command again to continue after the last complete shard",
            file=sys.stderr,
        )
        sys.exit(130)
    print(
        f"done: {state['next_doc']:,} documents, {state['tokens']:,} tokens, {state['shards']} "
        f"shards in {out}"
    )


if __name__ == "__main__":
    main()
