"""The command line every script shares: the flags for model path, shape, device, tokenizer and sampling (with
their defaults and valid ranges), the training flags and the one TrainConfig built from them, loading a model, and
running a main() so that a user's mistake (model.errors) is one line on stderr instead of a traceback."""
import argparse
import dataclasses
from pathlib import Path

import torch

from .checkpoint import DEFAULT_TOKENIZER, STAGE_SCRIPTS, load_model_and_tokenizer
from .errors import CheckpointError, Failed, run, script  # noqa: F401 (the scripts fail through cli.run / cli.script)
from .sampling import SAMPLING_RULES, SamplingParams
from .LMConfig import DEFAULTS as LM_DEFAULTS, SHAPE_FLAGS
from .train_config import TrainConfig

# ----------------------------------------------------------------------------- flag helpers


def checked(kind, ok, what):
    """An argparse type that also rejects out-of-range values with a message saying the valid range."""
    def parse(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {what}")
        return value
    return parse


def add_device_arg(p):
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_tokenizer_arg(p):
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer folder (default: the shipped one)")


SHAPE_HELP = {"dim": "model width", "n_layers": "layers", "n_heads": "query heads", "n_kv_heads": "key/value heads",
              "use_moe": "a mixture-of-experts model", "vocab_size": "embedding rows (at least the tokenizer's size)"}


def add_shape_args(p, names, where):
    """Shape flags (names from LMConfig.SHAPE_FLAGS); each left out is taken from `where` (e.g. the checkpoint)."""
    for name in names:
        kind, help_ = type(LM_DEFAULTS[name]), f"{SHAPE_HELP[name]} (default: {where})"
        if kind is bool:
            p.add_argument(f"--{name}", action="store_true", default=None, help=help_)
        else:
            p.add_argument(f"--{name}", type=kind, default=None, help=help_)


def add_model_args(parser, default_model=None):
    """The flags every inference script shares: which weights, which tokenizer, and shape hints for v1 files."""
    parser.add_argument("--model", default=default_model, required=default_model is None,
                        help="our .pth (shape from its .json sidecar), a published v1 .pth, or an exported folder")
    add_tokenizer_arg(parser)
    add_shape_args(parser, ("dim", "n_layers", "use_moe"), "inferred; only needed for a v1 .pth without sidecar")
    add_device_arg(parser)
    return parser


def sampling_type(name, kind):
    """The argparse type of a sampling flag: the rule model.sampling.SAMPLING_RULES states for it."""
    ok, rule = SAMPLING_RULES[name]
    return checked(kind, ok, rule)


def add_sampling_args(p, max_new_tokens=256):
    d = SamplingParams()
    p.add_argument("--temperature", type=sampling_type("temperature", float), default=d.temperature,
                   help="0 means greedy (default: %(default)s)")
    p.add_argument("--top_p", type=sampling_type("top_p", float), default=d.top_p,
                   help="nucleus sampling mass, 1 disables (default: %(default)s)")
    p.add_argument("--top_k", type=sampling_type("top_k", int), default=d.top_k,
                   help="keep the k most likely tokens (0 disables)")
    p.add_argument("--repetition_penalty", type=sampling_type("repetition_penalty", float),
                   default=d.repetition_penalty, help="1 disables")
    p.add_argument("--max_new_tokens", type=sampling_type("max_new_tokens", int), default=max_new_tokens,
                   help="-1: up to the context limit")
    p.add_argument("--seed", type=sampling_type("seed", int), default=42,
                   help="sampling seed of every reply (the same prompt gives the same answer)")
    return p


def sampling_kwargs(args):
    """The sampling flags as keyword arguments of model.engine.Engine.stream."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def stage_parser(description, *, lr, epochs, batch_size, data_path, max_seq_len=512, dtype="auto",
                 accumulation_steps=1, warmup_iters=0, save_interval=100, log_interval=10):
    """The seed's training flags plus model shape, --max_steps, --resume, --deepspeed and --init."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out_dir", default="out", help="where weights, training state and logs go")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch_size", type=int, default=batch_size, help="samples per process per micro-batch")
    p.add_argument("--learning_rate", type=float, default=lr, help="peak LR; cosine decay to a tenth of it")
    add_device_arg(p)
    p.add_argument("--dtype", default=dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast precision (weights stay fp32; GradScaler only for float16); auto: bfloat16 on "
                   "GPUs and on CPUs with bf16 matrix units (AMX/AVX512-BF16), float32 elsewhere")
    p.add_argument("--use_wandb", action="store_true")
    p.add_argument("--wandb_project", default="MiniMind")
    p.add_argument("--num_workers", type=int, default=None, help="loader processes that read, tokenize and "
                   "collate the next batches while the current one trains (default: min(4, CPUs - 1) on a GPU, "
                   "0 on CPU; bench/bench_data.py measures both)")
    p.add_argument("--data_path", default=data_path)
    add_tokenizer_arg(p)
    p.add_argument("--ddp", action="store_true", help="kept for the seed's commands; distributed mode is "
                   "detected from the torchrun/deepspeed environment")
    p.add_argument("--accumulation_steps", type=int, default=accumulation_steps)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--warmup_iters", type=int, default=warmup_iters)
    p.add_argument("--log_interval", type=int, default=log_interval)
    p.add_argument("--save_interval", type=int, default=save_interval, help="optimizer steps between saves")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by launchers")
    add_shape_args(p, SHAPE_FLAGS, f"the --init checkpoint's; a new model: {LM_DEFAULTS['dim']} wide, "
                   f"{LM_DEFAULTS['n_layers']} layers, {LM_DEFAULTS['vocab_size']} tokens")
    p.add_argument("--max_seq_len", type=int, default=max_seq_len, help="samples are truncated to this many tokens")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps in total")
    p.add_argument("--resume", action="store_true", help="continue from the latest good state in --out_dir; "
                   "stops if the states there cannot be read or only the weights exist (see --fresh)")
    p.add_argument("--fresh", action="store_true", help="start from the beginning even with --resume, replacing "
                   "the weights and states of an earlier run in --out_dir (the default without --resume)")
    p.add_argument("--allow_changes", default=None, metavar="NAMES",
                   help="with --resume: the run settings you mean to change from the saved run's, comma-separated "
                   "(data, batch_size, accumulation_steps, seed, learning_rate, warmup_iters, epochs, grad_clip, "
                   "max_seq_len; or all); any other change stops --resume with a line naming it")
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config file, or a ZeRO stage number")
    p.add_argument("--seed", type=int, default=1337, help="weights and data order; dropout draws seed + rank")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow first steps, then faster)")
    p.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass: less memory, ~1/3 more compute")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's dense bf16/fp16 peak for the MFU "
                   "in the log (default: from a table of known GPUs; none on CPU)")
    return p


