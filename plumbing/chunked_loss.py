"""
The loss of the output layer: the cross-entropy of x @ weight.T against the targets, computed a
block of rows at a time, so that the (N, 50304) logits, the largest tensors of training, never exist
whole. It equals F.cross_entropy((x @ weight.T)[:, :vocab_size].float(), targets), to which
tests/test_model.py holds it; docs/speed-and-memory.md gives its memory and speed."""

import functools

import torch
import torch.nn.functional as F

from plumbing import runtime

# Without gradients a block of the loss holds 2.5 fp32 copies of its logits at most, where one with
# gradients holds 1.5; but the loss alone is one matmul and one pass over the logits, and on a CPU
# its matmul runs at full speed only in larger blocks: there evaluation's blocks take this many
# times the training budget (python bench/bench_train.py --only eval). A GPU's blocks are large
# enough for both.
NO_GRAD_BLOCK = 4


def loss_block_budget(device, grad=True, base=None):
    """Bytes of fp32 logits one block of the loss may hold (an eager block holds 1.5 times that at
    most). On a CPU (and MPS) 64 MiB: 256 rows at GPT-2's vocabulary, from which the loss runs at
    full speed (`python bench/bench_train.py --only blocks` times each block size), NO_GRAD_BLOCK
    times that on a CPU without gradients. On a GPU, where launches matter more, 1/64 of its memory,
    at most 1 GiB: 4096 rows on an 80-141 GB card (1.04x the plain loss's speed on an H200 where 256
    rows were 0.90x), 1024 on a 24 GB one, 256 on a 4 GB GTX 960. base: the training budget instead
    of the device's (GPT.loss_block_bytes)."""
    if base is None:
        base = (min(1 << 30, torch.cuda.get_device_properties(device).total_memory // 64)
                if device.type == "cuda" else 64 << 20)
    return base * (NO_GRAD_BLOCK if not grad and device.type == "cpu" else 1)


def block_rows(n, padded_vocab, device, grad=True, base=None):
    """Rows per block of the loss for n rows in all (GPT.loss_block_rows): the largest power of
    two whose fp32 logits fit in the block's byte budget (loss_block_budget, larger without
    gradients), and at most 32 blocks (each block is a dozen launches, or a compiled call; a model
    compiled whole unrolls the loop over the blocks)."""
    budget = loss_block_budget(device, grad, base)
    rows = 1 << max(0, int(budget // (4 * padded_vocab)).bit_length() - 1)  # 2**floor(log2)
    return max(1, min(n, max(rows, -(-n // 32))))


def cross_entropy(x, weight, targets, vocab_size, rows, compiled=False):
    """Mean cross-entropy of the logits x @ weight.T against targets, over the first vocab_size
    columns, `rows` rows at a time: F.cross_entropy((x @ weight.T)[:, :vocab_size].float(), targets)
    without ever holding all the logits. With gradients it is ChunkedCrossEntropy (compiled: each
    block's pointwise work by one compiled function); without (evaluation) only the loss
    (token_losses): no gradient buffer."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        if x.device.type == "cpu" and runtime.autocast_dtype("cpu", weight.dtype) == torch.float32:
            # fp32 on a CPU: see below
            return eager_chunked_cross_entropy(x, weight, targets, vocab_size, rows)
        return ChunkedCrossEntropy.apply(x, weight, targets, vocab_size, rows, compiled)
    return token_losses(x, weight, targets, vocab_size, rows).sum() / x.size(0)


@torch.compiler.disable
def eager_chunked_cross_entropy(x, weight, targets, vocab_size, rows):
    """ChunkedCrossEntropy, eager even when compiled. Why: fp32 on a CPU fuses no cast, and the
    compiled block copied the (V, C) gradient at each accumulation (quickstart step 834 -> 760 ms,
    AVX2); bf16 stays compiled (eager 1.6x)."""
    return ChunkedCrossEntropy.apply(x, weight, targets, vocab_size, rows)


def token_losses(x, weight, targets, vocab_size, rows):
    """The cross-entropy of each row (N,), fp32, without gradients: the plain way (the logits in
    fp32, the padding columns -inf, F.cross_entropy), `rows` rows at a time. A block holds its
    logits in fp32 and their log-softmax: 2 fp32 copies (a slice of the real vocabulary instead of
    the mask would be copied again: 3)."""
    # (V, C), cast once, not in every block
    weight = weight.to(runtime.autocast_dtype(x.device.type, weight.dtype))
    losses = []
    for i in range(0, x.size(0), rows):
        # (n, V) fp32: in fp32 the product itself, in 16-bit its copy
        z = (x[i: i + rows] @ weight.t()).float()
        z[:, vocab_size:] = float("-inf")  # padding never counts
        losses.append(F.cross_entropy(z, targets[i: i + rows], reduction="none"))  # (n,)
    return torch.cat(losses) if losses else torch.zeros(0, device=x.device)


def exp_logits(xi, weight, yi, vocab_size):
    """One block of the loss with gradients: e = exp(logits - their row max), fp32 (n, V), with the
    padding columns 0; each row's loss (n,); and the rows' sums of e, s (n, 1). In place: one fp32
    (n, V) tensor holds the logits, then z - max, then e (the logits' own when they are fp32), so a
    block holds 1.5 fp32 copies at most."""
    # (n, V) fp32: the softmax is always taken in fp32 (under autocast a copy of the 16-bit
    # product, freed at once)
    z = (xi @ weight.t()).float()
    # padding never counts. Compiled: a mask fused into the block's one pass, on an int32 column
    # index (an int64 one costs twice the vector work: bf16 loss path 243 -> 201 ms). Eager: only
    # the padding columns are written.
    if torch.compiler.is_compiling():
        z.masked_fill_(torch.arange(z.size(1), dtype=torch.int32, device=z.device) >= vocab_size,
                       float("-inf"))
    else:
        z[:, vocab_size:] = float("-inf")
    # softmax(z) = e / sum(e) with e = exp(z - max): subtracting the max keeps exp from overflowing.
    # Each exp is taken once and e reused (on a CPU exp is the costliest step after the matmuls).
    m = z.amax(dim=1, keepdim=True)  # (n, 1)
    # loss of a row = -log softmax(z)[target] = log(s) + max - z[target]
    target = z.gather(1, yi)  # (n, 1)
    s = z.sub_(m).exp_().sum(dim=1, keepdim=True)  # z is now e; s (n, 1)
    return z, (s.log() + m - target).squeeze(1), s


def block_gradient(xi, weight, yi, vocab_size, dtype):
    """One block of the loss with gradients: the sum of its rows' losses, and the gradient of those
    losses with respect to the block's logits, g = softmax - one_hot(target) (n, V), in dtype (the
    matmuls'). Not yet divided by N: in fp16, p / N would underflow to 0 where the plain way
    multiplies by the loss scale first."""
    e, row_losses, s = exp_logits(xi, weight, yi, vocab_size)
    e *= s.reciprocal()  # (n, V) p = softmax
    # pointwise: fused with the cast, no fp32 (n, V) is written
    if torch.compiler.is_compiling():
        # int32: half the lanes of int64
        cols = torch.arange(e.size(1), dtype=torch.int32, device=e.device)
        return row_losses.sum(), torch.where(cols == yi.int(), e - 1, e).to(dtype)  # (n, V)
    # eager: in place (a pointwise op would allocate a mask and, on a CPU, its fp32 copy); e is
    # freed on return: a 16-bit g leaves 0.5 fp32 copies of the block during the matmuls
    g = e.scatter_add_(1, yi, torch.full(yi.shape, -1.0, device=e.device))
    return row_losses.sum(), g.to(dtype)


@functools.cache
def compiled_block_gradient():
    """block_gradient compiled once (per process) and called for every block: compiling the model
    whole would unroll the loop over the blocks into its graph, and take twice as long to compile
    (docs/speed-and-memory.md)."""
    return torch.compile(block_gradient)


class ChunkedCrossEntropy(torch.autograd.Function):
    """cross_entropy with gradients. Why: the (N, 50304) logits are the largest tensors of
    training: the plain way keeps them, in 16 and 32 bits, until backward, and then writes their
    gradient too. Here forward takes `rows` rows at a time and computes the block's loss and, at
    once, its share of the gradients of x and weight; so no logits outlive their block, and backward
    only scales the gradients by the incoming one (1/grad_accum, the fp16 loss scale). The same
    matmuls and casts as the plain way, no recomputation. A block is worked on in place
    (exp_logits), which autograd allows here: nothing inside a Function is recorded. Eager, a block
    holds at most 1.5 fp32 (rows, V) copies (1 in fp32), plus under autocast one 16-bit (V, C)
    product; compiled, the compiler plans the buffers (tests/test_model.py measures both)."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, rows, compiled=False):  # (N, C), (V, C), (N,)
        loss = torch.zeros((), device=x.device)
        grad_x = torch.empty_like(x)  # (N, C)
        # The weight's gradient sums over all N rows: in fp32 whatever the weight's dtype (bf16
        # under FSDP's policy), as a 16-bit sum of many blocks would lose the small ones.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # (V, C)
        dtype = runtime.autocast_dtype(x.device.type, weight.dtype)  # the matmuls' dtype
        block = compiled_block_gradient() if compiled else block_gradient
        for i in range(0, x.size(0), rows):
            xi, yi = x[i: i + rows], targets[i: i + rows, None]  # (n, C), (n, 1)
            # d(loss of a row)/d(its logits) = softmax - one_hot(target): g (n, V)
            row_losses, g = block(xi, weight, yi, vocab_size, dtype)
            loss = loss + row_losses
            grad_x[i: i + rows] = g @ weight  # (n, C)
            if g.dtype == grad_w.dtype and xi.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), xi)  # (V, C), no temporary
            else:
                grad_w += g.t() @ xi  # (V, C): a 16-bit product, summed in fp32
            del g  # before the next block's logits
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss / x.size(0)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        # the mean's 1/N times 1/grad_accum (and the fp16 loss scale)
        scale = grad_loss / grad_x.size(0)
        return grad_x * scale, (grad_w * scale).to(ctx.weight_dtype), None, None, None, None
