"""
What train_gpt2.py does besides the lecture, kept out of its way:

    python train_gpt2.py export --checkpoint log/model_19073.pt --out gpt2-mine   # a Hugging Face GPT-2 directory
    python train_gpt2.py plot --log_dir log                                      # log.txt as a PNG
    python train_gpt2.py evaluate --checkpoint gpt2 --data my.txt --per_token   # a model's loss on a text
    python train_gpt2.py --batch_size auto ...        # the largest micro-batch that fits in memory (estimated here)

train_gpt2.py imports this file (and its command line parses export's and evaluate's flags); this file imports
train_plumbing only: the imports run one way.
"""

import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from train_plumbing import (CONV1D, DEVICES, DTYPES, Flag, FlagParser, UserError, check_seq_len, first_tokens,
                            fsdp_sync_once, get_encoding, load_split, path_problem, text_tokens, write_atomic)

# -----------------------------------------------------------------------------
# --batch_size auto: how many sequences per micro-step fit in memory


def auto_batch_size(model, max_batch, cfg, rt):
    """The largest micro-batch that fits on every rank and divides the sequences one rank processes per step:
    its training step, and evaluation and HellaSwag (--hellaswag_every) at the same batch, which run in between."""
    hellaswag = bool(getattr(cfg, "hellaswag_every", 0))
    # compiled or eager (use_compile's rule; a GPU's trial runs eagerly, which keeps the more; under FSDP the loss,
    # in the root, runs eagerly)
    sharded = bool(getattr(cfg, "fsdp", 0))
    compiled = (cfg.compile == "on" or (cfg.compile == "auto" and rt.device_type == "cpu")) and not sharded
    # FSDP: the whole gradient and weights between micro-steps, or not (fsdp_sync_once; asked without its report)
    fsdp = (rt.world_size, fsdp_sync_once(cfg, model, rt, 1)) if sharded else None
    batch_size = pick_batch_size(max_batch, lambda b: batch_fits(model, b, cfg.seq_len, rt, cfg.grad_checkpoint,
                                                                 compiled, hellaswag, fsdp))
    if rt.ddp:  # every rank must use the same: the smallest that fits everywhere
        agreed = torch.tensor(batch_size, device=rt.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        batch_size = int(agreed.item())
    return batch_size


def pick_batch_size(max_batch, fits):
    """The largest micro-batch that divides max_batch (so accumulation makes up the rest exactly), at most 64,
    for which fits(b) says it fits in memory."""
    for b in range(min(max_batch, 64), 0, -1):
        if max_batch % b == 0 and fits(b):
            return b
    raise UserError("not even --batch_size 1 fits in memory; use --grad_checkpoint 1, a smaller --seq_len or a "
                    "smaller model")


# HellaSwag's longest row, context and ending (hellaswag.py's validation set: 166 tokens), and its rows per example
HELLASWAG_TOKENS, HELLASWAG_ROWS = 166, 4
CPU_FREE_SHARE = 0.6  # of the RAM available that the CPU estimate lets training use: the rest for what it misses


def activation_bytes_per_token(config, dtype, grad_checkpoint=False):
    """Rough training memory per token beyond weights and optimizer: 34*E bytes per layer in 16-bit with
    flash attention (Korthikanti et al. 2022, "Reducing Activation Recomputation", section 4), double in fp32;
    with checkpointing only each block's input (2*E) plus one block's activations; and the loss's fp32
    gradient of the final hidden states (4*E). The logits are not kept per token: see loss_bytes."""
    scale = 1 if dtype in ("bf16", "fp16") else 2
    per_layer = 34 * config.n_embd * scale
    layers = config.n_layer * 2 * config.n_embd * scale + per_layer if grad_checkpoint else config.n_layer * per_layer
    return layers + 4 * config.n_embd


def inference_bytes_per_token(config, dtype):
    """Memory per token of a forward without gradients (evaluation, HellaSwag): nothing is kept for backward, so
    one block's activations at a time (as training's, 34*E in 16-bit) and the residual stream (fp32, 4*E)."""
    return 34 * config.n_embd * (1 if dtype in ("bf16", "fp16") else 2) + 4 * config.n_embd


def loss_bytes(model, n, dtype, device, grad=True, compiled=False):
    """What the loss of n rows holds at once beyond its inputs (GPT.loss_block_rows, ChunkedCrossEntropy), as
    tests/test_memory.py measures it: one block of rows x V fp32 logits 1.5 times eager in 16-bit (once in fp32),
    twice compiled (the compiler's own buffers), twice without gradients (token_losses, whose blocks are
    NO_GRAD_BLOCK times the rows on a CPU); with gradients also the weight's fp32 gradient (V, C), its 16-bit
    product per block and, on a CPU, that product's fp32 copy to be added."""
    V, C = model.config.padded_vocab_size, model.config.n_embd
    half = dtype in ("bf16", "fp16")
    copies = (2.0 if compiled else 1.5 if half else 1.0) if grad else 2.0
    need = copies * model.loss_block_rows(n, device, grad) * V * 4
    if grad:
        need += V * C * (4 + (2 + (4 if torch.device(device).type == "cpu" else 0) if half else 0))
    return need


def state_bytes(model, dtype, fsdp=None):
    """(training, evaluation): the bytes a rank holds for the weights beyond its fp32 weights (in memory already).
    Training: the gradients (4 bytes a parameter) and AdamW's moments (8), and under autocast the 16-bit copies
    of the weights (2); evaluation in between: AdamW's moments and the copies (the gradients are freed). Under
    FSDP (fsdp = (ranks, sync_once), shard_model) gradients and moments are 1/ranks of that, and the weights are
    gathered (2 bytes a parameter in bf16, 4 in fp32): with sync_once the whole gradient (fp32) and the whole
    gathered model stay between micro-steps; without, the root unit (wte, lm_head, ln_f, wpe) and two blocks (one
    prefetched) are gathered at a time, and the root's and one block's fp32 gradients are whole until reduced."""
    P = model.num_params()
    if fsdp is None:
        casts = 2 * P if dtype in ("bf16", "fp16") else 0
        return 12 * P + casts, 8 * P + casts
    ranks, sync_once = fsdp
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.transformer.h]  # a DTensor counts as whole
    root, block, g = P - sum(blocks), max(blocks), 2 if dtype == "bf16" else 4
    gathered = g * (root + 2 * block)
    train = 12 * P / ranks + ((4 + g) * P if sync_once else gathered + 4 * (root + block))
    return train, 8 * P / ranks + gathered


