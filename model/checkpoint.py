"""Reading and writing model weights: our .pth files with a JSON config sidecar, published v1 .pth files
and exported transformers folders, always atomically on write and weights-only on read (nothing read from a
file runs code), with one-line errors that name the file."""
import json
import pickle
import re
import sys
from pathlib import Path

import torch

from .LMConfig import LMConfig
from .errors import CheckpointError
from .files import atomic_write, first_line
from .model import Transformer, strip_compile_prefix

SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "use_moe",
                "n_routed_experts", "n_shared_experts")


# which stage script writes which weights prefix (the seed's file names; the demo uses the same)
STAGE_SCRIPTS = {"pretrain": "1-pretrain.py", "full_sft": "3-full_sft.py", "lora": "4-lora_sft.py",
                 "rl": "5-dpo_train.py", "dpo": "5-dpo_train.py", "grpo": "6-grpo_train.py"}


def weights_name(prefix, shape):
    """The seed's file name of a stage's weights, `{prefix}_{dim}[_moe].pth` (pretrain_512.pth,
    full_sft_512_moe.pth, rl_512.pth, grpo_512.pth, ...). `shape`: a model's config, or LMConfig.requested_shape
    of the shape flags before a model exists."""
    return f"{prefix}_{shape.dim}{'_moe' if shape.use_moe else ''}.pth"


def sidecar_path(pth) -> Path:
    return Path(pth).with_suffix(".json")


def save_weights(model, path, config: LMConfig = None):
    """Save a plain state dict (seed key names) and its LMConfig beside it as JSON."""
    config = config or model.config
    state = {k: v.detach().cpu().contiguous() for k, v in strip_compile_prefix(model.state_dict()).items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    text = json.dumps(config.to_dict(), indent=2, ensure_ascii=False, default=str)
    atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(text))


def load_tensors(path):
    """torch.load with weights_only=True: tensors and plain data only, so nothing in the file can run code.
    Any failure is a CheckpointError saying in one line what is wrong with the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = first_line(e)
        if "weights" in why.lower():  # torch's refusal of a pickled object; its advice would be to trust the file
            why = ("it holds pickled Python objects besides tensors and plain data (refused: loading them could "
                   "run code)")
        raise CheckpointError(f"cannot read {path}: {why}") from None
    except Exception as e:  # truncated or not a torch file
        reason = first_line(e, 160).split(". ")[0]  # torch adds sentences of advice after the reason
        raise CheckpointError(f"cannot read {path}: not a complete torch file, truncated or corrupt "
                              f"({type(e).__name__}: {reason})") from None


def load_state_dict(path):
    """The tensors of a .pth file (weights only: a pickled object that is not plain data is refused, never run)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a .pth file (an exported folder needs config.json)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = load_tensors(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a full training state: take its weights
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} is not a model state dict (name -> tensor); it holds a "
                              f"{type(state).__name__}")
    return strip_compile_prefix(state)


def read_sidecar(path, overrides=None) -> LMConfig:
    """The LMConfig in the JSON sidecar `path` (a .pth's .json), with shape overrides; errors name the file."""
    try:
        fields = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the model config {path}: {first_line(e)}") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path}: expected a JSON object of LMConfig fields, got {type(fields).__name__}")
    try:
        return LMConfig(**{**fields, **(overrides or {})})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {first_line(e)}") from None


def infer_config(state, n_heads: int = 16, **overrides) -> LMConfig:
    """Work out the model shape from the tensor shapes of a state dict (head count cannot be seen: default 16)."""
    if "tok_embeddings.weight" not in state or "layers.0.attention.wk.weight" not in state:
        raise CheckpointError(f"not a MiniMind checkpoint: no tok_embeddings.weight / layers.0 tensors "
                              f"(it has {', '.join(list(state)[:3])}{', ...' if len(state) > 3 else ''})")
    vocab_size, dim = state["tok_embeddings.weight"].shape
    n_layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k)))
    n_heads = overrides.pop("n_heads", n_heads)
    head_dim = dim // n_heads
    n_kv_heads = state["layers.0.attention.wk.weight"].shape[0] // head_dim
    experts = {int(m.group(1)) for k in state if (m := re.match(r"layers\.0\.feed_forward\.experts\.(\d+)\.", k))}
    use_moe = bool(experts)
    w1 = state["layers.0.feed_forward.experts.0.w1.weight" if use_moe else "layers.0.feed_forward.w1.weight"]
    fields = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                  hidden_dim=w1.shape[0], use_moe=use_moe)
    if use_moe:
        fields["n_routed_experts"] = len(experts)
        fields["n_shared_experts"] = int(any(".shared_experts." in k for k in state))
    return LMConfig(**{**fields, **overrides})


