"""
The flags of the subcommands sample, export and evaluate (train_gpt2.py runs them; plot's are
plot.main's)."""

import sys

from plumbing import errors, flags, runtime


def model_flag(parser, presets, default, required=False):
    """--checkpoint: what sample and evaluate read a model from."""
    parser.flag(
        "checkpoint",
        flags.Flag(
            path="exists",
            also=tuple(presets),
            hint="; give a checkpoint file, a Hugging "
            "Face GPT-2 directory or one of " + ", ".join(presets),
        ),
        default,
        ("required: " if required else "")
        + "a checkpoint file (ours, build-nanogpt's, nanoGPT's or llm.c's), or Hugging Face GPT-2 "
        "weights: a name (" + ", ".join(presets) + ") or a directory",
        required=required,
    )


def sample_args(argv, presets):
    """The flags of `train_gpt2.py sample`, checked."""
    parser = flags.FlagParser(
        prog="train_gpt2.py sample", description="Generate text from a model."
    )
    model_flag(parser, presets, "gpt2")
    parser.flag("prompt", flags.Flag(), "Hello, I'm a language model,", "text to continue")
    parser.flag("max_new_tokens", flags.Flag(int, lo=1), 64, "tokens to generate")
    parser.flag(
        "num_samples", flags.Flag(int, lo=1, hi=4096), 4, "continuations per prompt (one batch)"
    )
    parser.flag("temperature", flags.Flag(float, lo=0), 1.0, "0 = greedy")
    parser.flag("top_k", flags.Flag(int, lo=0), 50, "sample among the k likeliest tokens, 0 = all")
    parser.flag("seed", flags.Flag(int, lo=0, hi=2**32 - 1), 1337, "random seed")
    parser.flag("device", flags.Flag(choices=runtime.DEVICES), "auto", "auto, cpu, cuda or mps")
    parser.flag("dtype", flags.Flag(choices=runtime.DTYPES), "auto", "auto, bf16, fp16 or fp32")
    parser.add_argument(
        "--interactive",
        action="store_true",
        help="read prompts from stdin, one per line, until end of input",
    )
    args = parser.parse(argv)
    if not args.interactive and not args.prompt.strip():
        raise errors.UserError("--prompt is empty; give some text to continue")
    return args


def prompts(args):
    """sample's prompts: --prompt, or with --interactive the non-empty lines of stdin until its end.
    """
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
    parser = flags.FlagParser(prog="train_gpt2.py export",
                        description="Write a checkpoint as a Hugging Face GPT-2 directory.")
    parser.flag(
        "checkpoint",
        flags.Flag(path="file"),
        None,
        "a checkpoint file (required): ours, or build-nanogpt's, nanoGPT's or llm.c's",
        required=True,
    )
    parser.flag(
        "out", flags.Flag(path="out_dir"), None, "output directory (required)", required=True
    )
    return parser.parse(argv)


def evaluate_args(argv, presets):
    """The flags of `train_gpt2.py evaluate`, checked."""
    parser = flags.FlagParser(
        prog="train_gpt2.py evaluate",
        description="A model's mean loss, perplexity and bits per "
        "byte on a text file or a shard directory's val split.",
    )
    model_flag(parser, presets, None, required=True)
    parser.flag(
        "data",
        flags.Flag(path="exists"),
        None,
        "required: a text file (all of it), or a directory of token shards (its val split)",
        required=True,
    )
    parser.flag("tokens", flags.Flag(int, lo=0), 0, "evaluate only the first N tokens (0 = all)")
    parser.flag(
        "seq_len",
        flags.Flag(int, lo=0),
        0,
        "tokens of context per window (0 = the model's block size)",
    )
    parser.flag("batch_size", flags.Flag(int, lo=1), 8, "windows per forward")
    parser.add_argument("--per_token", action="store_true", help="print every token with its loss")
    parser.flag("device", flags.Flag(choices=runtime.DEVICES), "auto", "auto, cpu, cuda or mps")
    parser.flag(
        "dtype",
        flags.Flag(choices=runtime.DTYPES),
        "fp32",
        "fp32 (full precision), or autocast to bf16, fp16, auto",
    )
    return parser.parse(argv)
