"""The model is GPT-2: logits equal Hugging Face transformers' GPT2LMHeadModel on the same weights, in
every checkpoint layout; the KV cache changes no token; the pure pieces (schedule, batch arithmetic,
optimizer groups, data loader) against brute-force references."""
import copy
import functools
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt2 as tg
from conftest import ROOT
from plumbing import checkpoints, chunked_loss, errors, memory, runtime, token_files, train_flags

SHAPES = [  # (n_layer, n_head, n_embd, vocab_size, n_positions)
    (1, 1, 16, 50257, 64),
    (2, 4, 32, 1000, 128),
    (3, 2, 48, 777, 96),
]


def random_hf_model(n_layer, n_head, n_embd, vocab, n_pos, seed=0):
    """A random transformers GPT-2 with every parameter perturbed away from its init (biases and LayerNorm
    included), so a missed bias, transpose or tie shows up in the logits."""
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab,
                                  n_positions=n_pos, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def save_layout(hf, path, layout):
    """Saves hf as real checkpoints come: save_pretrained's safetensors, the old pytorch_model.bin with
    causal-mask buffers and no 'transformer.' prefix, or one with an explicit lm_head.weight."""
    from safetensors.torch import save_file
    path.mkdir()
    if layout == "save_pretrained":
        hf.save_pretrained(path)
        return
    hf.config.to_json_file(path / "config.json")
    sd = {k: v.clone().contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    T = hf.config.n_positions
    if layout == "bin_no_prefix_with_buffers":
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        for i in range(hf.config.n_layer):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(sd, path / "pytorch_model.bin")
    elif layout == "safetensors_with_lm_head":
        sd["lm_head.weight"] = hf.lm_head.weight.detach().clone()
        save_file(sd, path / "model.safetensors")
    else:
        raise ValueError(layout)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["save_pretrained", "bin_no_prefix_with_buffers", "safetensors_with_lm_head"])
def test_from_pretrained_logits_equal_transformers(tmp_path, shape, layout):
    hf = random_hf_model(*shape)
    save_layout(hf, tmp_path / "ckpt", layout)
    ours = tg.GPT.from_pretrained(str(tmp_path / "ckpt")).eval()
    vocab, n_pos = shape[3], shape[4]
    idx = torch.randint(0, vocab, (2, n_pos), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        logits, _ = ours(idx)
    assert logits.shape[-1] % 128 == 0 and logits.shape[-1] >= vocab
    diff = (logits[..., :vocab] - ref).abs().max().item()
    assert diff < 1e-4, diff
    assert torch.isneginf(logits[..., vocab:]).all()  # the padded rows can never win


def test_loss_is_cross_entropy_of_the_real_vocab():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=32, vocab_size=100, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 100, (3, 32))
    tgt = torch.randint(0, 100, (3, 32))
    logits, _ = model(idx)
    no_logits, loss = model(idx, tgt)
    assert no_logits is None  # the loss never builds them
    ref = torch.nn.functional.cross_entropy(logits[..., :100].reshape(-1, 100), tgt.view(-1))
    assert abs(loss.item() - ref.item()) < 1e-6


def plain_loss(x, w, y, vocab):
    """What the chunked loss replaces: all the logits, then F.cross_entropy over the real vocab."""
    return torch.nn.functional.cross_entropy((x @ w.t())[:, :vocab].float(), y)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# fp32: the two ways sum in different orders, and a CPU's BLAS picks its kernels (and so its order) by CPU model:
