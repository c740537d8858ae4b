"""Tests of fineweb.py on real web pages (tests/data/c4_sample.jsonl), mostly through the real CLI.

The reference tokens are computed here directly with tiktoken, not through fineweb.py's functions.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tiktoken

import fineweb
from conftest import DATA, ROOT
from plumbing import errors, files

EOT = 50256
SHARD = 40_000


# --------------------------------------------------------------------------- helpers

def fineweb_cli(*args, cwd, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "fineweb.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def reference(texts):
    """Every document as <|endoftext|> + its GPT-2 tokens, concatenated: what the shards must hold."""
    enc = tiktoken.get_encoding("gpt2")
    return np.array([t for text in texts for t in [EOT] + enc.encode_ordinary(text)], dtype=np.uint16)


def read_shards(out, prefix="edufineweb"):
    """The shards in order, checking their names: shard 0 is val, the rest train, numbered with no gap."""
    files = sorted(out.glob(f"{prefix}_*.npy"), key=lambda f: f.name.split("_")[-1])
    assert [f.name for f in files] == [f"{prefix}_{'val' if k == 0 else 'train'}_{k:06d}.npy" for k in range(len(files))]
    shards = [np.load(f) for f in files]
    assert all(s.dtype == np.uint16 and s.ndim == 1 for s in shards)
    return shards


def snapshot(folder, pattern="*"):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob(pattern)) if p.is_file()}


@pytest.fixture(scope="module")
def c4_texts():
    return [json.loads(line)["text"] for line in (DATA / "c4_sample.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def c4_ref(c4_texts):
    ref = reference(c4_texts)
    assert len(ref) == 186_906 + 400  # tests/data/README's token count, plus one separator per document
    return ref


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """An uninterrupted CLI run on c4_sample.jsonl with shard_size 40,000: (source, out dir, stdout)."""
    tmp = tmp_path_factory.mktemp("clean")
    (tmp / "c4.jsonl").write_bytes((DATA / "c4_sample.jsonl").read_bytes())
    r = fineweb_cli("--source", "c4.jsonl", "--out", "out", "--shard_size", SHARD, "--workers", 2, cwd=tmp)
    assert r.returncode == 0, r.stderr
    return tmp / "c4.jsonl", tmp / "out", r.stdout


def check_shards(out, ref, shard_size=SHARD, prefix="edufineweb"):
    shards = read_shards(out, prefix)
    assert [len(s) for s in shards[:-1]] == [shard_size] * (len(shards) - 1) and 0 < len(shards[-1]) <= shard_size
    np.testing.assert_array_equal(np.concatenate(shards), ref)


# --------------------------------------------------------------------------- correct output

def test_shards_match_tiktoken_two_workers(clean_run, c4_ref):
    _, out, stdout = clean_run
    check_shards(out, c4_ref)
    assert len(read_shards(out)) == 5
    assert "400 documents, 187,306 tokens, 5 shards" in stdout.splitlines()[-1]


def test_one_worker_gives_identical_files(tmp_path, clean_run):
    src, out, _ = clean_run
    r = fineweb_cli("--source", src, "--out", "out", "--shard_size", SHARD, "--workers", 1, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert snapshot(tmp_path / "out") == snapshot(out)  # progress file included: same source, same parameters


def test_rerun_of_a_finished_run_changes_nothing(clean_run):
    src, out, _ = clean_run
    before = snapshot(out)
    r = fineweb_cli("--source", src, "--out", out, "--shard_size", SHARD, cwd=src.parent)
    assert r.returncode == 0 and "5 shards" in r.stdout
    assert snapshot(out) == before


KILL_AT_SHARD = """
import os, signal, sys
import fineweb
k, mid = int(sys.argv.pop(1)), sys.argv.pop(1) == "mid"
real_save = fineweb.save_atomic
def save_then_die(path, write):
    if mid and str(path).endswith(f"_{k:06d}.npy"):  # shard k half on disk, under its temporary name
        real_save(path, lambda f: (f.write(b"half"), f.flush(), os.kill(os.getpid(), signal.SIGKILL)))
    real_save(path, write)
    if str(path).endswith(f"_{k:06d}.npy"):  # shard k is in place, the progress file does not know it yet
        os.kill(os.getpid(), signal.SIGKILL)