def memory_needs(model, b, seq_len, dtype, device, grad_checkpoint=False, compiled=False, hellaswag=False,
                 fsdp=None):
    """Bytes a micro-batch of b sequences needs on a rank beyond its weights (4 bytes a parameter, in memory
    already; under FSDP its shards), for what may run: training (state_bytes, the activations, the loss),
    evaluation at the same batch (state_bytes) and HellaSwag (4 rows of up to HELLASWAG_TOKENS per example, b
    examples per forward)."""
    config = model.config
    n = b * seq_len
    train_state, eval_state = state_bytes(model, dtype, fsdp)
    needs = {"train": train_state + n * activation_bytes_per_token(config, dtype, grad_checkpoint)
             + loss_bytes(model, n, dtype, device, True, compiled)}
    evaluations = {"eval": n}
    if hellaswag:
        evaluations["hellaswag"] = HELLASWAG_ROWS * b * min(config.block_size, HELLASWAG_TOKENS)
    for kind, tokens in evaluations.items():  # evaluation runs eagerly (the uncompiled model)
        needs[kind] = eval_state + tokens * inference_bytes_per_token(config, dtype) \
            + loss_bytes(model, tokens, dtype, device, False)
    return needs


def available_memory(rt):
    """RAM this process may use: MemAvailable (which counts the page cache that the kernel can reclaim, such as
    the memory-mapped shards), shared by the processes on this machine."""
    try:
        with open("/proc/meminfo") as f:
            free = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux: assume half of the RAM is free
        free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    return free // rt.local_world_size


