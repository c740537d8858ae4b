"""Memory, measured: every CPU allocation and free of the loss path, from torch.profiler's memory events, against
the promises of the code and of `--batch_size auto`: an eager block of the loss holds at most 1.5 fp32 copies of
its (rows, V) logits; without gradients the loss allocates no gradient buffer; evaluation and HellaSwag at the
batch `--batch_size auto` chose fit the budget it chose it for."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import train_gpt2 as tg
from plumbing import chunked_loss, hellaswag_eval, memory, runtime, token_files, train_flags


def peak_bytes(fn):
    """(The most bytes allocated at once while fn() ran, above what was allocated when it started; fn's result),
    from the profiler's record of each allocation and free of the CPU allocator."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    live = peak = 0
    for e in prof.profiler.kineto_results.events():  # in the order they happened
        if e.name() == "[memory]":
            live += e.nbytes()  # negative for a free
            peak = max(peak, live)
    return peak, out


def test_peak_bytes_sees_a_tensor_freed_inside():
    def two_temporaries():
        a = torch.ones(1 << 20)  # 4 MiB
        b = a * 2  # 4 MiB more
        del a, b
        return torch.ones(1 << 18)  # 1 MiB
    peak, _ = peak_bytes(two_temporaries)
    assert 8 << 20 <= peak < 9 << 20, peak


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_eager_block_of_the_loss_holds_at_most_one_and_a_half_fp32_copies(dtype):
    """Forward (where the blocks are computed), eager: the peak above its inputs and its outputs (the gradients of x
    and of the weight it keeps for backward) is at most 1.5 fp32 (rows, V) blocks. Before the blocks were worked on
    in place (the masked, shifted, exponentiated, divided and one-hot copies of each) it was 7.25 (fp32) and
    6.25 (bf16). C is small next to rows, so that the (V, C) temporaries under autocast (the weight's 16-bit cast,
    the 16-bit product of its gradient and, on a CPU, its fp32 copy to be added) stay small next to a block."""
    torch.manual_seed(0)
    N, C, vocab, V, rows = 1024, 32, 4000, 4096, 512
    x = torch.randn(N, C, requires_grad=True)  # (N, C)
    w = (torch.randn(V, C) * 0.3).requires_grad_()  # (V, C)
    y = torch.randint(0, vocab, (N,))
    block = rows * V * 4  # one fp32 (rows, V) block: 8 MiB
    outputs = N * C * 4 + V * C * 4  # grad_x and grad_w, fp32, kept for backward
    weight_cast = V * C * 2 if dtype else 0  # autocast's 16-bit copy of the weight: an input, as the plain head's

    def forward():
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return chunked_loss.ChunkedCrossEntropy.apply(x, w, y, vocab, rows)
    peak, _ = peak_bytes(forward)
    copies = (peak - outputs - weight_cast) / block
    assert copies <= 1.5 + 0.05, copies  # the rest: (V, C) temporaries of 1/16 block, (rows, 1) vectors


def test_without_gradients_the_loss_allocates_no_gradient_buffer():
    """model(x, y) under no_grad and inference_mode (evaluation): the loss alone, in blocks. The gradient buffers
    the training path allocates, the weight's (V, C) fp32 and the hidden states' (N, C), are each larger here
    than all that evaluation needs at once (a block of 16 rows, the forward's transient activations)."""
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=64, vocab_size=8000, n_layer=2, n_head=2, n_embd=64)).eval()
    # blocks of 16 rows without gradients (0.5 MiB), NO_GRAD_BLOCK times the training blocks
    model.loss_block_bytes = 16 * 4 * model.config.padded_vocab_size // chunked_loss.NO_GRAD_BLOCK
    x, y = torch.randint(0, 8000, (4, 64)), torch.randint(0, 8000, (4, 64))
    gradient_buffers = model.config.padded_vocab_size * 64 * 4 + 256 * 64 * 4  # 2.06 MiB
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(x)[0][..., :8000].flatten(0, 1), y.flatten())
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            peak, (_, loss) = peak_bytes(lambda: model(x, y))
        assert peak < gradient_buffers, (mode, peak)
        assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()


def test_evaluation_and_hellaswag_at_the_auto_batch_fit_the_budget_it_was_chosen_for(monkeypatch, tiny_shards):
    """--batch_size auto on a CPU with a small budget (the RAM it is told is free): the batch it picks must fit
    evaluation (val loss) and HellaSwag's scoring as well as training. Their peaks are measured above the model's
    weights (already in memory when the estimate is made)."""
    import tiktoken

    from conftest import HELLASWAG
    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=64))
    T = 256
    free = 600 << 20
    monkeypatch.setattr(memory, "available_memory", lambda rt: free)
    rt = runtime.Runtime(False, 0, 0, 1, True, "cpu", "cpu", "bf16")
    cfg = train_flags.TrainConfig(seq_len=T, grad_checkpoint=0, compile="off", hellaswag_every=1)
    b = memory.auto_batch_size(model, cfg, rt)
    # the budget: the share of the RAM free (the weights already counted out of it), less AdamW's state (8 bytes a
    # parameter), which is there while evaluation runs in training but not here
    budget = memory.CPU_FREE_SHARE * free - 8 * model.num_params()
    assert 1 <= b < 64  # the budget binds: a larger one would not fit
    val = token_files.load_split(tiny_shards, "val")
    peak, _ = peak_bytes(lambda: tg.evaluate_loss(model, val, b * T, b, T, rt))
    assert peak < budget, (b, peak, budget)
    x = torch.randint(0, 50257, (b, T))

    def step():  # a training step at b, AdamW's state not yet there: its 8 bytes a parameter are in the budget
        with rt.autocast():
            loss = model(x, x)[1]
        loss.backward()
    peak, _ = peak_bytes(step)
    assert peak < budget, (b, peak, budget)
    model.zero_grad(set_to_none=True)
    enc = tiktoken.get_encoding("gpt2")
    examples = hellaswag_eval.load_examples(HELLASWAG, limit=2 * b)
    peak, _ = peak_bytes(lambda: tg.hellaswag_score(model, examples, enc, "cpu", b, rt.autocast))
    assert peak < budget, (b, peak, budget)