# 1.04e-6 on a Xeon with AMX where an AMD EPYC gave less; a wrong gradient (the padding counted, a block twice)
# is off by 1e-2 or more
@pytest.mark.parametrize("dtype,tol", [(None, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("rows", [1000, 40])  # one block; blocks with a shorter last one (96 = 40 + 40 + 16)
def test_chunked_loss_and_gradients_equal_the_plain_computation(dtype, tol, rows):
    """Loss and gradients against F.cross_entropy over the full logits, in fp32 and under autocast, with
    the backward scaled as gradient accumulation (1/grad_accum) and the fp16 GradScaler (2**16) scale it."""
    torch.manual_seed(0)
    vocab, padded = 250, 256
    x = torch.randn(96, 32, requires_grad=True)  # (N, C)
    w = (torch.randn(padded, 32) * 0.3).requires_grad_()  # (V, C), rows 250.. are padding
    y = torch.randint(0, vocab, (96,))
    grad_scale = 2.0 ** 16 / 4 if dtype == torch.float16 else 1 / 4
    out = []
    for fn in (plain_loss, lambda x, w, y, v: chunked_loss.ChunkedCrossEntropy.apply(x, w, y, v, rows)):
        x.grad = w.grad = None
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = fn(x, w, y, vocab)
        (loss * grad_scale).backward()
        out.append((loss.item(), x.grad.clone(), w.grad.clone()))
    (ref, gx_ref, gw_ref), (loss, gx, gw) = out
    assert abs(loss - ref) < 1e-6 * ref if dtype is None else abs(loss - ref) < 1e-5 * ref
    assert rel_err(gx, gx_ref) < tol and rel_err(gw, gw_ref) < tol
    assert gw[vocab:].abs().max() == 0  # the padding rows get no gradient: they never count


def small_model(n_layer=2):
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=32, vocab_size=300, n_layer=n_layer, n_head=2, n_embd=32))
    model.loss_block_bytes = 16 * 4 * 384  # 16 rows of the 384 padded columns: 60 rows in 16 + 16 + 16 + 12
    return model


def compiled_for_training(model):
    """The model as training compiles it (--compile on, one process)."""
    rt = runtime.Runtime(False, 0, 0, 1, True, "cpu", "cpu", "bf16")
    return tg.wrap_model(model, SimpleNamespace(fsdp=0), rt, True)


def test_chunked_loss_in_the_model_gives_the_plain_gradients_compiled_too():
    """The whole model, tied wte/lm_head included: the gradient of the shared matrix adds the output
    layer's part to the embedding's, as the plain head + F.cross_entropy does; also under torch.compile of the
    whole model, and compiled as training compiles it (a block at a time)."""
    model = small_model()
    idx, tgt = torch.randint(0, 300, (3, 20)), torch.randint(0, 300, (3, 20))
    blockwise = compiled_for_training(copy.deepcopy(model))

    def plain(idx, tgt):
        return torch.nn.functional.cross_entropy(model.head(model.features(idx)).float().flatten(0, 1), tgt.flatten())
    grads = []
    for m, fn in ((model, plain), (model, lambda idx, tgt: model(idx, tgt)[1]),
                  (model, torch.compile(lambda idx, tgt: model(idx, tgt)[1])),
                  (blockwise, lambda idx, tgt: blockwise(idx, tgt)[1])):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(idx, tgt)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in m.parameters()]))
    for loss, g in grads[1:]:
        assert abs(loss - grads[0][0]) < 1e-5
        assert all(rel_err(a, b) < 1e-2 for a, b in zip(g, grads[0][1]))


def test_training_compiles_a_block_at_a_time_whatever_the_depth():
    """--compile: Dynamo captures as many operations for 3 layers as for 1 (one graph that every block reuses,
    one for a block of the loss), where compiling the model whole captures each layer again."""
    from torch._dynamo.utils import counters
    captured = []
    for n_layer in (1, 3):
        torch._dynamo.reset()
        counters.clear()
        model = compiled_for_training(small_model(n_layer))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randint(0, 300, (3, 20)), torch.randint(0, 300, (3, 20)))[1].backward()
        captured.append(counters["stats"]["calls_captured"])
    assert captured[0] == captured[1] > 0, captured