def batch_fits(model, b, seq_len, rt, grad_checkpoint, compiled=False, hellaswag=False, fsdp=None):
    """Does a micro-batch of b sequences fit, for training and for the evaluations in between? On CUDA by trial
    (forward and backward, then the evaluations' forwards without gradients, plus room for the AdamW state that
    is not allocated yet); elsewhere, and under FSDP (fsdp = (ranks, sync_once): a trial that runs out of memory
    on one rank would leave the others waiting in its collectives), from memory_needs and the memory free."""
    n_params = model.num_params()
    if rt.device_type == "cuda" and fsdp is not None:
        free, _ = torch.cuda.mem_get_info(rt.device)  # net of the shards, the CUDA context and other processes
        needs = memory_needs(model, b, seq_len, rt.dtype, rt.device, grad_checkpoint, False, hellaswag, fsdp)
        return max(needs.values()) < free - cuda_margin(free, True)
    if rt.device_type == "cuda":
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(rt.device)  # net of the CUDA context and of other processes
        base = torch.cuda.memory_reserved(rt.device)  # the weights, already on the card
        torch.cuda.reset_peak_memory_stats(rt.device)
        shapes = [(b, seq_len)] + ([(HELLASWAG_ROWS * b, min(model.config.block_size, HELLASWAG_TOKENS))]
                                   if hellaswag else [])
        try:  # the eager model: compiled training keeps fewer intermediates, so this errs on the safe side
            x = torch.randint(0, model.config.vocab_size, (b, seq_len), device=rt.device)
            with rt.autocast():
                loss = model(x, x)[1]
            loss.backward()
            model.zero_grad(set_to_none=True)  # evaluation runs with the gradients freed
            with torch.no_grad(), rt.autocast():
                for shape in shapes:
                    x = torch.randint(0, model.config.vocab_size, shape, device=rt.device)
                    model(x, x)
            peak = torch.cuda.max_memory_reserved(rt.device) - base  # reserved: the allocator's cache counts
        except torch.cuda.OutOfMemoryError:
            peak = float("inf")
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        return cuda_batch_fits(peak, n_params, free, rt.ddp)
    needs = memory_needs(model, b, seq_len, rt.dtype, rt.device, grad_checkpoint, compiled, hellaswag, fsdp)
    return max(needs.values()) < CPU_FREE_SHARE * available_memory(rt)


def cuda_batch_fits(trial_peak, n_params, free, ddp):
    """Decides from a trial step's peak memory (gradients and activations, bytes reserved) whether training fits
    in `free` bytes of the card: plus AdamW's two fp32 moments (8 bytes per parameter, allocated at the first
    step), and a margin of 10% and 512 MiB for what a trial cannot see (NCCL's buffers under DDP, fragmentation,
    the optimizer's temporaries). DDP's buckets hold the gradients themselves (gradient_as_bucket_view)."""
    return trial_peak + 8 * n_params < free - cuda_margin(free, ddp)


def cuda_margin(free, ddp):
    """What a GPU's estimate leaves free: 10% and 512 MiB (twice under torchrun: NCCL's buffers)."""
    return 0.1 * free + (512 << 20) * (2 if ddp else 1)


# -----------------------------------------------------------------------------
# export: a checkpoint as a Hugging Face GPT-2 directory


