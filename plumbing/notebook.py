"""
What notebooks/play.ipynb shows of a model: each token's loss, the likeliest next tokens, one head's
attention."""

import math

import torch
import torch.nn.functional as F

from plumbing import evaluate


def text_losses(model, enc, text, device="cpu"):
    """[(token text, its loss in nats or None for the first)] of a text: what `evaluate --per_token`
    prints."""
    tokens = enc.encode_ordinary(text)
    _, _, losses = evaluate.window_losses(
        model, tokens, model.config.block_size, device=device, per_token=True)
    return evaluate.token_loss_pairs(enc, tokens, losses)


@torch.no_grad()
def next_tokens(model, enc, prompt, k=10, device="cpu"):
    """The k likeliest next tokens after the prompt: [(token text, probability)]."""
    model.eval()
    # (1, T)
    idx = torch.tensor([enc.encode_ordinary(prompt)[-model.config.block_size:]], device=device)
    # (padded_vocab,): the padding rows get 0
    probs = F.softmax(model(idx)[0][0, -1].float(), dim=-1)
    top = torch.topk(probs, k)
    return [(enc.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]


@torch.no_grad()
def attention_of_head(model, enc, prompt, layer, head, device="cpu"):
    """(the prompt's token texts, the (T, T) attention weights of one head): row i is how much
    position i takes from each position j <= i. The model itself never forms this matrix (flash
    attention), so it is rebuilt from the keys and queries of the layer's input, caught on its way
    in."""
    model.eval()
    tokens = enc.encode_ordinary(prompt)[-model.config.block_size:]
    attn, seen = model.transformer.h[layer].attn, []
    hook = attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        model(torch.tensor([tokens], device=device))
    finally:
        hook.remove()
    x = seen[0][0]  # (T, C): the layer's input, after ln_1
    T, C = x.shape
    hs = C // attn.n_head
    q, k, _ = attn.c_attn(x).split(C, dim=1)  # 3 x (T, C)
    q, k = q[:, head * hs: (head + 1) * hs], k[:, head * hs: (head + 1) * hs]  # (T, hs) each
    scores = (q @ k.T).float() / math.sqrt(hs)  # (T, T)
    scores = scores.masked_fill(
        torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
    return [enc.decode([t]) for t in tokens], F.softmax(scores, dim=-1).cpu()