def test_gpt2_124m_shape_and_init():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(**tg.PRESETS["gpt2"]))
    # 124,439,808: OpenAI GPT-2 small's count; padding the vocab to 50304 adds 47 * 768
    assert model.num_params() == 124_439_808 + (50304 - 50257) * 768
    assert model.transformer.wte.weight is model.lm_head.weight
    proj = model.transformer.h[0].attn.c_proj.weight
    assert abs(proj.std().item() - 0.02 / math.sqrt(2 * 12)) < 2e-4
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 2e-4
    names = {n for n, _ in model.named_parameters()}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
            "transformer.h.0.attn.c_proj.bias", "transformer.h.11.mlp.c_fc.weight", "transformer.ln_f.weight"} <= names


@pytest.mark.parametrize("block_size,prompt_len,new", [(64, 5, 40), (24, 10, 30)])
def test_kv_cache_gives_the_tokens_of_full_recomputation(block_size, prompt_len, new):
    """Greedy decoding with and without the cache, also past the block size (24 < 10 + 30)."""
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=block_size, vocab_size=300, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 300, (3, prompt_len))
    fast = tg.generate(model, idx, new, temperature=0, use_cache=True)
    slow = tg.generate(model, idx, new, temperature=0, use_cache=False)
    assert fast.shape == (3, prompt_len + new)
    assert torch.equal(fast, slow)


def test_sampling_respects_top_k_and_seed():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=32, vocab_size=300, n_layer=1, n_head=2, n_embd=32))
    idx = torch.zeros(1, 1, dtype=torch.long)
    logits, _ = model(idx)
    allowed = set(torch.topk(logits[0, -1], 3).indices.tolist())
    outs = [tg.generate(model, idx, 1, top_k=3, generator=torch.Generator().manual_seed(s))[0, 1].item()
            for s in range(30)]
    assert set(outs) <= allowed and len(set(outs)) > 1
    a = tg.generate(model, idx, 8, generator=torch.Generator().manual_seed(5))
    b = tg.generate(model, idx, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_get_lr_matches_the_formula():
    max_lr, warm, total = 6e-4, 10, 100
    lrs = [tg.get_lr(s, max_lr, warm, total) for s in range(total + 5)]
    assert lrs[0] == pytest.approx(max_lr / warm) and lrs[warm - 1] == pytest.approx(max_lr)
    assert all(b > a for a, b in zip(lrs[:warm], lrs[1:warm]))  # warmup rises linearly
    assert all(b <= a for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # then only decays
    for s in range(warm, total):  # cosine from max_lr to 0.1 * max_lr
        ref = 0.1 * max_lr + 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))) * 0.9 * max_lr
        assert lrs[s] == pytest.approx(ref)
    assert lrs[total] == pytest.approx(0.1 * max_lr) and lrs[-1] == pytest.approx(0.1 * max_lr)
    assert tg.get_lr(55, max_lr, warm, total) == pytest.approx(0.55 * max_lr)  # halfway: the mean


def test_grad_accum_arithmetic():
    assert tg.grad_accum_steps(524288, 16, 1024, 1) == 32
    assert tg.grad_accum_steps(524288, 64, 1024, 8) == 1
    with pytest.raises(errors.UserError, match="--total_batch_size"):
        tg.grad_accum_steps(524288, 12, 1024, 1)


