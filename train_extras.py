"""
What train_gpt2.py does besides the lecture, kept out of its way:

    python train_gpt2.py export --checkpoint log/model_19073.pt --out gpt2-mine   # a Hugging Face GPT-2 directory
    python train_gpt2.py plot --log_dir log                                      # log.txt as a PNG
    python train_gpt2.py --batch_size auto ...        # the largest micro-batch that fits in memory (estimated here)

train_gpt2.py imports this file only when one of these is asked for; this file imports train_gpt2 and train_plumbing.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist

from train_gpt2 import get_encoding, model_from_checkpoint
from train_plumbing import CONV1D, UserError, load_checkpoint, write_atomic

# -----------------------------------------------------------------------------
# --batch_size auto: how many sequences per micro-step fit in memory


def auto_batch_size(model, max_batch, cfg, rt):
    """The largest micro-batch that fits on every rank and divides the sequences one rank processes per step:
    its training step, and evaluation and HellaSwag (--hellaswag_every) at the same batch, which run in between."""
    hellaswag = bool(getattr(cfg, "hellaswag_every", 0))
    # compiled or eager (use_compile's rule; a GPU's trial runs eagerly, which keeps the more)
    compiled = cfg.compile == "on" or (cfg.compile == "auto" and rt.device_type == "cpu")
    batch_size = pick_batch_size(max_batch, lambda b: batch_fits(model, b, cfg.seq_len, rt, cfg.grad_checkpoint,
                                                                 compiled, hellaswag))
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
    twice compiled (the compiler's own buffers), 2.5 times without gradients (token_losses); with gradients also the weight's fp32 gradient (V, C), its 16-bit
    product per block and, on a CPU, that product's fp32 copy to be added."""
    V, C = model.config.padded_vocab_size, model.config.n_embd
    half = dtype in ("bf16", "fp16")
    copies = (2.0 if compiled else 1.5 if half else 1.0) if grad else 2.5 if half else 2.0
    need = copies * model.loss_block_rows(n, device) * V * 4
    if grad:
        need += V * C * (4 + (2 + (4 if torch.device(device).type == "cpu" else 0) if half else 0))
    return need


def memory_needs(model, b, seq_len, dtype, device, grad_checkpoint=False, compiled=False, hellaswag=False):
    """Bytes a micro-batch of b sequences needs beyond the weights (4 bytes a parameter, already in memory), for
    what may run: training (gradients 4 and AdamW 8 bytes a parameter, the activations, the loss), evaluation at
    the same batch (AdamW's state stays, gradients are freed; under autocast its 16-bit copy of the weights) and
    HellaSwag (4 rows of up to HELLASWAG_TOKENS per example, b examples per forward)."""
    config, P = model.config, model.num_params()
    n = b * seq_len
    casts = 2 * P if dtype in ("bf16", "fp16") else 0  # autocast's 16-bit copies of the weights
    needs = {"train": 12 * P + casts + n * activation_bytes_per_token(config, dtype, grad_checkpoint)
             + loss_bytes(model, n, dtype, device, True, compiled)}
    evaluations = {"eval": n}
    if hellaswag:
        evaluations["hellaswag"] = HELLASWAG_ROWS * b * min(config.block_size, HELLASWAG_TOKENS)
    for kind, tokens in evaluations.items():  # evaluation runs eagerly (the uncompiled model)
        needs[kind] = 8 * P + casts + tokens * inference_bytes_per_token(config, dtype) \
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


def batch_fits(model, b, seq_len, rt, grad_checkpoint, compiled=False, hellaswag=False):
    """Does a micro-batch of b sequences fit, for training and for the evaluations in between? On CUDA by trial
    (forward and backward, then the evaluations' forwards without gradients, plus room for the AdamW state that
    is not allocated yet); elsewhere from memory_needs and the RAM available."""
    n_params = model.num_params()
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
    needs = memory_needs(model, b, seq_len, rt.dtype, rt.device, grad_checkpoint, compiled, hellaswag)
    return max(needs.values()) < CPU_FREE_SHARE * available_memory(rt)


def cuda_batch_fits(trial_peak, n_params, free, ddp):
    """Decides from a trial step's peak memory (gradients and activations, bytes reserved) whether training fits
    in `free` bytes of the card: plus AdamW's two fp32 moments (8 bytes per parameter, allocated at the first
    step), and a margin of 10% and 512 MiB for what a trial cannot see (NCCL's buffers under DDP, fragmentation,
    the optimizer's temporaries). DDP's buckets hold the gradients themselves (gradient_as_bucket_view)."""
    margin = 0.1 * free + (512 << 20) * (2 if ddp else 1)
    return trial_peak + 8 * n_params < free - margin


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


def export_main(argv):
    parser = argparse.ArgumentParser(prog="train_gpt2.py export",
                                     description="Write a checkpoint as a Hugging Face GPT-2 directory.")
    parser.add_argument("--checkpoint", required=True, help="a model_*.pt checkpoint (required)")
    parser.add_argument("--out", required=True, help="output directory (required)")
    args = parser.parse_args(argv)
    from safetensors.torch import save
    model = model_from_checkpoint(load_checkpoint(args.checkpoint), args.checkpoint)
    c = model.config
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size,
        "n_ctx": c.block_size, "vocab_size": c.vocab_size, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
    }
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {args.out} ({e.strerror}); choose another directory") from None
    sd = ours_to_hf(model.state_dict(), c)
    try:
        write_atomic(os.path.join(args.out, "model.safetensors"), lambda f: f.write(save(sd, {"format": "pt"})))
        write_atomic(os.path.join(args.out, "config.json"), lambda f: json.dump(hf_config, f, indent=2), mode="w")
        written = ["config.json", "model.safetensors"] + export_tokenizer(args.out, c.block_size)
    except (OSError, RuntimeError) as e:
        raise UserError(f"could not write {args.out} ({e}); free some disk space or choose another --out") from None
    print(f"wrote {args.out} ({', '.join(written)})")


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


def plot_main(argv):
    parser = argparse.ArgumentParser(prog="train_gpt2.py plot", description="Plot log.txt: losses and HellaSwag.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--log_dir", default="log", help="directory holding log.txt")
    parser.add_argument("--out", default=None, help="PNG to write (None: <log_dir>/plot.png)")
    args = parser.parse_args(argv)
    log_file = os.path.join(args.log_dir, "log.txt")
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
        import matplotlib
    except ImportError:
        raise UserError("plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    out = args.out or os.path.join(args.log_dir, "plot.png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise UserError(f"the folder of --out {out} does not exist; create it or choose another --out")
    write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    print(f"wrote {out}")


COMMANDS = {"export": export_main, "plot": plot_main}
