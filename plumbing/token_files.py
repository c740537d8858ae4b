"""
Token files: the GPT-2 tokenizer, uint16 token shards checked and read as batches need them, never
read changed (fineweb.py's .npy, llm.c's and nanoGPT's .bin), and a text file tokenized once and
split into train and val."""

import glob
import operator
import os
import re
import sys
import weakref

import numpy as np
import torch

from plumbing import errors, formats, runtime


def get_encoding():
    """The GPT-2 tokenizer (tiktoken's "gpt2"), or one line saying how to get its files without a
    network."""
    import tiktoken  # imported here so that importing this file stays free of side effects
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise errors.UserError(
            f"could not load the GPT-2 tokenizer ({type(e).__name__}); "
            "tiktoken downloads it once, so connect to the network "
            "or point TIKTOKEN_CACHE_DIR at a folder holding its files") from None


class TokenFile:
    """A uint16 token shard on disk, read as batches need it (sliced like an array: file[a:b]), with
    os.pread from the file this run opened. Each read is checked, before and after, against the
    file's size and modification time when it was opened: a file truncated or rewritten in place
    while the run trains on it ends the run with one line naming it, where a memory map would die
    of SIGBUS (truncated) or mix old and new tokens (rewritten). A file replaced by another renamed
    over it keeps being read as it was: the run holds the old one open (docs/data.md). A rewrite
    that keeps both the size and the modification time (cp -p, rsync -t) is not seen."""

    def __init__(self, path, fd, offset, n):
        self.filename, self.fd, self.offset, self.n = path, fd, offset, n  # tokens from offset
        weakref.finalize(self, os.close, fd)  # closed with the object
        self.stamp = self.now()

    def now(self):
        st = os.fstat(self.fd)
        return st.st_size, st.st_mtime_ns

    def check(self):
        if self.now() != self.stamp:
            (size, _), (now, _) = self.stamp, self.now()
            raise errors.UserError(
                f"{self.filename} changed while this run read it ({size:,} bytes when opened, "
                f"{now:,} now): a token file must not be rewritten in place during a run; put it "
                "back as it was and continue with --resume auto, or start a new run "
                "(docs/data.md: what is safe to do to a data directory during a run)")

    def __len__(self):
        return self.n

    def __array__(self, dtype=None, copy=None):  # np.asarray(file): all its tokens
        return self[:] if dtype is None else self[:].astype(dtype)

    def __getitem__(self, index):
        if not isinstance(index, slice):  # one token
            i = operator.index(index)  # a Python int: numpy's small ints would overflow below
            if not -self.n <= i < self.n:
                raise IndexError(f"token {i} of a file of {self.n}")
            return self[i % self.n:i % self.n + 1][0]
        start, stop, step = index.indices(self.n)
        if step != 1:  # rare: read the span, then step through it
            return self[:][index]
        self.check()
        end, at, parts = self.offset + 2 * max(start, stop), self.offset + 2 * start, []
        while at < end:  # one pread returns at most ~2 GB on Linux
            part = os.pread(self.fd, min(end - at, 1 << 30), at)
            if not part:
                break
            parts.append(part)
            at += len(part)
        self.check()  # a rewrite during the read would have mixed old and new tokens
        return np.frombuffer(b"".join(parts), dtype=np.uint16)