def test_weight_decay_only_on_matrices():
    model = tg.GPT(tg.GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=16))
    opt = tg.configure_optimizer(model, 1e-3, 0.1, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def make_shards(dirpath, sizes, prefix="edufineweb"):
    """build-nanogpt's layout: np.save of uint16 arrays, shard 0 is val."""
    dirpath.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = []
    for i, n in enumerate(sizes):
        a = rng.integers(0, 50257, n, dtype=np.uint16)
        np.save(dirpath / f"{prefix}_{'val' if i == 0 else 'train'}_{i:06d}.npy", a)
        arrays.append(a)
    return arrays


def test_shards_load_in_numeric_order(tmp_path):
    arrays = make_shards(tmp_path / "d", [100, 50, 60, 70])
    (tmp_path / "d" / "edufineweb_train_000001.npy").rename(tmp_path / "d" / "edufineweb_train_1.npy")
    np.save(tmp_path / "d" / "edufineweb_train_10.npy", arrays[3])  # "10" sorts after "3" by number
    (tmp_path / "d" / "edufineweb_train_000003.npy").unlink()
    train = token_files.load_split(str(tmp_path / "d"), "train")
    assert [len(a) for a in train] == [50, 60, 70]
    assert np.array_equal(train[0], arrays[1]) and np.array_equal(token_files.load_split(str(tmp_path / "d"), "val")[0], arrays[0])


def test_text_file_split_and_tokens(small_text):
    import tiktoken
    ref = tiktoken.get_encoding("gpt2").encode_ordinary(small_text.read_text())
    train, val = token_files.load_split(str(small_text), "train")[0], token_files.load_split(str(small_text), "val")[0]
    assert list(train) + list(val) == ref and len(val) == len(ref) // 10


def test_loader_ranks_see_the_micro_batches_of_one_process():
    """N ranks x A accumulation steps == 1 process x N*A, batch for batch, across shard boundaries."""
    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 50257, n, dtype=np.uint16) for n in (300, 200, 250)]
    B, T, N, A = 2, 16, 2, 3
    # brute force: the stream of (B*T+1)-token windows, a window that does not fit starts the next shard
    windows, s, p = [], 0, 0
    for _ in range(60):
        if p + B * T + 1 > len(shards[s]):
            s, p = (s + 1) % len(shards), 0
        windows.append(shards[s][p: p + B * T + 1].astype(np.int64))
        p += B * T
    one = tg.DataLoader(shards, B, T)
    ranks = [tg.DataLoader(shards, B, T, rank=r, world_size=N) for r in range(N)]
    for step in range(10):
        single = [one.next_batch() for _ in range(N * A)]
        multi = [None] * (N * A)
        for a in range(A):
            for r in range(N):
                multi[a * N + r] = ranks[r].next_batch()
        for j, ((x1, y1), (x2, y2)) in enumerate(zip(single, multi)):
            w = windows[step * N * A + j]
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
            assert np.array_equal(x1.flatten().numpy(), w[:-1]) and np.array_equal(y1.flatten().numpy(), w[1:])
        assert one.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()


def test_val_batches_are_split_over_ranks_without_loss_or_overlap():
    tokens = np.arange(1000, dtype=np.uint16)
    full = [x for x, _ in token_files.val_batches([tokens], 500, 3, 16, SimpleNamespace(rank=0, world_size=1))]
    parts = [x for r in range(3) for x, _ in token_files.val_batches([tokens], 500, 3, 16, SimpleNamespace(rank=r, world_size=3))]
    rows = lambda xs: sorted(map(tuple, torch.cat(xs).tolist()))  # noqa: E731
    assert rows(full) == rows(parts) and len(rows(full)) == 500 // 16


def test_import_has_no_side_effects():
    code = ("import sys, torch, torch.distributed as dist; import train_gpt2; "
            "assert 'tiktoken' not in sys.modules and 'transformers' not in sys.modules; "
            "assert 'matplotlib' not in sys.modules and 'hellaswag' not in sys.modules; "
            "assert not dist.is_initialized() and not torch.cuda.is_initialized()")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out.stderr


