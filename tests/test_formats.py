"""Other programs' files: build-nanogpt's, nanoGPT's and llm.c's checkpoints and token shards, each written the
way its program writes it (facts in docs/coming-from.md), read by every
command, and checked against transformers' GPT-2 holding the same weights; and `evaluate`."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt2 as tg
from conftest import HELLASWAG, ROOT, run_cli
from plumbing import checkpoints, errors, formats, notebook, runtime, token_files

SHAPE = dict(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)  # build-nanogpt's padded vocab
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# build-nanogpt's train_gpt2.py: `@dataclass class GPTConfig` in the script itself, then
# torch.save({'model': raw_model.state_dict(), 'config': raw_model.config, 'step': step, 'val_loss': ...})
BUILD_NANOGPT = """
import sys
from dataclasses import dataclass
import torch

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

sd = torch.load(sys.argv[1], weights_only=True)
config = GPTConfig(**{k: int(v) for k, v in (a.split("=") for a in sys.argv[3:])})
torch.save({"model": sd, "config": config, "step": 100, "val_loss": 3.5}, sys.argv[2])
"""

# a hostile file that claims to be build-nanogpt's: its GPTConfig, unpickled, would create a marker file
HOSTILE_CONFIG = """
import sys
import torch

class GPTConfig:
    def __reduce__(self):
        return (open, (sys.argv[2], "w"))

torch.save({"model": {}, "config": GPTConfig(), "step": 1}, sys.argv[1])
"""


def hf_reference(shape, bias=True, seed=0):
    """transformers' GPT-2 with random weights: the independent model every format is checked against."""
    import transformers
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=shape["n_embd"], n_layer=shape["n_layer"], n_head=shape["n_head"], n_positions=shape["block_size"],
        vocab_size=shape["vocab_size"], resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        attn_implementation="eager")).eval()  # eager: it can return its attention weights
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)  # larger than init: the logits differ clearly from token to token
        if not bias:  # nanoGPT's bias=False: no biases in LayerNorm and Linear layers
            for name, p in hf.named_parameters():
                if name.endswith(".bias"):
                    p.zero_()
    return hf


