"""
`train_gpt2.py evaluate`: a model's mean loss, perplexity and bits per byte on any text file or a
shard directory's val split, and each token's loss with --per_token."""

import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from plumbing import errors, flags, token_files


@torch.no_grad()
def window_losses(model, tokens, seq_len, batch_size=8, device="cpu",
                  autocast=contextlib.nullcontext, per_token=False, progress=False):
    """The loss of every token but the first, each predicted from the tokens before it in its
    window: windows of seq_len + 1 tokens, overlapping by one (the last may be shorter). Returns
    (sum of the losses, their count, each token's loss as a float array if per_token else None)."""
    model.eval()
    starts = list(range(0, len(tokens) - 1, seq_len))
    full = [i for i in starts if i + seq_len < len(tokens)]  # the windows of seq_len + 1 tokens
    groups = ([full[j:j + batch_size] for j in range(0, len(full), batch_size)]
              + [[i] for i in starts[len(full):]])
    loss_sum, count, losses = 0.0, 0, []
    from tqdm import tqdm  # a progress bar over the tokens, on stderr
    bar = tqdm(total=len(tokens) - 1, desc="evaluate", unit="tok", file=sys.stderr,
               disable=not progress)
    for group in groups:
        buf = torch.from_numpy(np.stack(
            [np.asarray(tokens[i:i + seq_len + 1], dtype=np.int64) for i in group]))
        # (b, T) inputs, (b, T) their next tokens
        x, y = buf[:, :-1].to(device), buf[:, 1:].to(device)
        with autocast():
            if per_token:
                logits, _ = model(x)  # (b, T, padded_vocab)
                # (b * T,)
                each = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
                losses.append(each.cpu().numpy())
                loss_sum += float(each.double().sum())
            else:  # the loss alone: the model never builds the whole logits
                loss_sum += float(model(x, y)[1]) * y.numel()
        count += y.numel()
        bar.update(y.numel())
    bar.close()
    return loss_sum, count, np.concatenate(losses) if per_token else None


def token_loss_pairs(enc, tokens, losses):
    """[(token text, its loss, or None for the first token, which nothing predicts)]."""
    return [(enc.decode([int(t)]), None if i == 0 else float(losses[i - 1]))
            for i, t in enumerate(tokens)]


def format_text_losses(pairs):
    """One line per token: its loss (nats) and its text."""
    return "\n".join(f"{'-' if loss is None else f'{loss:.3f}':>8}  {tok!r}" for tok, loss in pairs)


def run(model, args, rt):
    """`train_gpt2.py evaluate`: prints the mean loss, perplexity and bits per byte of model on
    args.data (each token with its loss, with --per_token), then one line of JSON that starts with
    what was evaluated on what."""
    seq_len = args.seq_len or model.config.block_size
    flags.check_seq_len(seq_len, model.config.block_size)
    enc, end = token_files.get_encoding(), args.tokens + 1 if args.tokens else None
    if os.path.isdir(args.data):  # the val split's shards, only as far as --tokens reaches
        tokens = token_files.first_tokens(token_files.load_split(args.data, "val"), end)
    else:
        tokens = token_files.text_tokens(args.data)[:end]
    if len(tokens) < 2:
        raise errors.UserError(f"{args.data} has {len(tokens)} token; "
                               "give at least two (the first has no loss)")
    batch_size, per_token, names = (
        args.batch_size, args.per_token, dict(model=args.checkpoint, data=args.data))
    t0 = time.time()
    loss_sum, n, losses = window_losses(
        model, tokens, seq_len, batch_size, rt.device, rt.autocast, per_token, progress=True)
    dt = time.time() - t0
    if per_token:
        print(format_text_losses(token_loss_pairs(enc, tokens, losses)))
    # bits per byte: the loss in bits over the UTF-8 bytes of the predicted tokens, comparable
    # across tokenizers
    token_bytes = np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)])
    n_bytes = int(token_bytes[np.asarray(tokens[1:], dtype=np.int64)].sum())
    loss = loss_sum / n
    result = dict(**names, tokens=n, loss=round(loss, 6), perplexity=round(math.exp(loss), 4),
                  bits_per_byte=round(loss_sum / math.log(2) / n_bytes, 6), seq_len=seq_len,
                  device=rt.device, dtype=rt.dtype, seconds=round(dt, 1))
    print(f"{n} tokens: loss {loss:.4f} | perplexity {math.exp(loss):.2f} | "
          f"{result['bits_per_byte']:.4f} bits per byte")
    print(json.dumps(result))