def shape_from_tensors(state, path, overrides):
    try:
        return infer_config(state, **overrides)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot work out the model shape from its tensors ({first_line(e)}); "
                              "pass --dim/--n_layers, or keep the .json written beside it") from None


def check_shapes(state, model, source):
    """Strict key and shape match, with a message naming what differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{source}: keys do not match the model (missing {missing[:4]}"
                              f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                              f"{'...' if len(unexpected) > 4 else ''}); is use_moe / n_layers right?")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(state[k].shape)} in the checkpoint but "
                                  f"{tuple(v.shape)} in the model; {describe_mismatch(state, model.config)}")


def describe_mismatch(state, config) -> str:
    try:
        found = infer_config(state, n_heads=config.n_heads)
    except Exception:
        return "the checkpoint has a different shape"
    diffs = [f"{f}: checkpoint {getattr(found, f)} vs requested {getattr(config, f)}"
             for f in SHAPE_FIELDS if getattr(found, f) != getattr(config, f)]
    return "differs in " + "; ".join(diffs) if diffs else "the checkpoint has a different shape"


def load_model(path, device="cpu", dtype=None, **shape) -> Transformer:
    """A model from an exported folder, our .pth (sidecar config) or a published v1 .pth (shape from flags or tensors)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} is a folder without config.json: not an exported model folder")
        try:
            model = Transformer.from_pretrained(path)
        except Exception as e:  # corrupt config.json or weights, missing shards, another architecture
            raise CheckpointError(f"cannot load the model folder {path}: {first_line(e)}") from None
    else:
        state = load_state_dict(path)
        side = sidecar_path(path)
        overrides = {k: v for k, v in shape.items() if v is not None}
        if side.is_file():
            config = read_sidecar(side, overrides)
        else:
            config = shape_from_tensors(state, path, overrides)
            if "n_heads" not in overrides:  # wq is dim x dim whatever the head count: a guess, said aloud
                print(f"warning: {path} has no {side.name} beside it, so its head count is assumed to be "
                      f"{config.n_heads} (the published v1 models'); keep the .json its training wrote",
                      file=sys.stderr, flush=True)
        model = Transformer(config)
        check_shapes(state, model, path)
        model.load_state_dict(state, strict=True)
        model.tie_weights()
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)


DEFAULT_TOKENIZER = str(Path(__file__).resolve().parent / "minimind_tokenizer")


def load_tokenizer_dir(folder, vocab_size=None):
    """A tokenizer folder, checked to fit a model's embedding table; errors are one line naming the folder."""
    from transformers import AutoTokenizer
    if not (Path(folder) / "tokenizer.json").is_file():
        raise CheckpointError(f"tokenizer folder {folder} has no tokenizer.json; the shipped one is "
                              "model/minimind_tokenizer (or build one with `python train_tokenizer.py`)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # corrupt JSON, a tokenizer.json of another library version, bad config
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {first_line(e)}") from None
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise CheckpointError(f"tokenizer {folder} has {len(tokenizer)} tokens but the model's vocab_size is "
                              f"{vocab_size}: they were not trained together (pass the matching --tokenizer)")
    return tokenizer


def load_model_and_tokenizer(args):
    """Model (eval mode, on args.device) and tokenizer from the flags of add_model_args. On a GPU the weights are
    bf16 (fp16 where bf16 is not native): half the memory, and prefill runs SDPA's flash kernel."""
    from .device import cuda_dtype, resolve_device
    device = resolve_device(args.device)
    dtype = None
    if device.type == "cuda":
        dtype = getattr(torch, cuda_dtype(torch.cuda.get_device_capability(device)))
    model = load_model(args.model, device=device, dtype=dtype, dim=args.dim, n_layers=args.n_layers,
                       use_moe=args.use_moe)
    return model, load_tokenizer_dir(args.tokenizer, model.config.vocab_size)