def ours_to_hf(sd, config):
    """Our state dict -> Hugging Face GPT-2 layout (transformer. prefix, Conv1D weights, real vocab only)."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("_orig_mod.")
        if k == "lm_head.weight":
            continue
        if k == "transformer.wte.weight":
            v = v[: config.vocab_size]  # drop the padding rows
        out[k] = (v.t() if k.endswith(CONV1D) else v).contiguous()
    return out


def export(model, out):
    """model as a Hugging Face GPT-2 directory at out: config.json, model.safetensors and the tokenizer."""
    from safetensors.torch import save
    c = model.config
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size,
        "n_ctx": c.block_size, "vocab_size": c.vocab_size, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
    }
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out} ({e.strerror}); choose another directory") from None
    sd = ours_to_hf(model.state_dict(), c)
    try:
        write_atomic(os.path.join(out, "model.safetensors"), lambda f: f.write(save(sd, {"format": "pt"})))
        write_atomic(os.path.join(out, "config.json"), lambda f: json.dump(hf_config, f, indent=2), mode="w")
        written = ["config.json", "model.safetensors"] + export_tokenizer(out, c.block_size)
    except (OSError, RuntimeError) as e:
        raise UserError(f"could not write {out} ({e}); free some disk space or choose another --out") from None
    print(f"wrote {out} ({', '.join(written)})")


def export_tokenizer(out, max_length):
    """Hugging Face's GPT-2 tokenizer files are OpenAI's BPE files under other names: encoder.json is vocab.json
    and vocab.bpe is merges.txt. Copies them from tiktoken's cache when they are there (tiktoken names each
    file by the sha1 of its URL); returns the names written."""
    import hashlib
    import tempfile
    get_encoding()  # makes sure tiktoken has fetched (or found) the files
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    written = []
    for remote, local in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        src = os.path.join(cache, hashlib.sha1((base + remote).encode()).hexdigest())
        if os.path.isfile(src):
            with open(src, "rb") as f:
                data = f.read()
            write_atomic(os.path.join(out, local), lambda f: f.write(data))
            written.append(local)
    if len(written) == 2:
        tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length,
                            "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        write_atomic(os.path.join(out, "tokenizer_config.json"), lambda f: json.dump(tokenizer_config, f, indent=2),
                     mode="w")
        written.append("tokenizer_config.json")
    return written


# -----------------------------------------------------------------------------
# plot: log.txt as loss and HellaSwag curves


def plot_figure(log_dir):
    """log.txt's curves as a matplotlib figure, with the GPT-2 reference lines (notebooks/play.ipynb shows it)."""
    log_file = os.path.join(log_dir, "log.txt")
    if not os.path.isfile(log_file):
        raise UserError(f"{log_file} does not exist; give the --log_dir of a training run")
    series = {"train": ([], []), "val": ([], []), "hella": ([], [])}
    with open(log_file) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[1] in series:
                series[parts[1]][0].append(int(parts[0]))
                series[parts[1]][1].append(float(parts[2]))
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plot needs matplotlib: pip install matplotlib") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    ax1.plot(*series["train"], label="train loss", alpha=0.6)
    ax1.plot(*series["val"], label="val loss", marker="o", markersize=3)
    # reference: OpenAI's GPT-2 124M on the FineWeb-Edu val shard, as measured in Karpathy's build-nanogpt
    ax1.axhline(3.2924, color="r", linestyle="--", label="OpenAI GPT-2 124M val (3.2924)")
    ax1.set(xlabel="step", ylabel="loss", title="loss")
    ax1.legend()
    ax2.plot(*series["hella"], label="ours", marker="o", markersize=3)
    ax2.axhline(0.2955, color="r", linestyle="--", label="OpenAI GPT-2 124M (0.2955)")
    ax2.axhline(0.337, color="g", linestyle="--", label="GPT-3 124M (0.337)")
    ax2.axhline(0.25, color="gray", linestyle=":", label="chance (0.25)")
    ax2.set(xlabel="step", ylabel="acc_norm", title="HellaSwag" if series["hella"][0] else
            "HellaSwag (not in this log: train with --hellaswag_every)", xlim=ax1.get_xlim(), ylim=(0.2, 0.4))
    ax2.legend()
    return fig


def plot_main(argv):
    """`train_gpt2.py plot`: log.txt's losses and HellaSwag accuracy as a PNG."""
    parser = FlagParser(prog="train_gpt2.py plot", description="Plot log.txt: losses and HellaSwag.")
    parser.flag("log_dir", Flag(path="dir"), "log", "directory holding log.txt")
    parser.flag("out", Flag(path="out_file"), None, "PNG to write (None: <log_dir>/plot.png)")
    args = parser.parse(argv)
    out = args.out or os.path.join(args.log_dir, "plot.png")
    if problem := path_problem(out, "out_file"):
        raise UserError(f"cannot write the plot: {problem}")
    try:
        import matplotlib
        matplotlib.use("Agg")  # a file, no window
    except ImportError:
        raise UserError("plot needs matplotlib: pip install matplotlib") from None
    fig = plot_figure(args.log_dir)
    write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    print(f"wrote {out}")


# -----------------------------------------------------------------------------
# evaluate: a model's loss on any text or shards; and what notebooks/play.ipynb shows of a model


