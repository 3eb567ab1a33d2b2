"""Our dense model as a stock transformers LlamaForCausalLM and back (export_model.py --format llama). Our rotary
rotates channel pairs (2k, 2k+1) of each head; Llama rotates (k, k+d/2). Reordering the rows of wq and wk within
each head to [0, 2, 4, ..., 1, 3, 5, ...] turns one into the other (q.k is unchanged by a permutation applied to
both), so the logits stay the same."""
import json
from pathlib import Path

import torch

from .errors import ExportError
from .LMConfig import BOS_ID, EOS_ID, PAD_ID, LMConfig


def rotary_to_llama(weight, n_heads, head_dim, inverse=False):
    """Rows of a q/k projection reordered from consecutive-pair rotary to Llama's rotate_half layout (or back)."""
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    if inverse:
        order = order.argsort()
    return weight.reshape(n_heads, head_dim, -1)[:, order].reshape(n_heads * head_dim, -1)


def llama_config(c):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.dim // c.n_heads,
        hidden_act="silu", max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_theta)}, attention_bias=False,
        mlp_bias=False, tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        architectures=["LlamaForCausalLM"])


def llama_names(c):
    """{our state-dict name: LlamaForCausalLM's} for a dense model."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                 "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                 "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                 "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
                 "ffn_norm": "post_attention_layernorm"}
    for i in range(c.n_layers):
        names.update({f"layers.{i}.{ours}.weight": f"model.layers.{i}.{theirs}.weight"
                      for ours, theirs in per_layer.items()})
    return names


def convert_rotary(name, weight, c, inverse=False):
    """q/k rows permuted between our rotary layout and Llama's; every other tensor unchanged."""
    hd = c.dim // c.n_heads
    if name.endswith("attention.wq.weight"):
        return rotary_to_llama(weight, c.n_heads, hd, inverse)
    if name.endswith("attention.wk.weight"):
        return rotary_to_llama(weight, c.n_kv_heads, hd, inverse)
    return weight


def llama_state_dict(model):
    """Our weights under Llama's names, q/k rows permuted for rotate_half."""
    c, sd = model.config, model.state_dict()
    return {theirs: convert_rotary(ours, sd[ours], c).detach().clone().contiguous()
            for ours, theirs in llama_names(c).items()}


def from_llama(folder):
    """Our dense model from a --format llama folder: the inverse of to_llama."""
    from transformers import LlamaForCausalLM
    from .model import Transformer
    llama = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lc, sd = llama.config, llama.state_dict()
    if not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
        raise ExportError(f"{folder}: lm_head and embed_tokens differ; our model ties them")
    theta = (getattr(lc, "rope_parameters", None) or {}).get("rope_theta", getattr(lc, "rope_theta", 1e4))
    c = LMConfig(dim=lc.hidden_size, n_layers=lc.num_hidden_layers, n_heads=lc.num_attention_heads,
                 n_kv_heads=lc.num_key_value_heads, vocab_size=lc.vocab_size, hidden_dim=lc.intermediate_size,
                 norm_eps=lc.rms_norm_eps, max_seq_len=lc.max_position_embeddings, rope_theta=float(theta))
    if getattr(lc, "head_dim", None) not in (None, c.dim // c.n_heads):
        raise ExportError(f"{folder}: head_dim {lc.head_dim} is not hidden_size / num_attention_heads")
    model = Transformer(c)
    model.load_state_dict({ours: convert_rotary(ours, sd[theirs], c, inverse=True)
                           for ours, theirs in llama_names(c).items()}, strict=True)
    return model.eval()


def is_llama_folder(path):
    config = Path(path) / "config.json"
    return config.is_file() and "LlamaForCausalLM" in json.loads(config.read_text()).get("architectures", [])


def to_llama(model):
    """A transformers LlamaForCausalLM computing the same function as our dense model."""
    from transformers import LlamaForCausalLM
    if model.config.use_moe:
        raise ExportError("--format llama needs a dense model; this checkpoint is mixture-of-experts "
                         "(Llama has no experts): use --format transformers")
    llama = LlamaForCausalLM(llama_config(model.config))
    llama.load_state_dict(llama_state_dict(model), strict=True)
    return llama.eval()
