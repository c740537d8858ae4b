"""
HellaSwag evaluation: does the model pick the right ending of a short everyday story?

Each example is a context and 4 candidate endings. We feed context + ending to the model and take
the cross-entropy of the ending tokens only; the ending the model finds least surprising is its
answer. `acc` uses the summed loss, `acc_norm` the mean loss per ending token (longer endings are
not punished). This is the GPT-2/GPT-3-era protocol (context tokens = encode(ctx), ending tokens =
encode(" " + ending)).

Launch:
    python hellaswag.py --model gpt2                # OpenAI's GPT-2 124M: acc_norm 0.2955
    python hellaswag.py --model log/model_19073.pt  # one of our training checkpoints
    python hellaswag.py --model gpt2 --data hellaswag_val.jsonl --limit 500 --device cpu  # a copy
The last line of stdout is one JSON object: {"n": ..., "acc": ..., "acc_norm": ...,
"examples_per_s": ...}.

The scoring is the lecture's (train_gpt2.hellaswag_score, section 6), which --hellaswag_every also
runs during training; HellaSwag's download, verification, parsing and rendering are
plumbing/hellaswag_eval.py's; this file is the command line:
    examples = hellaswag_eval.load_examples(split="val")
    counts = train_gpt2.hellaswag_score(model, examples, enc, device)  # {n, correct, correct_norm}
    hellaswag_eval.accuracies(counts)                                 # {n, acc, acc_norm}"""

import argparse
import json
import time

import train_gpt2
from plumbing import errors, flags, hellaswag_eval, runtime, token_files

# -----------------------------------------------------------------------------
# command line


def parser():
    p = flags.Parser(prog="hellaswag.py",
                     description="HellaSwag accuracy of a GPT-2 (see the module docstring).")
    p.add_argument(
        "--model", required=True, default=argparse.SUPPRESS,
        type=flags.path("exists", also=tuple(train_gpt2.PRESETS),
                        hint="; give a Hugging Face GPT-2 name (" + ", ".join(train_gpt2.PRESETS)
                        + ") or directory, or a checkpoint file"),
        help="required: Hugging Face GPT-2 name (gpt2, gpt2-xl, ...) or directory, "
        "or a checkpoint file: ours, or build-nanogpt's, nanoGPT's or llm.c's")
    p.add_argument("--data", type=flags.path("file"),
                   help="local HellaSwag .jsonl; None: download the official file once")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="split to download when --data is None")
    p.add_argument("--limit", type=flags.COUNT, default=0,
                   help="score only the first N examples (0 = all)")
    p.add_argument("--device", choices=runtime.DEVICES, default="auto",
                   help="auto (cuda > mps > cpu), cpu, cuda or mps")
    p.add_argument("--dtype", choices=runtime.DTYPES, default="fp32",
                   help="fp32 (full precision, as the published scores were taken; TF32 matmuls "
                   "on CUDA), or autocast to bf16, fp16, or auto (bf16 if native, fp16 on older "
                   "CUDA): faster, but a few examples may flip")
    p.add_argument("--batch_size", type=flags.POSITIVE, default=16, help="examples per forward "
                   "(x4 rows, one per ending): faster until memory runs out")
    return p


@errors.cli
def main(argv):
    args = parser().parse_args(argv)
    rt = runtime.setup(args.device, args.dtype)
    # before the model: bad data fails fast
    examples = hellaswag_eval.load_examples(args.data, args.split, args.limit)
    model = train_gpt2.load_model(args.model).to(rt.device)
    enc = token_files.get_encoding()
    t0 = time.time()
    counts = train_gpt2.hellaswag_score(model, examples, enc, rt.device, args.batch_size,
                                        rt.autocast, progress=True)
    dt = time.time() - t0
    print(json.dumps(dict(hellaswag_eval.accuracies(counts), model=args.model, device=rt.device,
                          dtype=rt.dtype, examples_per_s=round(counts["n"] / dt, 2),
                          seconds=round(dt, 1))))


if __name__ == "__main__":
    main()
