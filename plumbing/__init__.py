"""
The plumbing of train_gpt2.py: what pretraining needs on real machines, kept out of the lecture.
Nothing here is needed to follow how GPT-2 is pretrained; all of it is needed to pretrain it for
days on machines that fail. One module a job, each imported by its name and called qualified
(`checkpoints.save(...)`, `runtime.setup(...)`). From the bottom up: a module imports only those
above it in this list, and never train_gpt2.py, hellaswag.py or fineweb.py.

    errors          UserError (one line, exit 2), Stopped (a signal's exit code), cli()
    files           atomic writes; one run a folder (DirLock), which removes interrupted writes
    flags           what each flag accepts (argparse type=), argparse with one-line errors (Parser)
    formats         other programs' files: build-nanogpt's, nanoGPT's, llm.c's
    runtime         the device, dtype and ranks (resolve), the process settings (configure_process)
    train_flags     every flag of training (TrainConfig) and their checks against each other
    token_files     the GPT-2 tokenizer; token shards and text files as token arrays; the val set
    chunked_loss    the cross-entropy of the output layer, never holding all the logits
    compiling       --compile: a block at a time (the transformer's, and the loss's)
    sharding        --fsdp 1: the model sharded over the ranks (FSDP2)
    checkpoints     model_<step>.pt: save, load (ours or another program's), find, prune
    resume          --resume: which checkpoint, what may change, the exact restore
    mfu             FLOPs per token and each device's peak
    runlog          log.txt, W&B, the console, each step's line with MFU; --log_dir held
    signals         SIGTERM/SIGINT: finish the step, checkpoint, exit on every rank
    memory          --batch_size auto (what fits in memory), the out-of-memory line
    startup         what build_state needs beyond the lesson: resume, FSDP, compile, batch size
    long_run        what train()'s loop needs beyond the lesson: checkpoints, signals, stops, log
    hellaswag_eval  HellaSwag: its files, the batched losses of its endings, rank totals
    huggingface     GPT-2 weights from and to Hugging Face's layout (--init_from gpt2, export)
    evaluate        `train_gpt2.py evaluate`: a model's loss on any text
    plot            `train_gpt2.py plot`: log.txt as a chart
    commands        the subcommands sample, export, evaluate and plot: their flags and runs
    notebook        what notebooks/play.ipynb shows of a model
"""
