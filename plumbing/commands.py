"""
train_gpt2.py's subcommands but train: sample, export, evaluate and plot, their flags and their
runs; train_gpt2.main hands them the lecture's load_model and sample_texts."""

import sys

from plumbing import errors, evaluate, flags, huggingface, plot, runtime, token_files

SUBCOMMANDS = ("sample", "export", "evaluate", "plot")


def run(argv, load_model, sample_texts, presets):
    """`train_gpt2.py <subcommand> ...` (argv[0] one of SUBCOMMANDS): load_model(path) gives a model
    from any checkpoint or Hugging Face GPT-2, sample_texts continues a prompt, presets names the
    GPT-2 shapes the flags accept."""
    name, argv = argv[0], argv[1:]
    if name == "plot":
        return plot.main(argv)
    if name == "export":
        args = export_args(argv)
        return huggingface.export(load_model(args.checkpoint), args.out)
    args = (sample_args if name == "sample" else evaluate_args)(argv, presets)
    rt = runtime.setup(args.device, args.dtype)
    model = load_model(args.checkpoint).to(rt.device)
    if name == "evaluate":
        return evaluate.run(model, args, rt)
    enc = token_files.get_encoding()
    for prompt in prompts(args):  # --prompt, or (--interactive) each line of stdin
        texts = sample_texts(model, enc, prompt, args.num_samples, args.max_new_tokens, rt,
                             args.temperature, args.top_k, args.seed)
        print("".join(f"--- sample {i}\n{text}\n" for i, text in enumerate(texts)), end="",
              flush=True)


def model_flag(parser, presets, default, required=False):
    """--checkpoint: what sample and evaluate read a model from."""
    parser.add_argument(
        "--checkpoint", default=default, required=required,
        type=flags.path("exists", also=tuple(presets), hint="; give a checkpoint file, "
                        "a Hugging Face GPT-2 directory or one of " + ", ".join(presets)),
        help=("required: " if required else "") + "a checkpoint file (ours, build-nanogpt's, "
        "nanoGPT's or llm.c's), or Hugging Face GPT-2 weights: a name ("
        + ", ".join(presets) + ") or a directory")


def sample_args(argv, presets):
    """The flags of `train_gpt2.py sample`, checked."""
    p = flags.Parser(prog="train_gpt2.py sample", description="Generate text from a model.")
    model_flag(p, presets, "gpt2")
    p.add_argument("--prompt", type=flags.text, default="Hello, I'm a language model,",
                   help="text to continue")
    p.add_argument("--max_new_tokens", type=flags.POSITIVE, default=64, help="tokens to generate")
    p.add_argument("--num_samples", type=flags.number(int, 1, 4096), default=4,
                   help="continuations per prompt (one batch)")
    p.add_argument("--temperature", type=flags.number(float, 0), default=1.0, help="0 = greedy")
    p.add_argument("--top_k", type=flags.COUNT, default=50,
                   help="sample among the k likeliest tokens, 0 = all")
    p.add_argument("--seed", type=flags.SEED, default=1337, help="random seed")
    p.add_argument("--device", choices=runtime.DEVICES, default="auto",
                   help="auto, cpu, cuda or mps")
    p.add_argument("--dtype", choices=runtime.DTYPES, default="auto",
                   help="auto, bf16, fp16 or fp32")
    p.add_argument("--interactive", action="store_true",
                   help="read prompts from stdin, one per line, until end of input")
    args = p.parse_args(argv)
    if not args.interactive and not args.prompt.strip():
        raise errors.UserError("--prompt is empty; give some text to continue")
    return args


def prompts(args):
    """sample's prompts: --prompt, or with --interactive the non-empty lines of stdin until its
    end."""
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
    p = flags.Parser(prog="train_gpt2.py export",
                     description="Write a checkpoint as a Hugging Face GPT-2 directory.")
    p.add_argument("--checkpoint", type=flags.path("file"), required=True, help="a checkpoint file "
                   "(required): ours, or build-nanogpt's, nanoGPT's or llm.c's")
    p.add_argument("--out", type=flags.path("out_dir"), required=True,
                   help="output directory (required)")
    return p.parse_args(argv)


def evaluate_args(argv, presets):
    """The flags of `train_gpt2.py evaluate`, checked."""
    p = flags.Parser(prog="train_gpt2.py evaluate", description="A model's mean loss, perplexity "
                     "and bits per byte on a text file or a shard directory's val split.")
    model_flag(p, presets, None, required=True)
    p.add_argument("--data", type=flags.path("exists"), required=True, help="required: a text file "
                   "(all of it), or a directory of token shards (its val split)")
    p.add_argument("--tokens", type=flags.COUNT, default=0,
                   help="evaluate only the first N tokens (0 = all)")
    p.add_argument("--seq_len", type=flags.COUNT, default=0,
                   help="tokens of context per window (0 = the model's block size)")
    p.add_argument("--batch_size", type=flags.POSITIVE, default=8, help="windows per forward")
    p.add_argument("--per_token", action="store_true", help="print every token with its loss")
    p.add_argument("--device", choices=runtime.DEVICES, default="auto",
                   help="auto, cpu, cuda or mps")
    p.add_argument("--dtype", choices=runtime.DTYPES, default="fp32",
                   help="fp32 (full precision), or autocast to bf16, fp16, auto")
    return p.parse_args(argv)