def train_config(args) -> TrainConfig:
    """The one TrainConfig of a stage from its parsed stage_parser flags: the shape flags given go to `shape`, the
    stage's own flags to `stage_flags`."""
    flags = vars(args)
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("init", "shape", "stage_flags")]
    return TrainConfig(**{k: flags[k] for k in names}, init=flags.get("init"),
                       shape={k: flags[k] for k in SHAPE_FLAGS if flags.get(k) is not None},
                       stage_flags={k: v for k, v in flags.items() if k not in names and k not in SHAPE_FLAGS
                                    and k != "init"})


# ----------------------------------------------------------------------------- loading and running


def stage_hint(path) -> str:
    """Which numbered script writes a checkpoint of this name (out/full_sft_512.pth -> python 3-full_sft.py)."""
    name = Path(path).name
    for prefix, stage_script in STAGE_SCRIPTS.items():
        if name.startswith(prefix):
            return f"train it with `python {stage_script}`"
    return "train one with the numbered stage scripts"


def check_model_flags(args):
    """The add_model_args --model and --tokenizer exist, or a CheckpointError naming what is missing and its maker."""
    if not Path(args.model).exists():
        raise CheckpointError(f"model {args.model} not found; {stage_hint(args.model)} (or pass --model PATH)")
    if not (Path(args.tokenizer) / "tokenizer.json").is_file():
        raise CheckpointError(f"tokenizer folder {args.tokenizer} has no tokenizer.json; build it with "
                              "`python train_tokenizer.py` (or pass --tokenizer DIR)")


def load_from_flags(args):
    """Model and tokenizer from the add_model_args flags (a CheckpointError names what is missing or wrong)."""
    check_model_flags(args)
    try:
        return load_model_and_tokenizer(args)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