@torch.no_grad()
def window_losses(model, tokens, seq_len, batch_size=8, device="cpu", autocast=contextlib.nullcontext,
                  per_token=False, progress=False):
    """The loss of every token but the first, each predicted from the tokens before it in its window: windows
    of seq_len + 1 tokens, overlapping by one (the last may be shorter). Returns (sum of the losses, their count,
    each token's loss as a float array if per_token else None)."""
    model.eval()
    starts = list(range(0, len(tokens) - 1, seq_len))
    full = [i for i in starts if i + seq_len < len(tokens)]  # the windows of seq_len + 1 tokens
    groups = [full[j: j + batch_size] for j in range(0, len(full), batch_size)] + [[i] for i in starts[len(full):]]
    loss_sum, count, losses = 0.0, 0, []
    from tqdm import tqdm  # a progress bar over the tokens, on stderr
    bar = tqdm(total=len(tokens) - 1, desc="evaluate", unit="tok", file=sys.stderr, disable=not progress)
    for group in groups:
        buf = torch.from_numpy(np.stack([np.asarray(tokens[i: i + seq_len + 1], dtype=np.int64) for i in group]))
        x, y = buf[:, :-1].to(device), buf[:, 1:].to(device)  # (b, T) inputs, (b, T) their next tokens
        with autocast():
            if per_token:
                logits, _ = model(x)  # (b, T, padded_vocab)
                each = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")  # (b * T,)
                losses.append(each.cpu().numpy())
                loss_sum += float(each.double().sum())
            else:  # the loss alone: the model never builds the whole logits
                loss_sum += float(model(x, y)[1]) * y.numel()
        count += y.numel()
        bar.update(y.numel())
    bar.close()
    return loss_sum, count, np.concatenate(losses) if per_token else None


def text_losses(model, enc, text, device="cpu"):
    """[(token text, its loss in nats or None for the first)] of a text: what `evaluate --per_token` prints."""
    tokens = enc.encode_ordinary(text)
    _, _, losses = window_losses(model, tokens, model.config.block_size, device=device, per_token=True)
    return token_loss_pairs(enc, tokens, losses)


def token_loss_pairs(enc, tokens, losses):
    """[(token text, its loss, or None for the first token, which nothing predicts)]."""
    return [(enc.decode([int(t)]), None if i == 0 else float(losses[i - 1])) for i, t in enumerate(tokens)]


def format_text_losses(pairs):
    """One line per token: its loss (nats) and its text."""
    return "\n".join(f"{'-' if loss is None else f'{loss:.3f}':>8}  {tok!r}" for tok, loss in pairs)


@torch.no_grad()
def next_tokens(model, enc, prompt, k=10, device="cpu"):
    """The k likeliest next tokens after the prompt: [(token text, probability)]."""
    model.eval()
    idx = torch.tensor([enc.encode_ordinary(prompt)[-model.config.block_size:]], device=device)  # (1, T)
    probs = F.softmax(model(idx)[0][0, -1].float(), dim=-1)  # (padded_vocab,): the padding rows get 0
    top = torch.topk(probs, k)
    return [(enc.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]


@torch.no_grad()
def attention_of_head(model, enc, prompt, layer, head, device="cpu"):
    """(the prompt's token texts, the (T, T) attention weights of one head): row i is how much position i takes
    from each position j <= i. The model itself never forms this matrix (flash attention), so it is rebuilt
    from the keys and queries of the layer's input, caught on its way in."""
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
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
    return [enc.decode([t]) for t in tokens], F.softmax(scores, dim=-1).cpu()


def evaluate(model, args, rt):
    """`train_gpt2.py evaluate`: prints the mean loss, perplexity and bits per byte of model on args.data (each
    token with its loss, with --per_token), then one line of JSON that starts with what was evaluated on what."""
    seq_len = args.seq_len or model.config.block_size
    check_seq_len(seq_len, model.config.block_size)
    enc, end = get_encoding(), args.tokens + 1 if args.tokens else None
    if os.path.isdir(args.data):  # the val split's shards, only as far as --tokens reaches
        tokens = first_tokens(load_split(args.data, "val"), end)
    else:
        tokens = text_tokens(args.data)[:end]
    if len(tokens) < 2:
        raise UserError(f"{args.data} has {len(tokens)} token; give at least two (the first has no loss)")
    batch_size, per_token, names = args.batch_size, args.per_token, dict(model=args.checkpoint, data=args.data)
    t0 = time.time()
    loss_sum, n, losses = window_losses(model, tokens, seq_len, batch_size, rt.device, rt.autocast, per_token,
                                        progress=True)
    dt = time.time() - t0
    if per_token:
        print(format_text_losses(token_loss_pairs(enc, tokens, losses)))
    # bits per byte: the loss in bits over the UTF-8 bytes of the predicted tokens, comparable across tokenizers
    token_bytes = np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)])
    n_bytes = int(token_bytes[np.asarray(tokens[1:], dtype=np.int64)].sum())
    loss = loss_sum / n
    result = dict(**names, tokens=n, loss=round(loss, 6),
                  perplexity=round(math.exp(loss), 4), bits_per_byte=round(loss_sum / math.log(2) / n_bytes, 6),
                  seq_len=seq_len, device=rt.device, dtype=rt.dtype, seconds=round(dt, 1))
    print(f"{n} tokens: loss {loss:.4f} | perplexity {math.exp(loss):.2f} | {result['bits_per_byte']:.4f} bits per "
          "byte")
    print(json.dumps(result))