fineweb.save_atomic = save_then_die
fineweb.main()
"""


@pytest.mark.parametrize("kill_after,when", [(0, "after"), (2, "after"), (1, "mid")])
def test_killed_run_resumes_to_identical_files(tmp_path, clean_run, kill_after, when):
    src, clean_out, _ = clean_run
    args = ("--source", src, "--out", "out", "--shard_size", SHARD)
    # The process SIGKILLs itself right after shard `kill_after` is renamed into place, before its progress is
    # saved; or ("mid") while that shard is written, which leaves its temporary file behind.
    r = subprocess.run([sys.executable, "-c", KILL_AT_SHARD, str(kill_after), when, *map(str, args), "--workers",
                        "2"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == -9
    progress = json.loads((tmp_path / "out" / "edufineweb_progress.json").read_text())
    assert progress["shards"] == kill_after and not progress["done"]
    assert len(list((tmp_path / "out").glob("*.npy"))) == kill_after + (when == "after")
    temps = [p.name for p in (tmp_path / "out").glob("*.tmp")]
    assert len(temps) == (when == "mid")
    if kill_after == 2:
        assert progress["next_offset"] > 0  # shard 2 starts inside a document: the resume must split it exactly
    r = fineweb_cli(*args, "--workers", 1, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert snapshot(tmp_path / "out") == snapshot(clean_out)  # the temporary file is gone too
    assert all(name in r.stdout for name in temps) and ("removed 1 temporary file" in r.stdout) == (when == "mid")


def test_error_mid_stream_keeps_complete_shards_and_resumes_after_fix(tmp_path, clean_run):
    src, clean_out, _ = clean_run
    good = src.read_bytes()
    (tmp_path / "c4.jsonl").write_bytes(good + b'{"text": "unfinished\n')
    args = ("--source", "c4.jsonl", "--out", "out", "--shard_size", SHARD, "--workers", 1)
    r = fineweb_cli(*args, cwd=tmp_path)
    assert r.returncode == 2 and "line 401" in r.stderr
    written = snapshot(tmp_path / "out")
    shards = read_shards(tmp_path / "out")  # the complete shards before the error: a prefix of the clean run's
    assert 1 <= len(shards) < 5 and (tmp_path / "out" / "edufineweb_progress.json").exists()
    assert all(written[p] == (clean_out / p).read_bytes() for p in written if p.suffix == ".npy")
    (tmp_path / "c4.jsonl").write_bytes(good)  # fix the file, run again: it continues
    assert fineweb_cli(*args, cwd=tmp_path).returncode == 0
    assert snapshot(tmp_path / "out", "*.npy") == snapshot(clean_out, "*.npy")


def test_txt_source_is_one_document(tmp_path):
    text = (ROOT / "input.txt").read_text(encoding="utf-8")
    (tmp_path / "shakespeare.txt").write_text(text, encoding="utf-8")
    r = fineweb_cli("--source", "shakespeare.txt", "--out", "out", "--shard_size", SHARD, "--prefix", "tiny",
                    "--workers", 1, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    check_shards(tmp_path / "out", reference([text]), prefix="tiny")


def test_parquet_source(tmp_path, c4_texts, c4_ref):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table({"id": list(range(len(c4_texts))), "content": c4_texts})
    pq.write_table(table, tmp_path / "c4.parquet", row_group_size=100)  # several row groups
    r = fineweb_cli("--source", "c4.parquet", "--text_field", "content", "--out", "out", "--shard_size", SHARD,
                    "--workers", 2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    check_shards(tmp_path / "out", c4_ref)


def test_directory_source_reads_files_in_sorted_order(tmp_path, c4_texts):
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = tmp_path / "corpus"
    (src / "b").mkdir(parents=True)
    lines = (DATA / "c4_sample.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (src / "a.jsonl").write_text("".join(lines[:120]) + "\n", encoding="utf-8")  # a blank line is skipped
    pq.write_table(pa.table({"text": c4_texts[120:240]}), src / "b" / "c.parquet")
    (src / "d.json").write_text(json.dumps([{"text": t} for t in c4_texts[240:399]]), encoding="utf-8")
    (src / "e.txt").write_text(c4_texts[399], encoding="utf-8")
    (src / "notes.md").write_text("not a source file")
    r = fineweb_cli("--source", "corpus", "--out", "out", "--shard_size", 30_000, "--workers", 2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    check_shards(tmp_path / "out", reference(c4_texts), shard_size=30_000)


def test_hugging_face_path_on_local_files(tmp_path, c4_texts):
    # read_hf() is the path hub names take (datasets.load_dataset, streaming); here it loads local jsonl files.
    lines = (DATA / "c4_sample.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "part-0.jsonl").write_text("".join(lines[:150]), encoding="utf-8")
    (tmp_path / "part-1.jsonl").write_text("".join(lines[150:]), encoding="utf-8")
    assert list(fineweb.read_hf(str(tmp_path), None, "text")) == c4_texts
    with pytest.raises(errors.UserError, match="no text field 'body'"):
        next(fineweb.read_hf(str(tmp_path), None, "body"))


def test_token_ids_beyond_uint16_fail_clearly(monkeypatch, capsys, tmp_path):
    class WideEncoding:
        max_token_value = 100_276
    monkeypatch.setattr(fineweb.tiktoken, "get_encoding", lambda name: WideEncoding())
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--source", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "uint16" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- bad input

def make_bad_inputs(tmp):
    (tmp / "empty.jsonl").write_bytes(b"")
    (tmp / "emptydir").mkdir()
    (tmp / "nofield.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"url": "x"}\n')
    (tmp / "nullfield.jsonl").write_text('{"text": null}\n')
    (tmp / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp / "latin1.txt").write_bytes(b"caf\xe9")
    (tmp / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    (tmp / "data.csv").write_text("text\nhello\n")
    (tmp / "garbage.parquet").write_bytes(b"this is not parquet")
    (tmp / "ok.jsonl").write_text('{"text": "hello world"}\n')
    (tmp / "stray").mkdir()
    (tmp / "stray" / "edufineweb_val_000000.npy").write_bytes(b"someone else's shard")
    (tmp / "junkprogress").mkdir()
    (tmp / "junkprogress" / "edufineweb_progress.json").write_text("[1, 2]")


BAD = [  # (case, extra args, words the one error line must contain)
    ("missing file", ["--source", "missing.jsonl"], ["missing.jsonl", "no such file"]),
    ("empty file", ["--source", "empty.jsonl"], ["no documents"]),
    ("directory without sources", ["--source", "emptydir"], ["emptydir", "no .txt"]),
    ("line without text field", ["--source", "nofield.jsonl"], ["nofield.jsonl", "line 3", "--text_field"]),
    ("text is null", ["--source", "nullfield.jsonl"], ["nullfield.jsonl", "line 1"]),
    ("non-UTF-8 jsonl", ["--source", "latin1.jsonl"], ["latin1.jsonl", "line 2", "UTF-8"]),
    ("non-UTF-8 txt", ["--source", "latin1.txt"], ["latin1.txt", "UTF-8"]),
    ("invalid JSON", ["--source", "broken.jsonl"], ["broken.jsonl", "line 2", "not valid JSON"]),
    ("unsupported type", ["--source", "data.csv"], ["data.csv", "unsupported"]),
    ("not parquet", ["--source", "garbage.parquet"], ["garbage.parquet", "parquet"]),
    ("parquet without column", ["--source", "c4.parquet", "--text_field", "body"], ["c4.parquet", "'body'"]),
    ("other run's parameters", ["--source", "ok.jsonl", "--out", "done", "--shard_size", 50], ["shard_size=100", "--out"]),
    ("other run's source", ["--source", "nofield.jsonl", "--out", "done", "--shard_size", 100], ["source=", "--out"]),
    ("shards without progress", ["--source", "ok.jsonl", "--out", "stray"], ["stray", "no edufineweb_progress.json"]),
    ("not our progress file", ["--source", "ok.jsonl", "--out", "junkprogress"], ["not a progress file"]),
    ("out is a file", ["--source", "ok.jsonl", "--out", "ok.jsonl"], ["is a file"]),
    ("out cannot be created", ["--source", "ok.jsonl", "--out", "ok.jsonl/sub"], ["--out", "ok.jsonl/sub"]),
    ("shard_size 0", ["--source", "ok.jsonl", "--shard_size", 0], ["--shard_size"]),
    ("negative shard_size", ["--source", "ok.jsonl", "--shard_size", -5], ["--shard_size"]),
    ("zero workers", ["--source", "ok.jsonl", "--workers", 0], ["--workers"]),
]


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory, c4_texts):
    import pyarrow as pa
    import pyarrow.parquet as pq
    tmp = tmp_path_factory.mktemp("bad")
    make_bad_inputs(tmp)
    pq.write_table(pa.table({"text": c4_texts[:3]}), tmp / "c4.parquet")
    r = fineweb_cli("--source", "ok.jsonl", "--out", "done", "--shard_size", 100, "--workers", 1, cwd=tmp)
    assert r.returncode == 0, r.stderr  # a finished run that later, different runs must not touch
    return tmp


@pytest.mark.parametrize("case,args,words", BAD, ids=[c for c, _, _ in BAD])
def test_bad_input_one_line_exit_2_nothing_touched(bad_dir, case, args, words):
    before = snapshot(bad_dir)
    defaults = {"--workers": 1, "--out": "out"}
    r = fineweb_cli(*args, *[x for k, v in defaults.items() if k not in args for x in (k, v)], cwd=bad_dir)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert snapshot(bad_dir) == before  # nothing written, nothing changed


def test_import_does_nothing_and_local_sources_skip_datasets(tmp_path):
    code = ("import sys, fineweb; assert fineweb._enc is None; "
            "fineweb.main(['--source', 'a.txt', '--out', 'out', '--workers', '1']); print('datasets' in sys.modules)")
    (tmp_path / "a.txt").write_text("A tiny document.")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.splitlines()[-2:] == ["done: 1 documents, 5 tokens, 1 shards in out", "False"]


def test_a_second_run_on_an_out_in_use_is_refused_and_touches_nothing(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("A tiny document.")
    out = tmp_path / "out"
    argv = ["--source", str(tmp_path / "a.txt"), "--out", str(out), "--workers", "1"]
    # a run in progress, with the shard it is writing (in this process: flock locks belong to the open file, so it
    # contends with itself as another process would)
    with files.DirLock(out, "--out", fineweb.own_files("edufineweb")):
        half = out / "edufineweb_val_000000.npy.0123456789ab.tmp"
        half.write_bytes(b"half")
        with pytest.raises(SystemExit) as e:
            fineweb.main(argv)
        assert e.value.code == 2 and capsys.readouterr().err == (
            f"error: {out} is in use by another run (pid {os.getpid()} on host {socket.gethostname()}); wait for it "
            "to finish or choose another --out\n")
        assert sorted(p.name for p in out.iterdir()) == [".lock", half.name]
    fineweb.main(argv)  # the first one gone: the folder is free, and the shard it was writing is a leftover
    assert f"removed 1 temporary file that interrupted writes left in {out} (4 bytes): {half.name}" in (
        capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["edufineweb_progress.json", "edufineweb_val_000000.npy"]
