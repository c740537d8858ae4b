"""
Benchmark: tokens/s of fineweb.py's tokenizing vs raw tiktoken, on real web pages
(tests/data/c4_sample.jsonl).

    python bench/bench_fineweb.py [--repeat 50] [--rounds 5] [--workers N]

Rows: raw tiktoken encode_ordinary_batch in one thread, and with tiktoken's own threads on all cores
(over batches of fineweb.BATCH_DOCS documents, and over all documents at once); fineweb.py's
tokenize() with 1 and with all worker processes (it also adds separators and builds uint16 arrays;
timed from the first batch's arrival, so the ~0.7 s process start-up is left out: it is nothing in a
10B-token run); fineweb.py's write_shards() end to end (shards written to a temp dir, start-up
included). Each figure is the best of --rounds runs.
"""

import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import tiktoken

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fineweb  # noqa: E402
from plumbing import errors, flags  # noqa: E402


def best_rates(rows, rounds):
    """Best tokens/s of each fn(), which returns (tokens, seconds). Rounds interleave the rows, so a
    busy moment on the machine hurts all rows alike instead of one."""
    best = dict.fromkeys(rows, 0.0)
    for _ in range(rounds):
        for name, fn in rows.items():
            n, seconds = fn()
            best[name] = max(best[name], n / seconds)
    return best


def timed(fn):
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def main(argv=None):
    p = flags.Parser(prog="bench_fineweb.py")
    p.add_argument("--data", type=flags.path("file"),
                   default=str(ROOT / "tests" / "data" / "c4_sample.jsonl"),
                   help="a .jsonl of documents")
    p.add_argument("--repeat", type=flags.number(int, 1, 10**6), default=50,
                   help="times the documents are repeated")
    p.add_argument("--rounds", type=flags.number(int, 1, 1000), default=5,
                   help="each figure is the best of this many runs")
    p.add_argument("--workers", type=flags.number(int, 1, 4096), default=os.cpu_count(),
                   help="tokenizer processes")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
    except errors.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    docs = [json.loads(line)["text"] for line in open(args.data, encoding="utf-8")] * args.repeat
    enc = tiktoken.get_encoding("gpt2")
    n_tok = sum(map(len, enc.encode_ordinary_batch(docs[:1000]))) * args.repeat + len(docs)
    print(f"{len(docs):,} documents, {n_tok:,} tokens (separators included); "
          f"{os.cpu_count()} cores, workers={args.workers}")

    # steady state: timed from the first batch's arrival (after pool start-up)
    def fineweb_tokenize(workers):
        results = fineweb.tokenize(fineweb.batched(docs, fineweb.BATCH_DOCS), workers)
        next(results)
        return timed(lambda: sum(len(t) for t, _ in results))

    def fineweb_write():
        # no progress bar
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
            params = {"source": "bench", "name": None, "text_field": "text",
                      "shard_size": 10_000_000, "prefix": "b"}
            state = fineweb.load_progress(Path(out), params)
            return timed(
                lambda: fineweb.write_shards(iter(docs), out, state, args.workers)["tokens"])

    # a loop over batches, like fineweb.py (no separators)
    def raw(threads, batch=fineweb.BATCH_DOCS):
        return timed(lambda: sum(
            sum(map(len, enc.encode_ordinary_batch(docs[i:i + batch], num_threads=threads)))
            for i in range(0, len(docs), batch)))

    cores = os.cpu_count()
    rows = {
        "tiktoken encode_ordinary_batch loop, num_threads=1": lambda: raw(1),
        f"tiktoken encode_ordinary_batch loop, num_threads={cores}": lambda: raw(cores),
        f"tiktoken encode_ordinary_batch all docs, num_threads={cores}":
            lambda: raw(cores, batch=len(docs)),
        "fineweb.tokenize, workers=1": lambda: fineweb_tokenize(1),
        f"fineweb.tokenize, workers={args.workers}": lambda: fineweb_tokenize(args.workers),
        f"fineweb.write_shards end to end, workers={args.workers} (incl. start-up)": fineweb_write,
    }
    rates = best_rates(rows, args.rounds)
    best_raw = max(list(rates.values())[:3])
    print(f"{'approach':68s} {'Mtok/s':>7s} {'vs best raw':>11s}")
    for name, r in rates.items():
        print(f"{name:68s} {r / 1e6:7.2f} {r / best_raw:10.2f}x")


if __name__ == "__main__":
    main()