# -----------------------------------------------------------------------------
# The flags of the subcommands sample, export and evaluate (train_gpt2.py runs them; plot's are plot_main's)


def model_flag(parser, presets, default, required=False):
    """--checkpoint: what sample and evaluate read a model from."""
    parser.flag("checkpoint", Flag(path="exists", also=tuple(presets), hint="; give a checkpoint file, a Hugging "
                "Face GPT-2 directory or one of " + ", ".join(presets)), default, ("required: " if required else "")
                + "a checkpoint file (ours, build-nanogpt's, nanoGPT's or llm.c's), or Hugging Face GPT-2 weights: a "
                "name (" + ", ".join(presets) + ") or a directory", required=required)


def sample_args(argv, presets):
    """The flags of `train_gpt2.py sample`, checked."""
    parser = FlagParser(prog="train_gpt2.py sample", description="Generate text from a model.")
    model_flag(parser, presets, "gpt2")
    parser.flag("prompt", Flag(), "Hello, I'm a language model,", "text to continue")
    parser.flag("max_new_tokens", Flag(int, lo=1), 64, "tokens to generate")
    parser.flag("num_samples", Flag(int, lo=1, hi=4096), 4, "continuations per prompt (one batch)")
    parser.flag("temperature", Flag(float, lo=0), 1.0, "0 = greedy")
    parser.flag("top_k", Flag(int, lo=0), 50, "sample among the k likeliest tokens, 0 = all")
    parser.flag("seed", Flag(int, lo=0, hi=2**32 - 1), 1337, "random seed")
    parser.flag("device", Flag(choices=DEVICES), "auto", "auto, cpu, cuda or mps")
    parser.flag("dtype", Flag(choices=DTYPES), "auto", "auto, bf16, fp16 or fp32")
    parser.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, "
                        "until end of input")
    args = parser.parse(argv)
    if not args.interactive and not args.prompt.strip():
        raise UserError("--prompt is empty; give some text to continue")
    return args


def prompts(args):
    """sample's prompts: --prompt, or with --interactive the non-empty lines of stdin until its end."""
    if not args.interactive:
        yield args.prompt
        return
    ask = "prompt> " if sys.stdin.isatty() else ""  # no prompt text in piped output
    while True:
        try:
            prompt = input(ask)
        except EOFError:
            return
        if prompt.strip():
            yield prompt


def export_args(argv):
    """The flags of `train_gpt2.py export`, checked."""
    parser = FlagParser(prog="train_gpt2.py export",
                        description="Write a checkpoint as a Hugging Face GPT-2 directory.")
    parser.flag("checkpoint", Flag(path="file"), None, "a checkpoint file (required): ours, or build-nanogpt's, "
                "nanoGPT's or llm.c's", required=True)
    parser.flag("out", Flag(path="out_dir"), None, "output directory (required)", required=True)
    return parser.parse(argv)


def evaluate_args(argv, presets):
    """The flags of `train_gpt2.py evaluate`, checked."""
    parser = FlagParser(prog="train_gpt2.py evaluate", description="A model's mean loss, perplexity and bits per "
                        "byte on a text file or a shard directory's val split.")
    model_flag(parser, presets, None, required=True)
    parser.flag("data", Flag(path="exists"), None, "required: a text file (all of it), or a directory of token "
                "shards (its val split)", required=True)
    parser.flag("tokens", Flag(int, lo=0), 0, "evaluate only the first N tokens (0 = all)")
    parser.flag("seq_len", Flag(int, lo=0), 0, "tokens of context per window (0 = the model's block size)")
    parser.flag("batch_size", Flag(int, lo=1), 8, "windows per forward")
    parser.add_argument("--per_token", action="store_true", help="print every token with its loss")
    parser.flag("device", Flag(choices=DEVICES), "auto", "auto, cpu, cuda or mps")
    parser.flag("dtype", Flag(choices=DTYPES), "fp32", "fp32 (full precision), or autocast to bf16, fp16, auto")
    return parser.parse(argv)
