"""Tests for hellaswag.py: scores against Hugging Face's own forward pass, batched == unbatched, the
verified download, and the CLI. Run: python -m pytest tests/test_hellaswag.py"""

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch

import hellaswag
import train_gpt2
from conftest import HELLASWAG as VAL
from conftest import ROOT
from plumbing import errors, files, hellaswag_eval, runtime

N_EXAMPLES = 100  # real validation examples, scored against transformers in fp32


@pytest.fixture(scope="module")
def enc():
    import tiktoken
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def examples():
    return hellaswag_eval.load_examples(VAL, limit=N_EXAMPLES)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small random GPT-2 in Hugging Face format. Biases and LayerNorms are moved off their init (0 and 1)
    so that a dropped bias or a missed transpose changes the scores; weights are large enough that the
    4 endings get clearly different losses (no near-ties to flip an argmin)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=50257, n_positions=256, initializer_range=0.1)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(hf_dir, examples, enc):
    """Summed ending loss and token count per example and ending, with transformers' forward pass,
    one (context + ending) sequence at a time: an implementation independent of hellaswag.py."""
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    total, count = torch.zeros(len(examples), 4, dtype=torch.float64), torch.zeros(len(examples), 4)
    with torch.no_grad():
        for i, ex in enumerate(examples):
            ctx = enc.encode(ex["ctx"])
            for j, ending in enumerate(ex["endings"]):
                end = enc.encode(" " + ending)
                ids = torch.tensor([ctx + end])
                assert ids.size(1) <= 256
                logprobs = model(ids).logits[0].double().log_softmax(-1)
                # the token at position p is predicted by the logits at p - 1
                total[i, j] = -sum(logprobs[len(ctx) + k - 1, t] for k, t in enumerate(end))
                count[i, j] = len(end)
    return total, count


@pytest.fixture(scope="module")
def ours(hf_dir):
    return train_gpt2.GPT.from_pretrained(str(hf_dir))


def test_scores_match_transformers(ours, examples, enc, reference):
    ref_total, ref_count = reference
    rendered = [hellaswag_eval.render_example(e, enc) for e in examples]
    total, count = hellaswag_eval.ending_losses(ours, rendered, batch_size=7)
    assert torch.equal(count.double(), ref_count.double())
    torch.testing.assert_close(total, ref_total, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(total / count, ref_total / ref_count, atol=1e-5, rtol=1e-6)
    # the scores must differ enough that rounding cannot flip a choice, or the checks below prove little
    for t in (ref_total, ref_total / ref_count):
        top2 = t.sort(1).values[:, :2]
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-4  # fp32 differences here are ~1e-5 (atol above)
    assert torch.equal(total.argmin(1), ref_total.argmin(1))
    assert torch.equal((total / count).argmin(1), (ref_total / ref_count).argmin(1))

    labels = torch.tensor([e["label"] for e in examples])
    counts = train_gpt2.hellaswag_score(ours, examples, enc, batch_size=7)
    assert counts == dict(n=len(examples), correct=int((ref_total.argmin(1) == labels).sum()),
                          correct_norm=int(((ref_total / ref_count).argmin(1) == labels).sum()))
    acc = hellaswag_eval.accuracies(counts)
    assert acc["n"] == len(examples) and acc["acc"] == counts["correct"] / len(examples)


def test_batched_equals_unbatched(ours, examples, enc):
    rendered = [hellaswag_eval.render_example(e, enc) for e in examples]
    one_total, one_count = hellaswag_eval.ending_losses(ours, rendered, batch_size=1)
    all_total, all_count = hellaswag_eval.ending_losses(ours, rendered, batch_size=16)
    assert torch.equal(one_count, all_count)
    torch.testing.assert_close(one_total, all_total, atol=1e-5, rtol=0)
    assert torch.equal(one_total.argmin(1), all_total.argmin(1))
    assert torch.equal((one_total / one_count).argmin(1), (all_total / all_count).argmin(1))


def test_ranks_split_the_examples(ours, examples, enc):
    # each of 3 ranks scores its share (the sums over the ranks left out: no process group here)
    examples = examples[:10]
    full = train_gpt2.hellaswag_score(ours, examples, enc)
    ranks = [runtime.Runtime(False, r, r, 3, r == 0, "cpu", "cpu", "fp32") for r in range(3)]
    parts = [hellaswag_eval.totals(train_gpt2.hellaswag_score, ours, examples, enc, 16, rt, False) for rt in ranks]
    assert [p["n"] for p in parts] == [4, 3, 3]
    assert {k: sum(p[k] for p in parts) for k in full} == full


def test_eval_mode_restored_and_left_truncation(ours, enc):
    # A context longer than block_size loses its start; the ending is still scored in full.
    ex = dict(ctx="word " * 400, endings=["a b c", "d e", "f", "g h i j"], label=0)
    ours.train()
    counts = train_gpt2.hellaswag_score(ours, [ex], enc)
    assert ours.training and counts["n"] == 1
    rendered = [hellaswag_eval.render_example(ex, enc)]
    _, count = hellaswag_eval.ending_losses(ours, rendered)
    assert count.tolist() == [[len(e) for e in rendered[0][1]]]


def test_bad_local_files(tmp_path):
    with pytest.raises(errors.UserError, match="does not exist"):
        hellaswag_eval.load_examples(tmp_path / "nope.jsonl")
    partial = tmp_path / "partial.jsonl"
    partial.write_bytes(VAL.read_bytes()[:5000])  # cut mid-line
    with pytest.raises(errors.UserError, match="is not valid JSON"):
        hellaswag_eval.load_examples(partial)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"ctx": "x", "endings": ["a", "b"], "label": 0}) + "\n")
    with pytest.raises(errors.UserError, match="4 endings"):
        hellaswag_eval.load_examples(wrong)


