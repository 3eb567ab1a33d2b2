"""What a stage script sets up before the engine runs: its starting model (new, or the previous stage's), the
tokenizer that must fit it, the data file it needs, and the seed of everything random."""
import random
from pathlib import Path

import numpy as np
import torch

from .checkpoint import STAGE_SCRIPTS, load_model, load_tokenizer_dir, weights_name
from .errors import TrainError
from .LMConfig import LMConfig, requested_shape
from .train_config import TrainConfig


def init_model(config: TrainConfig, prefix):
    """The starting model of a stage: --init, else the `prefix` stage's weights in --out_dir for the requested
    shape (LMConfig's default width, dense, unless the shape flags say otherwise). The shape flags must agree."""
    path = Path(config.init or Path(config.out_dir) / weights_name(prefix, requested_shape(**config.shape)))
    if not path.exists():
        raise TrainError(f"--init checkpoint {path} not found; it is made by `python {STAGE_SCRIPTS[prefix]}` "
                         "(or pass --init with another checkpoint)")
    model = load_model(path)
    for field, wanted in config.shape.items():
        have = getattr(model.config, field)
        if bool(have) != bool(wanted) if field == "use_moe" else have != wanted:
            raise TrainError(f"--{field} {wanted} does not match the --init checkpoint {path} ({field} {have}); "
                             f"drop the flag or pick another checkpoint")
    model.config.max_seq_len = max(model.config.max_seq_len, config.max_seq_len)
    return model


def new_model(config: TrainConfig):
    """A randomly initialised model of the shape the flags ask for (LMConfig's defaults for the rest)."""
    from .model import Transformer
    try:
        lm_config = LMConfig(**config.shape, max_seq_len=config.max_seq_len)
    except ValueError as e:
        raise TrainError(str(e)) from None
    seed_everything(config.seed)  # the same initial weights on every rank and every launcher
    return Transformer(lm_config)


def freeze_matching(model, pattern):
    """Stop training the parameters whose names match the regular expression (None: train everything)."""
    if not pattern:
        return
    import re
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise TrainError(f"--freeze {pattern!r} is not a regular expression: {e}") from None
    params = dict(model.named_parameters())
    frozen = [n for n in params if regex.search(n)]
    for n in frozen:
        params[n].requires_grad_(False)
    if not frozen or len(frozen) == len(params):
        raise TrainError(f"--freeze {pattern!r} matches {'no' if not frozen else 'every'} parameter")


def seed_everything(seed):
    """Seed every random generator a stage uses; called before anything random is made (weights, adapters)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def require_data(path, how):
    if Path(path).is_dir():
        raise TrainError(f"--data_path {path} is a folder; pass the data file in it (made by `{how}`)")
    if not Path(path).is_file():
        raise TrainError(f"data file {path} not found; make it with `{how}` or pass --data_path")


def load_tokenizer(config: TrainConfig, model):
    """The --tokenizer folder, checked to fit the model's embedding table."""
    if not Path(config.tokenizer).is_dir():
        raise TrainError(f"tokenizer folder {config.tokenizer} not found; the shipped one is model/minimind_tokenizer "
                         "(or train one with `python train_tokenizer.py`)")
    tokenizer = load_tokenizer_dir(config.tokenizer)
    if len(tokenizer) > model.config.vocab_size:
        raise TrainError(f"tokenizer {config.tokenizer} has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}; pass --vocab_size {len(tokenizer)} (or more) for a new model")
    return tokenizer