def load_tokens(path):
    """A uint16 token shard as a TokenFile: read from disk only as batches need it, and checked
    that it does not change under the run. A .npy (fineweb.py, build-nanogpt), nanoGPT's train.bin
    or val.bin (raw), or llm.c's .bin, whose 256-int32 header read_llmc_tokens checks."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise errors.UserError(f"cannot open token file {path} ({e.strerror})") from None
    tokens = TokenFile(path, fd, 0, 0)  # the file as opened: its size and time, before the scan
    mapped = map_tokens(path)
    tokens.offset, tokens.n = mapped.offset, len(mapped)
    tokens.check()  # as it was when opened, through the checks of map_tokens
    return tokens


def map_tokens(path):
    """A uint16 token shard memory-mapped, checked to hold GPT-2 ids (load_tokens)."""
    if os.path.basename(path) in formats.NANOGPT_TOKEN_FILES:
        arr = formats.read_nanogpt_tokens(path)
    elif path.endswith(".bin"):
        arr = formats.read_llmc_tokens(path)
    else:
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise errors.UserError(f"{path} is not a readable .npy token shard ({e}); "
                                   "re-create it with fineweb.py") from None
        if arr.dtype != np.uint16 or arr.ndim != 1:
            raise errors.UserError(f"{path} holds {arr.dtype} of shape {arr.shape}, expected a "
                                   "1-D uint16 token array; re-create it with fineweb.py")
    # one pass over the shard (~0.1 s per 100M tokens): another tokenizer's ids would be an infinite
    # loss, or on a GPU a device-side assert, much later
    if len(arr) and (top := int(arr.max())) >= formats.GPT2_VOCAB:
        raise errors.UserError(
            f"{path} holds token id {top}, but GPT-2's ids end at {formats.GPT2_VOCAB - 1}: "
            "it was made with another tokenizer; re-create it with fineweb.py")
    return arr


def shard_paths(data_dir, split):
    """The shards of one split ("train"/"val") in a directory: the .npy (or .bin) files with that
    word in their name (edufineweb_val_000000.npy, fineweb_val_000000.bin, nanoGPT's val.bin),
    ordered by the number in their name."""
    paths = [p for p in (glob.glob(os.path.join(data_dir, "*.npy"))
                         + glob.glob(os.path.join(data_dir, "*.bin")))
             if split in re.split(r"[^a-z]+", os.path.basename(p).lower())]
    return sorted(paths,
                  key=lambda p: [int(n) for n in re.findall(r"\d+", os.path.basename(p))] or [0])


def load_splits(data, splits=("train", "val")):
    """Token arrays of each split, as a list per split. data is a directory of token shards, or a
    text file (read and tokenized once) of which the last 10% is the val split."""
    if os.path.isdir(data):
        paths = {split: shard_paths(data, split) for split in splits}
        for split in splits:
            if not paths[split]:
                raise errors.UserError(f"{data} has no {split} shards (*{split}*.npy or .bin); "
                                       "create them with fineweb.py")
        return [[load_tokens(p) for p in paths[split]] for split in splits]
    tokens = text_tokens(data)  # read and tokenized once, for both splits
    n_val = len(tokens) // 10  # the val split is the end of the text: no sentence is in both
    return [[tokens[:len(tokens) - n_val]] if split == "train" else [tokens[len(tokens) - n_val:]]
            for split in splits]


def train_and_val(data, val=True):
    """(the train split's token arrays, the val split's or None where val is False): load_splits."""
    splits = load_splits(data, ("train", "val") if val else ("train",))
    return splits[0], splits[1] if val else None


def load_split(data, split):
    """Token arrays of one split (load_splits)."""
    return load_splits(data, (split,))[0]


def text_tokens(path):
    """The GPT-2 tokens of a UTF-8 text file, as uint16."""
    if not os.path.isfile(path):
        raise errors.UserError(f"--data {path} does not exist; "
                               "give a text file or a directory of token shards")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise errors.UserError(f"{path} is not UTF-8 text (byte {e.start}); "
                               "convert it to UTF-8 first") from None
    if not text.strip():
        raise errors.UserError(f"{path} is empty; give a text file with some text in it")
    # encode_ordinary: text that happens to contain "<|endoftext|>" is just text, not the
    # special token
    return np.array(get_encoding().encode_ordinary(text), dtype=np.uint16)


def shards_that_fill(shards, n, rank=0):
    """The shards with at least n tokens (one micro-batch); a shorter one is skipped with a warning,
    and none long enough is an error that says what to lower."""
    short = [s for s in shards if len(s) < n]
    names = ", ".join(f"{getattr(s, 'filename', None) or 'the text'} ({len(s)} tokens)"
                      for s in short)
    if len(short) == len(shards):
        raise errors.UserError(
            f"no train data fills one micro-batch of batch_size*seq_len+1 = {n} tokens: {names}; "
            "lower --batch_size or --seq_len, or use more data")
    if short and rank == 0:
        print(f"warning: skipping train shards shorter than one micro-batch ({n} tokens): {names}",
              file=sys.stderr)
    return [s for s in shards if len(s) >= n]


def first_tokens(shards, n=None):
    """The first n tokens of a split (None: all of it), across its shards, reading no more of them
    than that."""
    return np.concatenate([np.asarray(s[:n]) for s in shards])[:n]


def data_shuffle(cfg):
    """--shuffle, or its default: shuffle shard directories (many documents, read again every
    epoch); keep a text file (one document, usually small) in order, as before --shuffle existed."""
    return bool(cfg.shuffle if cfg.shuffle is not None else os.path.isdir(cfg.data))


def val_batches(shards, n_tokens, B, T, rt, fsdp=False):
    """The fixed val set: the first n_tokens // T sequences of the val split, the same at every
    evaluation and for any world size; sequence i is evaluated on rank i % world_size. fsdp: every
    rank yields as many batches, the missing ones idle (y None; each forward needs every rank)."""
    rank, world_size = rt.rank, rt.world_size
    tokens = first_tokens(shards, n_tokens + 1)
    n_seq = (len(tokens) - 1) // T
    if n_seq == 0:
        raise errors.UserError(f"the val split has {len(tokens)} tokens, fewer than seq_len+1 = "
                               f"{T + 1}; lower --seq_len or give more val data")
    mine = list(range(rank, n_seq, world_size))  # every rank a share; their sums are all-reduced
    n = -(-len(mine) // B)  # batches of this rank; fsdp: agreed on before any forward
    idle = runtime.most_on_any_rank(n, rt) - n if fsdp else 0
    for i in range(0, len(mine), B):
        rows = [torch.from_numpy(tokens[j * T:(j + 1) * T + 1].astype(np.int64))
                for j in mine[i:i + B]]
        buf = torch.stack(rows)  # (b, T + 1)
        yield buf[:, :-1], buf[:, 1:]
    for _ in range(idle):
        yield torch.zeros(1, T, dtype=torch.long), None