def test_checkpoint_config_is_plain_json(tmp_path):
    model = tg.GPT(tg.GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=1, n_embd=8))
    opt = tg.configure_optimizer(model, 1e-3, 0.1, "cpu")
    loader = tg.DataLoader([np.arange(100, dtype=np.uint16)], 2, 8)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    checkpoints.save(str(tmp_path / "model_00001.pt"), model, opt, scaler, 1, loader, train_flags.TrainConfig())
    ckpt = torch.load(tmp_path / "model_00001.pt", weights_only=True)
    json.dumps(ckpt["config"]) and json.dumps(ckpt["train_config"])
    assert {"model", "optimizer", "config", "step", "loader", "rng", "scaler"} <= ckpt.keys()
    assert [p.name for p in tmp_path.iterdir()] == ["model_00001.pt"]  # no temporary left behind
    again = tg.load_model(str(tmp_path / "model_00001.pt"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_grad_checkpoint_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=32, vocab_size=200, n_layer=3, n_head=2, n_embd=32))
    idx = torch.randint(0, 200, (2, 32))
    grads = []
    for ckpt in (False, True):
        model.grad_checkpoint = ckpt
        model.zero_grad()
        _, loss = model(idx, idx)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == grads[1][0]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_pick_batch_size_takes_the_largest_divisor_that_fits():
    assert memory.pick_batch_size(512, lambda b: b <= 20) == 16  # the largest divisor of 512 that fits
    assert memory.pick_batch_size(48, lambda b: b <= 30) == 24
    assert memory.pick_batch_size(1000, lambda b: True) == 50  # at most 64, and a divisor
    with pytest.raises(errors.UserError, match="--grad_checkpoint"):
        memory.pick_batch_size(8, lambda b: False)


def test_activation_memory_estimate_matches_the_measured_growth():
    """The formula against what autograd really keeps: the bytes saved for backward per extra token."""
    config = tg.GPTConfig(block_size=256, vocab_size=50257, n_layer=2, n_head=4, n_embd=128)
    model = tg.GPT(config)

    def saved_bytes(b):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            x = torch.randint(0, 50257, (b, 256))
            _, loss = model(x, x)
        return total
    per_token = (saved_bytes(4) - saved_bytes(2)) / (2 * 256)
    estimate = memory.activation_bytes_per_token(config, "bf16")
    assert 0.5 * estimate < per_token < 1.5 * estimate, (per_token, estimate)


def test_dropout_is_off_by_default_and_active_only_in_training():
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=32, vocab_size=200, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 200, (2, 32))
    rng = torch.get_rng_state()
    plain = model(idx, idx)[1]
    assert torch.equal(rng, torch.get_rng_state())  # dropout 0 draws no random numbers
    model.dropout = 0.1
    dropped = [model(idx, idx)[1] for _ in range(2)]
    assert dropped[0] != plain and dropped[0] != dropped[1]
    model.eval()
    assert torch.equal(model(idx)[0], tg.GPT.head(model, model.features(idx)))
    model.train()
    model.grad_checkpoint = True  # the recomputed blocks see the same masks: the loss is the same
    torch.manual_seed(1)
    a = model(idx, idx)[1]
    a.backward()
    torch.manual_seed(1)
    model.grad_checkpoint = False
    assert model(idx, idx)[1] == a


