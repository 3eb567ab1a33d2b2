"""Model configuration: the seed's field names as a transformers config, plus the published presets."""
import inspect
import math
from types import SimpleNamespace

from transformers import PretrainedConfig

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # the tokenizer's special ids (train_tokenizer.py makes them so); pad is unk
SHAPE_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "use_moe", "vocab_size")  # what a command line may set


class LMConfig(PretrainedConfig):
    model_type = "minimind"
    # lets transformers, peft and deepspeed read our fields under their usual names
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "hidden_dim",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "norm_eps",
    }

    def __init__(
        self,
        dim: int = 512,
        n_layers: int = 8,
        n_heads: int = 16,
        n_kv_heads: int = 8,
        vocab_size: int = 6400,
        hidden_dim: int = None,
        multiple_of: int = 64,
        norm_eps: float = 1e-5,
        max_seq_len: int = 512,
        rope_theta: float = 1e4,
        dropout: float = 0.0,
        flash_attn: bool = True,
        use_moe: bool = False,
        num_experts_per_tok: int = 2,
        n_routed_experts: int = 4,
        n_shared_experts: int = 1,
        scoring_func: str = "softmax",
        aux_loss_alpha: float = 0.01,
        seq_aux: bool = True,
        norm_topk_prob: bool = True,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if hidden_dim is None:  # SwiGLU sizing of the seed: 2/3 of 4*dim, rounded up to multiple_of
            hidden_dim = multiple_of * math.ceil(int(2 * 4 * dim / 3) / multiple_of)
        self.dim, self.n_layers, self.n_heads = dim, n_layers, n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.vocab_size, self.hidden_dim, self.multiple_of = vocab_size, hidden_dim, multiple_of
        self.norm_eps, self.max_seq_len, self.rope_theta = norm_eps, max_seq_len, rope_theta
        self.dropout, self.flash_attn = dropout, flash_attn
        self.use_moe, self.num_experts_per_tok = use_moe, num_experts_per_tok
        self.n_routed_experts, self.n_shared_experts = n_routed_experts, int(n_shared_experts)
        self.scoring_func, self.aux_loss_alpha = scoring_func, aux_loss_alpha
        self.seq_aux, self.norm_topk_prob = seq_aux, norm_topk_prob
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs.setdefault("bos_token_id", BOS_ID)
        kwargs.setdefault("eos_token_id", EOS_ID)
        kwargs.setdefault("pad_token_id", PAD_ID)
        super().__init__(**kwargs)
        self.validate_shape()

    def validate_shape(self):
        """Reject shapes the model cannot build, with a message that says which field is wrong."""
        def need(ok, msg):
            if not ok:
                raise ValueError(f"LMConfig: {msg}")
        need(self.dim > 0 and self.n_layers > 0 and self.n_heads > 0 and self.n_kv_heads > 0,
             f"dim, n_layers, n_heads, n_kv_heads must be positive (got {self.dim}, {self.n_layers}, "
             f"{self.n_heads}, {self.n_kv_heads})")
        need(self.dim % self.n_heads == 0, f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        need((self.dim // self.n_heads) % 2 == 0,
             f"head size dim/n_heads={self.dim // self.n_heads} must be even for rotary embeddings")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        need(self.vocab_size > 2, f"vocab_size={self.vocab_size} must hold the 3 special tokens")
        need(self.hidden_dim > 0, f"hidden_dim={self.hidden_dim} must be positive")
        need(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        need(self.max_seq_len > 0, f"max_seq_len={self.max_seq_len} must be positive")
        if self.use_moe:
            need(self.n_routed_experts > 0, f"n_routed_experts={self.n_routed_experts} must be positive")
            need(0 < self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..n_routed_experts="
                 f"{self.n_routed_experts}")
            need(self.scoring_func == "softmax", f"scoring_func={self.scoring_func!r} is not supported "
                 "(only 'softmax')")
            need(self.n_shared_experts >= 0, f"n_shared_experts={self.n_shared_experts} must be >= 0")


DEFAULTS = {name: p.default for name, p in inspect.signature(LMConfig.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def requested_shape(**given):
    """The shape the shape flags ask for (None: not given), the rest at LMConfig's defaults; unchecked, to name
    the checkpoint of that shape (checkpoint.weights_name) before any model exists."""
    return SimpleNamespace(**{**DEFAULTS, **{k: v for k, v in given.items() if v is not None}})


PRESETS = {
    "minimind-v1-small": dict(dim=512, n_layers=8),
    "minimind-v1": dict(dim=768, n_layers=16),
    "minimind-v1-moe": dict(dim=512, n_layers=8, use_moe=True),
}


def preset(name: str, **overrides) -> LMConfig:
    """LMConfig for one of the published model sizes, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return LMConfig(**{**PRESETS[name], **overrides})
