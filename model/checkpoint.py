"""Reading and writing model weights: our .pth files with a JSON config sidecar, published v1 .pth files
and exported transformers folders, always atomically on write and weights-only on read."""
import json
import os
import re
import tempfile
from pathlib import Path

import torch

from .LMConfig import LMConfig
from .model import Transformer, strip_compile_prefix

SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "use_moe",
                "n_routed_experts", "n_shared_experts")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or does not fit the requested model shape."""


def atomic_write(path, write_fn):
    """Run write_fn(tmp_path), then rename over path: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sidecar_path(pth) -> Path:
    return Path(pth).with_suffix(".json")


def save_weights(model, path, config: LMConfig = None):
    """Save a plain state dict (seed key names) and its LMConfig beside it as JSON."""
    config = config or model.config
    state = {k: v.detach().cpu().contiguous() for k, v in strip_compile_prefix(model.state_dict()).items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    text = json.dumps(config.to_dict(), indent=2, ensure_ascii=False, default=str)
    atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(text))


def load_state_dict(path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a full training state: take its weights
    return strip_compile_prefix(state)


def infer_config(state, n_heads: int = 16, **overrides) -> LMConfig:
    """Work out the model shape from the tensor shapes of a state dict (head count cannot be seen: default 16)."""
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


def config_for(path, **overrides) -> LMConfig:
    """The LMConfig of a .pth: from its JSON sidecar when present, else from the tensor shapes."""
    side = sidecar_path(path)
    if side.is_file():
        fields = json.loads(side.read_text())
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return LMConfig(**fields)
    return infer_config(load_state_dict(path), **{k: v for k, v in overrides.items() if v is not None})


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
        model = Transformer.from_pretrained(path)
    else:
        state = load_state_dict(path)
        side = sidecar_path(path)
        overrides = {k: v for k, v in shape.items() if v is not None}
        if side.is_file():
            config = LMConfig(**{**json.loads(side.read_text()), **overrides})
        else:
            config = infer_config(state, **overrides)
        model = Transformer(config)
        check_shapes(state, model, path)
        model.load_state_dict(state, strict=True)
        model.tie_weights()
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)


DEFAULT_TOKENIZER = str(Path(__file__).resolve().parent / "minimind_tokenizer")


def add_model_args(parser, default_model=None):
    """The flags every inference script shares: which weights, which tokenizer, and shape hints for v1 files."""
    parser.add_argument("--model", default=default_model, required=default_model is None,
                        help="our .pth (shape from its .json sidecar), a published v1 .pth, or an exported folder")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer folder (default: the shipped one)")
    parser.add_argument("--dim", type=int, default=None, help="shape of a v1 .pth without sidecar (else inferred)")
    parser.add_argument("--n_layers", type=int, default=None, help="shape of a v1 .pth without sidecar")
    parser.add_argument("--use_moe", action="store_true", default=None, help="the v1 .pth is a MoE model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def load_model_and_tokenizer(args):
    """Model (eval mode, on args.device) and tokenizer from the flags of add_model_args."""
    from transformers import AutoTokenizer
    model = load_model(args.model, device=args.device, dim=args.dim, n_layers=args.n_layers, use_moe=args.use_moe)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    return model, tokenizer