# -----------------------------------------------------------------------------
# download: a local HTTP server that serves whatever body the test sets


@pytest.fixture
def server():
    state = dict(body=b"", requests=0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["requests"] += 1
            if self.path != "/hellaswag_val.jsonl":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(state["body"])))
            self.end_headers()
            self.wfile.write(state["body"])

        def log_message(self, *args):
            pass  # keep pytest output clean

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_and_refetches(server, tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy from the environment must not get these requests
    good = VAL.read_bytes()
    # The sample stands in for the official file (12 MB, not shipped): the pinned hash becomes the sample's,
    # so what is tested is the logic: verify, refuse, refetch.
    monkeypatch.setitem(hellaswag_eval.SHA256, "val", hashlib.sha256(good).hexdigest())
    cache = tmp_path / "cache"
    final = cache / "hellaswag_val.jsonl"

    def download():
        return hellaswag_eval.download("val", cache_dir=cache, base_url=server["url"])

    for bad in (good[: len(good) // 2], good[:100] + b"X" + good[101:]):  # truncated; one byte changed
        server["body"] = bad
        with pytest.raises(errors.UserError, match="corrupted or incomplete"):
            download()
        assert not cache.exists()  # nothing cached, no temp file left, not even the folder it made

    server["body"] = good
    assert download() == final
    assert hashlib.sha256(final.read_bytes()).hexdigest() == hellaswag_eval.SHA256["val"]
    n = server["requests"]
    assert download() == final and server["requests"] == n  # a good cached file: no request

    final.write_bytes(good[:-10])  # a partial file in the cache is detected and fetched again
    # and the half files of downloads that were killed (this version's name, and an earlier one's that named
    # the machine) are removed
    for name in ("0123456789ab", "a-machine.0123456789ab"):
        (cache / f"hellaswag_val.jsonl.{name}.tmp").write_bytes(good[:100])
    assert download() == final and server["requests"] == n + 1
    assert final.read_bytes() == good and list(cache.iterdir()) == [final]

    with pytest.raises(errors.UserError, match="could not download"):  # HTTP 404
        hellaswag_eval.download("train", cache_dir=cache, base_url=server["url"])


def test_a_second_download_waits_for_the_first_and_uses_its_file(server, tmp_path, monkeypatch, capsys):
    # several ranks or runs sharing one cache: one downloads, the others wait for the folder, then read its file
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    good = VAL.read_bytes()
    monkeypatch.setitem(hellaswag_eval.SHA256, "val", hashlib.sha256(good).hexdigest())
    server["body"], cache, got = good, tmp_path / "cache", []
    waiting, real_flock = threading.Event(), files.fcntl.flock

    def flock(fd, how):
        if not how & files.fcntl.LOCK_NB:
            waiting.set()  # the second downloader waits
        return real_flock(fd, how)
    monkeypatch.setattr(files.fcntl, "flock", flock)
    # the first download, in progress (flock locks belong to the open file: one process contends with itself)
    with files.DirLock(cache, "the HellaSwag cache", r"hellaswag_val\.jsonl"):
        second = threading.Thread(target=lambda: got.append(
            hellaswag_eval.download("val", cache_dir=cache, base_url=server["url"])))
        second.start()
        assert waiting.wait(timeout=60)
        (cache / "hellaswag_val.jsonl").write_bytes(good)  # the first one's file lands
    second.join(timeout=60)
    assert got == [cache / "hellaswag_val.jsonl"] and server["requests"] == 0
    assert capsys.readouterr().out == (f"{cache} is in use by another process (pid {os.getpid()} on host "
                                       f"{socket.gethostname()}); waiting for it\n")
    assert list(cache.iterdir()) == [cache / "hellaswag_val.jsonl"]


# -----------------------------------------------------------------------------
# command line


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "hellaswag.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_default_flags_reproduce_fp32_transformers(hf_dir, examples, reference):
    # The published scores were taken in full precision; with its default flags the scorer must make
    # exactly the choices of transformers' fp32 forward (bf16 autocast flipped 1 in 60 on this model).
    ref_total, ref_count = reference
    labels = torch.tensor([e["label"] for e in examples])
    r = run_cli("--model", hf_dir, "--data", VAL, "--limit", len(examples), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["dtype"] == "fp32" and out["n"] == len(examples) >= 100
    assert out["acc"] == (ref_total.argmin(1) == labels).sum().item() / len(examples)
    assert out["acc_norm"] == ((ref_total / ref_count).argmin(1) == labels).sum().item() / len(examples)


def test_default_dtype_makes_transformers_fp32_choices_example_by_example(ours, examples, enc, reference):
    ref_total, ref_count = reference
    dtype = hellaswag.parser().parse_args(["--model", "gpt2"]).dtype
    if dtype == "auto":
        dtype = "bf16" if runtime.cpu_has_bf16() else "fp32"
    rt = runtime.Runtime(False, 0, 0, 1, True, "cpu", "cpu", dtype)
    rendered = [hellaswag_eval.render_example(e, enc) for e in examples]
    total, count = hellaswag_eval.ending_losses(ours, rendered, batch_size=16, autocast=rt.autocast)
    assert torch.equal(total.argmin(1), ref_total.argmin(1))
    assert torch.equal((total / count).argmin(1), (ref_total / ref_count).argmin(1))


def test_cli_limit_and_batches_score_the_first_examples_as_transformers_does(hf_dir, examples, reference, tmp_path):
    # --limit 20 in batches of 7 (the last one short): the choices of transformers' fp32 forward on those 20,
    # where acc and acc_norm differ (5 and 7 right), so that swapping or merging them shows
    n = 20
    ref_total, ref_count = (t[:n] for t in reference)
    labels = torch.tensor([e["label"] for e in examples[:n]])
    acc = (ref_total.argmin(1) == labels).sum().item() / n
    acc_norm = ((ref_total / ref_count).argmin(1) == labels).sum().item() / n
    assert acc != acc_norm
    r = run_cli("--model", hf_dir, "--data", VAL, "--limit", n, "--device", "cpu", "--batch_size", 7)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] == n and out["examples_per_s"] > 0
    assert (out["acc"], out["acc_norm"]) == (acc, acc_norm)

    # each bad input: one line that names it, exit 2
    corrupted = tmp_path / "corrupted.jsonl"
    corrupted.write_bytes(VAL.read_bytes()[:3000])  # cut in the middle of a line
    for args, words in ((["--model", hf_dir, "--data", tmp_path / "missing.jsonl"], ["missing.jsonl"]),
                        (["--model", hf_dir, "--data", corrupted], ["corrupted.jsonl line", "not valid JSON"]),
                        (["--model", tmp_path / "no_such_model", "--data", VAL], ["no_such_model"])):
        r = run_cli(*args, "--device", "cpu")
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("error: ") and all(w in r.stderr for w in words), r.stderr


def test_the_download_cache_is_beside_the_program():
    # the official file is cached once per copy of the program, in .cache/hellaswag beside
    # train_gpt2.py (where earlier versions put it, and .gitignore ignores it), not inside plumbing/
    assert hellaswag_eval.CACHE_DIR == ROOT / ".cache" / "hellaswag"