def linear_layout(hf, bias=True):
    """The source program's state dict: GPT-2's names, nn.Linear's (out, in) weights, tied lm_head."""
    sd = {k: (v.t() if k.endswith(CONV1D) else v).contiguous().clone() for k, v in hf.state_dict().items()
          if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    return {k: v for k, v in sd.items() if bias or not k.endswith(".bias")}


def write_llmc(path, hf, shape, bf16):
    """An llm.c model file from its documented layout: 256 int32 header words, then wte (Vp, C), wpe, and each
    kind of layer tensor stacked over the layers, then ln_f; fp32 (version 3) or bf16 (version 5)."""
    sd, L = linear_layout(hf), shape["n_layer"]
    header = np.zeros(256, dtype="<i4")
    header[:8] = [20240326, 5 if bf16 else 3, shape["block_size"], 50257, L, shape["n_head"], shape["n_embd"], 50304]
    names = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
             "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
             "mlp.c_proj.bias"]
    wte = sd["transformer.wte.weight"].clone()
    wte[50257:] = 0  # llm.c pads the 50257-token table with zero rows
    tensors = [wte, sd["transformer.wpe.weight"]]
    tensors += [torch.stack([sd[f"transformer.h.{i}.{n}"] for i in range(L)]) for n in names]
    tensors += [sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]]
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for t in tensors:
            f.write((t.bfloat16().view(torch.int16) if bf16 else t.float()).numpy().tobytes())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each format written as its program writes it, with the reference model it must reproduce."""
    d = tmp_path_factory.mktemp("formats")
    hf, hf_nobias = hf_reference(SHAPE), hf_reference(SHAPE, bias=False, seed=1)
    torch.save(linear_layout(hf), d / "sd.pt")
    (d / "write_bng.py").write_text(BUILD_NANOGPT)
    out = subprocess.run([sys.executable, d / "write_bng.py", d / "sd.pt", d / "model_00100.pt",
                          *(f"{k}={v}" for k, v in SHAPE.items())], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # nanoGPT's train.py, compiled, bias=False: {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss',
    # 'config'}, every key of the state dict prefixed by torch.compile's `_orig_mod.`
    sd = {"_orig_mod." + k: v for k, v in linear_layout(hf_nobias, bias=False).items()}
    sd["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()  # its mask buffer, without flash
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 6e-4, "params": [0]}]},
                "model_args": dict(SHAPE, bias=False, dropout=0.0), "iter_num": 2000,
                "best_val_loss": torch.tensor(3.1), "config": {"max_iters": 600000, "warmup_iters": 2000,
                                                                "lr_decay_iters": 600000, "learning_rate": 6e-4,
                                                                "min_lr": 6e-5, "compile": True}},
               d / "ckpt.pt")
    hf_bf16 = hf_reference(SHAPE)
    with torch.no_grad():
        for p in hf_bf16.parameters():
            p.copy_(p.bfloat16().float())
    write_llmc(d / "gpt2_fp32.bin", hf, SHAPE, bf16=False)
    write_llmc(d / "model_00000500.bin", hf, SHAPE, bf16=True)
    refs = {"build-nanogpt": (d / "model_00100.pt", hf, 100), "nanoGPT": (d / "ckpt.pt", hf_nobias, 2000),
            "llm.c fp32": (d / "gpt2_fp32.bin", hf, None), "llm.c bf16": (d / "model_00000500.bin", hf_bf16, 500)}
    return d, refs


@pytest.mark.parametrize("fmt", ["build-nanogpt", "nanoGPT", "llm.c fp32", "llm.c bf16"])
def test_foreign_checkpoint_gives_the_source_models_logits(files, fmt):
    _, refs = files
    path, hf, step = refs[fmt]
    ckpt = checkpoints.load(str(path))
    assert ckpt["source"] == fmt.split()[0] and ckpt["step"] == step
    if fmt == "nanoGPT":  # what --init_from offers to continue its schedule, from its config
        assert formats.schedule_flags(ckpt).startswith("--max_lr 0.0006 --warmup_steps 2000 --max_steps 600000 "
                                               "--min_lr_ratio 0.1 ")
    model = tg.load_model(str(path)).eval()
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = model(idx)[0], hf(idx).logits
    assert ours.shape[-1] == 50304 and torch.isinf(ours[..., 50257:]).all()  # the padding is never a token
    diff = (ours[..., :50257] - ref[..., :50257]).abs().max().item()
    assert diff < 1e-4, diff


def test_hostile_pickle_posing_as_build_nanogpt_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "write.py").write_text(HOSTILE_CONFIG)
    out = subprocess.run([sys.executable, tmp_path / "write.py", tmp_path / "model_00001.pt", marker],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with pytest.raises(errors.UserError) as e:  # (the CLI's one line: test_train's test_hostile_pickle_...)
        tg.load_model(str(tmp_path / "model_00001.pt"))
    assert "not a valid checkpoint (it holds a pickled io.open" in str(e.value) and "delete" not in str(e.value)
    assert not marker.exists()


def test_unknown_files_one_line_never_advise_deleting(tmp_path):
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(3000))
    bad_llmc = np.zeros(256, dtype="<i4")
    bad_llmc[:2] = [20240326, 4]
    (tmp_path / "v4.bin").write_bytes(bad_llmc.tobytes())
    torch.save({"model": {}, "model_args": dict(SHAPE, vocab_size=65)}, tmp_path / "char.pt")  # shakespeare_char
    for name, words in (("noise.pt", "not a valid checkpoint"), ("v4.bin", "version 4"),
                        ("char.pt", "vocabulary of 65")):
        with pytest.raises(errors.UserError) as e:
            tg.load_model(str(tmp_path / name))
        assert words in str(e.value) and "delete" not in str(e.value) and "\n" not in str(e.value)


def hf_windows_loss(hf, tokens, T):
    """Reference: the mean next-token loss with windows of T + 1 tokens overlapping by one, by transformers."""
    losses = []
    with torch.no_grad():
        for i in range(0, len(tokens) - 1, T):
            w = torch.tensor(tokens[i: i + T + 1])[None]
            logits = hf(w[:, :-1]).logits[..., :50257]
            losses.append(F.cross_entropy(logits[0], w[0, 1:], reduction="none"))
    return torch.cat(losses)


def test_evaluate_build_nanogpt_checkpoint_on_a_text(files, tmp_path):
    d, refs = files
    path, hf, _ = refs["build-nanogpt"]
    text = "First Citizen:\nBefore we proceed any further, hear me speak. Ünïcödé bytes count as bytes.\n"
    (tmp_path / "t.txt").write_text(text)
    out = run_cli("train_gpt2.py", "evaluate", "--checkpoint", path, "--data", tmp_path / "t.txt", "--seq_len", "8",
                  "--batch_size", "2", "--per_token", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    tokens = enc.encode_ordinary(text)
    ref = hf_windows_loss(hf, tokens, 8)
    # the padded rows (50304 - 50257) are no tokens: our softmax leaves them out, so the reference does too
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["tokens"] == len(tokens) - 1
    assert abs(result["loss"] - ref.mean().item()) < 1e-4
    assert abs(result["perplexity"] - math.exp(ref.mean().item())) < 1e-2 * result["perplexity"]
    n_bytes = len(text.encode()) - len(enc.decode_single_token_bytes(tokens[0]))  # the first token has no loss
    assert abs(result["bits_per_byte"] - ref.sum().item() / math.log(2) / n_bytes) < 1e-4
    lines = out.stdout.splitlines()[:len(tokens)]
    assert lines[0].split()[0] == "-"
    assert [float(ln.split()[0]) for ln in lines[1:]] == pytest.approx(ref.tolist(), abs=2e-3)


def test_llmc_token_shards_load_as_data_and_bad_headers_are_refused(files, tmp_path):
    _, refs = files
    import tiktoken
    tokens = np.array(tiktoken.get_encoding("gpt2").encode_ordinary((ROOT / "input.txt").read_text()[:3000]),
                      dtype=np.uint16)
    d = tmp_path / "llmc"
    d.mkdir()
    for split, part in (("val", tokens[:300]), ("train", tokens[300:])):  # dev/data/data_common.py's layout
        header = np.zeros(256, dtype="<i4")
        header[:3] = [20240520, 1, len(part)]
        (d / f"tiny_{split}_000000.bin").write_bytes(header.tobytes() + part.tobytes())
    assert np.array_equal(token_files.load_split(str(d), "train")[0], tokens[300:])
    path, hf, _ = refs["llm.c fp32"]
    out = run_cli("train_gpt2.py", "evaluate", "--checkpoint", path, "--data", d, "--tokens", "200",
                  "--device", "cpu")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["tokens"] == 200
    assert abs(result["loss"] - hf_windows_loss(hf, tokens[:201].tolist(), 64).mean().item()) < 1e-4
    header = np.zeros(256, dtype="<i4")
    header[:3] = [20240801, 7, 10]  # llm.c's llama-3 shards: uint32 tokens
    (tmp_path / "l3_val_000000.bin").write_bytes(header.tobytes() + np.arange(10, dtype=np.uint32).tobytes())
    with pytest.raises(errors.UserError, match="not an llm.c GPT-2 token shard"):
        token_files.load_tokens(str(tmp_path / "l3_val_000000.bin"))


def test_nanogpt_data_dir_reads_as_its_train_py_reads_it(tmp_path):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    text = (ROOT / "input.txt").read_text()[:6000]
    d = tmp_path / "openwebtext"
    d.mkdir()
    (d / "input.txt").write_text(text)  # data/shakespeare/ keeps its text beside the .bin files
    ids = {}
    for split, part in (("train", text[:5000]), ("val", text[5000:])):
        # data/openwebtext/prepare.py: each document's ids, then eot, into np.memmap(..., 'w+')
        ids[split] = [i for doc in part.split("\n\n") for i in enc.encode_ordinary(doc) + [enc.eot_token]]
        arr = np.memmap(d / f"{split}.bin", dtype=np.uint16, mode="w+", shape=(len(ids[split]),))
        arr[:] = ids[split]
        arr.flush()
        del arr
    train, val = token_files.load_splits(str(d))
    assert [len(s) for s in train + val] == [len(ids["train"]), len(ids["val"])]
    assert val[0][:].tolist() == ids["val"]
    # nanoGPT's train.py get_batch, at the positions our unshuffled loader reads (consecutive blocks)
    data = np.memmap(d / "train.bin", dtype=np.uint16, mode="r")
    B, T = 4, 32
    loader = tg.DataLoader(train, B, T)
    for j in range(5):
        ix = [(j * B + r) * T for r in range(B)]
        x = torch.stack([torch.from_numpy((data[i:i + T]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + T]).astype(np.int64)) for i in ix])
        got = loader.next_batch()
        assert torch.equal(got[0], x) and torch.equal(got[1], y)

    header = np.zeros(256, dtype="<i4")  # an llm.c shard that happens to be named train.bin: still llm.c's
    header[:3] = [20240520, 1, 100]
    (tmp_path / "train.bin").write_bytes(header.tobytes() + np.array(ids["train"][:100], dtype=np.uint16).tobytes())
    assert token_files.load_tokens(str(tmp_path / "train.bin"))[:].tolist() == ids["train"][:100]
    for size in (0, 2 * 50 + 1):  # empty, truncated mid-token
        (d / "val.bin").write_bytes(bytes(size))
        with pytest.raises(errors.UserError, match=f"val.bin holds {size} bytes, .*run nanoGPT's prepare.py again"):
            token_files.load_splits(str(d))
    np.array([5, 50257], dtype=np.uint16).tofile(d / "val.bin")  # another tokenizer's ids
    with pytest.raises(errors.UserError, match="val.bin holds token id 50257"):
        token_files.load_splits(str(d))
    (d / "val.bin").unlink()
    with pytest.raises(errors.UserError, match="has no val shards"):
        token_files.load_splits(str(d))
    # data/shakespeare_char/prepare.py: its own character ids (all < 65, so the id check cannot tell) and meta.pkl
    import pickle
    chars = sorted(set(text))
    np.array([chars.index(c) for c in text], dtype=np.uint16).tofile(d / "train.bin")
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {}}, f)
    with pytest.raises(errors.UserError, match="train.bin has a meta.pkl beside it.*not GPT-2's BPE"):
        token_files.load_splits(str(d), ("train",))


def test_build_nanogpt_checkpoint_in_every_command(files, tmp_path):
    """sample, export (then read back by transformers), hellaswag.py and --init_from with --init_step."""
    d, refs = files
    path, hf, _ = refs["build-nanogpt"]
    # the three commands' real entry points in one process (one interpreter start instead of three)
    script = ("import sys, hellaswag, train_gpt2; a = sys.argv[1:]; "
              "train_gpt2.main(['sample', '--checkpoint', a[0], '--prompt', 'Hello', '--max_new_tokens', '4', "
              "'--num_samples', '1', '--device', 'cpu']); "
              "train_gpt2.main(['export', '--checkpoint', a[0], '--out', a[1]]); "
              "hellaswag.main(['--model', a[0], '--data', a[2], '--limit', '4', '--device', 'cpu']); "
              "train_gpt2.main(['evaluate', '--checkpoint', a[1], '--data', a[3], '--device', 'cpu'])")
    text = (ROOT / "input.txt").read_text()[:300]
    (tmp_path / "e.txt").write_text(text)
    out = run_cli("-c", script, path, tmp_path / "hf", HELLASWAG, tmp_path / "e.txt")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("--- sample") == 1 and f"wrote {tmp_path / 'hf'}" in out.stdout
    assert json.loads(out.stdout.splitlines()[-3])["n"] == 4  # hellaswag.py's result line
    # evaluate reads the exported Hugging Face directory too
    tokens = token_files.get_encoding().encode_ordinary(text)
    ref = hf_windows_loss(hf, tokens, 64).mean().item()
    assert abs(json.loads(out.stdout.splitlines()[-1])["loss"] - ref) < 1e-4
    import transformers
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (back(idx).logits - hf(idx).logits[..., :50257]).abs().max().item() < 1e-4
    log_dir = tmp_path / "cont"
    (tmp_path / "t.txt").write_text((ROOT / "input.txt").read_text()[:4000])
    out = run_cli("train_gpt2.py", "--init_from", path, "--init_step", "100", "--max_steps", "106",
                  "--warmup_steps", "10", "--data", tmp_path / "t.txt", "--log_dir", log_dir, "--batch_size", "2",
                  "--seq_len", "32", "--total_batch_size", "64", "--device", "cpu", "--compile", "off",
                  "--eval_every", "0", "--sample_every", "0", "--checkpoint_every", "0")
    assert out.returncode == 0, out.stderr
    assert "build-nanogpt checkpoint at step 100, with a new AdamW optimizer" in out.stdout
    assert "--init_step 100 with --max_lr 6e-4 --warmup_steps 715 --max_steps 19073" in out.stdout
    steps = [ln for ln in out.stdout.splitlines() if ln.startswith("step ")]
    assert [int(ln.split()[1]) for ln in steps] == list(range(100, 106))
    lrs = [float(ln.split("| lr ")[1].split()[0]) for ln in steps]
    assert lrs == pytest.approx([tg.get_lr(s, 6e-4, 10, 106) for s in range(100, 106)], rel=1e-4)  # its schedule
    assert all(" | ETA " in ln for ln in steps) and steps[-1].endswith("| ETA 0s")
    assert sum("steps left take about" in ln for ln in out.stdout.splitlines()) == 1
    assert (log_dir / "log.txt").read_text().splitlines()[0] == f"100 train {steps[0].split()[4]}"


def test_notebook_helpers_against_transformers(files):
    """top next tokens and one head's attention, against transformers' own softmax and output_attentions."""
    _, refs = files
    path, hf, _ = refs["build-nanogpt"]
    model = tg.load_model(str(path))
    enc = token_files.get_encoding()
    prompt = "The quick brown fox jumps over"
    idx = torch.tensor([enc.encode_ordinary(prompt)])
    with torch.no_grad():
        out = hf(idx, output_attentions=True)
    probs = out.logits[0, -1, :50257].softmax(-1)
    top = notebook.next_tokens(model, enc, prompt, k=5)
    assert [t for t, _ in top] == [enc.decode([int(i)]) for i in probs.topk(5).indices]
    assert [p for _, p in top] == pytest.approx(probs.topk(5).values.tolist(), abs=1e-5)
    tokens, att = notebook.attention_of_head(model, enc, prompt, layer=1, head=1)
    assert len(tokens) == idx.size(1) and (att - out.attentions[1][0, 1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("flags, words", [(["--tokens", "-1"], "--tokens must not be negative"),
                                          (["--batch_size", "0"], "--batch_size must be positive"),
                                          (["--data", "nowhere.txt"], "--data nowhere.txt does not exist")])
def test_evaluate_flags_are_checked_before_any_setup(flags, words, capsys, monkeypatch):
    monkeypatch.setattr(runtime, "setup", None)  # reached only after the checks: calling it fails
    with pytest.raises(SystemExit) as e:
        tg.main(["evaluate", "--checkpoint", "gpt2", "--data", str(ROOT / "input.txt"), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err