def test_loss_blocks_are_sized_by_bytes_and_stay_at_most_32(monkeypatch):
    """The loss's block size: the largest power of two of rows whose fp32 logits fit in the byte budget, and never
    more than 32 blocks (compiled, the loop over the blocks is unrolled). On a CPU 64 MiB: 256 rows at GPT-2's
    vocabulary at any width; on a GPU 1/64 of its memory, at most 1 GiB."""
    @functools.cache  # one model of each shape (a 768-wide one takes seconds to build)
    def rows(C, vocab=50257):
        return tg.GPT(tg.GPTConfig(block_size=64, vocab_size=vocab, n_layer=1, n_head=1, n_embd=C)).loss_block_rows
    assert rows(64)(2048) == rows(768)(2048) == rows(768)(256) == 256
    assert rows(768)(100) == 100  # a small batch is one block
    assert rows(768)(64 * 1024) == 2048  # a micro-batch of 64 x 1024: 32 blocks
    assert rows(64)(10 ** 6) * 32 >= 10 ** 6
    assert rows(64, vocab=1000)(10 ** 5) == 16384  # 64 MiB of 1024-column rows: 16,384
    for x in (1, 255, 257, 10 ** 5):  # brute force: the largest power of two that fits, unless 32 blocks need more
        fits = max(r for r in (2 ** k for k in range(20)) if r * 4 * 50304 <= 64 << 20)
        assert rows(768)(x) == min(x, max(fits, -(-x // 32)))

    class Props:
        total_memory = None
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    for card_gb, expected in ((4, 256), (24, 1024), (80, 4096), (141, 4096)):
        Props.total_memory = card_gb * 10 ** 9
        assert rows(768)(64 * 1024, "cuda") == max(expected, 2048), card_gb
        assert rows(768)(10 ** 6, "cuda") * 32 >= 10 ** 6


def test_a_16_bit_weights_gradient_is_summed_in_fp32():
    """Under FSDP's bf16 policy the tied weight itself is bf16: its gradient, a sum over 16 blocks, is summed in
    fp32 and rounded once, against the fp64 gradient of the same bf16 inputs. Rounding the exact gradient to bf16
    alone is 2.4e-3 here (the floor); fp32 sums of the blocks' bf16 products 4.6e-3; bf16 sums were 9.0e-3."""
    torch.manual_seed(0)
    N, C, vocab, V, rows = 4096, 64, 1000, 1024, 256
    x = torch.randn(N, C).bfloat16().requires_grad_()  # (N, C)
    w = (torch.randn(V, C) * 0.3).bfloat16().requires_grad_()  # (V, C)
    y = torch.randint(0, vocab, (N,))
    chunked_loss.ChunkedCrossEntropy.apply(x, w, y, vocab, rows).backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy((x64 @ w64.t())[:, :vocab], y).backward()
    assert w.grad.dtype == torch.bfloat16
    assert rel_err(w.grad.double(), w64.grad) < 6e-3


# ---- Muon (--optimizer muon) ----

BLOCK_SHAPES = [(96, 32), (32, 32), (128, 32), (32, 128)]  # c_attn, attn.c_proj, c_fc, mlp.c_proj at C=32


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon is in PyTorch 2.9 and later")
def test_muon_steps_are_torch_optim_muons_bit_for_bit():
    # bf16 Newton-Schulz, as torch.optim.Muon always runs it (nesterov, 5 steps, lr * sqrt(max(1, rows/cols)))
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in BLOCK_SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = tg.Muon(ours, lr=0.02, momentum=0.95, weight_decay=0.1, ns_dtype=torch.bfloat16)
    b = torch.optim.Muon(theirs, lr=0.02, momentum=0.95, weight_decay=0.1)
    for _ in range(4):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


def test_muon_in_fp32_is_the_newton_schulz_iteration_and_nearly_orthogonal():
    # the fp32 path (old GPUs, AVX2 CPUs) against Jordan's quintic iteration written out in float64
    torch.manual_seed(0)
    for shape in BLOCK_SHAPES:
        g = torch.randn(shape)
        x = g.double().T if shape[0] > shape[1] else g.double()
        x = x / x.norm()
        for _ in range(5):
            a = x @ x.T
            x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
        reference = x.T if shape[0] > shape[1] else x
        ours = tg.orthogonalize(g, torch.float32)
        assert ours.dtype == torch.float32 and torch.allclose(ours.double(), reference, atol=1e-5)
        # what it is for: every singular value near 1 (U V^T), not the gradient's spread of them
        s = torch.linalg.svdvals(ours.double())
        assert 0.5 < s.min() and s.max() < 1.25, s


def test_muon_takes_the_blocks_matrices_and_adamw_all_the_rest():
    model = tg.GPT(tg.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    opt = tg.configure_optimizer(model, 1e-3, 0.1, "cpu", dict(lr=0.02, momentum=0.95, ns_dtype=torch.float32))
    names = {id(p): n for n, p in model.named_parameters()}  # the tied lm_head is transformer.wte
    muon = [names[id(p)] for g in opt.parts["muon"].param_groups for p in g["params"]]
    adamw = [names[id(p)] for g in opt.parts["adamw"].param_groups for p in g["params"]]
    assert sorted(muon) == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2)
                                  for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert sorted(adamw + muon) == sorted(names.values())
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.param_groups[2]["lr_ratio"] == 0.02 / 1e-3
