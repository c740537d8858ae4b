"""
Hugging Face's GPT-2: its weights read from the hub or a directory into our names and layout
(--init_from gpt2), and a checkpoint written as such a directory (`train_gpt2.py export`)."""

import json
import os

import torch

from plumbing import errors, files, token_files

# Hugging Face stores these four as Conv1D, (in, out): the transpose of nn.Linear's (out, in).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_hf_gpt2(path_or_name, hub_names):
    """(GPTConfig's fields, the state dict as Hugging Face stores it) of a Hugging Face GPT-2: a
    local directory (config.json + model.safetensors or pytorch_model.bin) or one of hub_names such
    as "gpt2" (downloaded through huggingface_hub). The caller converts it with hf_to_ours."""
    path = path_or_name
    if not os.path.isdir(path):
        if path not in hub_names:
            raise errors.UserError(f"model {path!r} is neither a checkpoint file, a directory, "
                                   f"nor one of {', '.join(hub_names)}; give a model_*.pt, "
                                   "a Hugging Face GPT-2 directory or name")
        try:
            from huggingface_hub import snapshot_download
            path = snapshot_download(path, allow_patterns=["config.json", "model.safetensors"])
        except Exception as e:
            raise errors.UserError(
                f"could not download {path_or_name!r} from the Hugging Face hub "
                f"({type(e).__name__}); check the network, or pass a local directory") from None
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise errors.UserError(f"{path} has no config.json; give a Hugging Face GPT-2 directory")
    try:
        with open(cfg_file) as f:
            hf = json.load(f)
        shape = dict(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                     n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])
    except (ValueError, KeyError, TypeError) as e:
        raise errors.UserError(f"{cfg_file} is not a GPT-2 config ({type(e).__name__}: {e}); "
                               "give a GPT-2 directory") from None
    weights = [os.path.join(path, n) for n in ("model.safetensors", "pytorch_model.bin")]
    weights = [w for w in weights if os.path.isfile(w)]
    if not weights:
        raise errors.UserError(f"{path} has neither model.safetensors nor pytorch_model.bin")
    try:
        if weights[0].endswith(".safetensors"):
            from safetensors.torch import load_file
            sd_hf = load_file(weights[0])
        else:
            sd_hf = torch.load(weights[0], map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or (.bin) objects other than tensors
        reason = (str(e).splitlines() or [""])[0][:150]
        raise errors.UserError(f"{weights[0]} cannot be read ({type(e).__name__}: {reason}); "
                               "download or export it again") from None
    return shape, sd_hf


def hf_to_ours(sd_hf, padded_vocab_size):
    """Hugging Face GPT-2 state dict (any real layout) -> our state dict, the vocabulary padded with
    zero rows. A KeyError if it is not GPT-2's."""
    sd = {}
    for k, v in sd_hf.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers, and the output head that is tied to wte anyway
        sd["transformer." + k] = v.t() if k.endswith(CONV1D) else v
    wte = sd["transformer.wte.weight"]  # (vocab, C) -> padded (padded_vocab, C) with zero rows
    sd["transformer.wte.weight"] = torch.cat(
        [wte, wte.new_zeros(padded_vocab_size - wte.size(0), wte.size(1))])
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def load_hf_weights(model, sd_hf, path):
    """Hugging Face GPT-2 weights into our model (hf_to_ours), or one line saying they are not
    GPT-2's."""
    try:
        model.load_state_dict(hf_to_ours(sd_hf, model.config.padded_vocab_size))
    except KeyError as e:
        raise errors.UserError(f"the weights in {path} are not GPT-2's (no {e})") from None
    except RuntimeError as e:
        raise errors.UserError(f"the weights in {path} are not GPT-2's "
                               f"({str(e).splitlines()[0][:200]})") from None


def ours_to_hf(sd, config):
    """Our state dict -> Hugging Face GPT-2 layout (transformer. prefix, Conv1D weights, real vocab
    only)."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("_orig_mod.")
        if k == "lm_head.weight":
            continue
        if k == "transformer.wte.weight":
            v = v[:config.vocab_size]  # drop the padding rows
        out[k] = (v.t() if k.endswith(CONV1D) else v).contiguous()
    return out


def export(model, out):
    """model as a Hugging Face GPT-2 directory at out: config.json, model.safetensors and the
    tokenizer."""
    from safetensors.torch import save
    c = model.config
    hf_config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                 "activation_function": "gelu_new", "n_layer": c.n_layer, "n_head": c.n_head,
                 "n_embd": c.n_embd, "n_positions": c.block_size, "n_ctx": c.block_size,
                 "vocab_size": c.vocab_size, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
                 "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True}
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise errors.UserError(f"cannot create --out {out} ({e.strerror}); "
                               "choose another directory") from None
    sd = ours_to_hf(model.state_dict(), c)
    try:
        files.write_atomic(os.path.join(out, "model.safetensors"),
                           lambda f: f.write(save(sd, {"format": "pt"})))
        files.write_atomic(os.path.join(out, "config.json"),
                           lambda f: json.dump(hf_config, f, indent=2), mode="w")
        written = ["config.json", "model.safetensors"] + export_tokenizer(out, c.block_size)
    except (OSError, RuntimeError) as e:
        raise errors.UserError(f"could not write {out} ({e}); "
                               "free some disk space or choose another --out") from None
    print(f"wrote {out} ({', '.join(written)})")


def export_tokenizer(out, max_length):
    """Hugging Face's GPT-2 tokenizer files are OpenAI's BPE files under other names: encoder.json
    is vocab.json and vocab.bpe is merges.txt. Copies them from tiktoken's cache when they are there
    (tiktoken names each file by the sha1 of its URL); returns the names written."""
    import hashlib
    import tempfile
    token_files.get_encoding()  # makes sure tiktoken has fetched (or found) the files
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    written = []
    for remote, local in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        src = os.path.join(cache, hashlib.sha1((base + remote).encode()).hexdigest())
        if os.path.isfile(src):
            with open(src, "rb") as f:
                data = f.read()
            files.write_atomic(os.path.join(out, local), lambda f, data=data: f.write(data))
            written.append(local)
    if len(written) == 2:
        tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length,
                            "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                            "unk_token": "<|endoftext|>"}
        files.write_atomic(os.path.join(out, "tokenizer_config.json"),
                           lambda f: json.dump(tokenizer_config, f, indent=2), mode="w")
        written.append("tokenizer_config.json")
    return written
