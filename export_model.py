"""Export a checkpoint as a transformers folder (our code, trust_remote_code) or as a stock Llama folder."""

import argparse
import copy
import os
import shutil
import sys
from pathlib import Path

import torch

from model.checkpoint import CheckpointError, add_model_args, load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

DETAILS = """\
--format transformers (default): config.json with auto_map, model.py + LMConfig.py, safetensors weights,
  tokenizer files and generation_config.json; loads with
  AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) and
  AutoTokenizer.from_pretrained(DIR, trust_remote_code=True) (without the flag transformers first asks
  whether to run the folder's code, since config.json names it).
--format llama (dense models only): a plain LlamaForCausalLM folder that needs no remote code, so tools that
  know Llama can load it. Our rotary rotates channel pairs (2k, 2k+1) of each head; Llama rotates (k, k+d/2).
  Reordering the rows of wq and wk within each head to [0, 2, 4, ..., 1, 3, 5, ...] turns one into the other
  (q.k is unchanged by a permutation applied to both), so the logits stay the same.
After writing, the folder is loaded back and its logits are compared with the checkpoint's.
"""


def rotary_to_llama(weight, n_heads, head_dim):
    """Rows of a q/k projection reordered from consecutive-pair rotary to Llama's rotate_half layout."""
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return weight.view(n_heads, head_dim, -1)[:, order].reshape(n_heads * head_dim, -1)


def llama_config(c):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.dim // c.n_heads,
        hidden_act="silu", max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_theta)}, attention_bias=False,
        mlp_bias=False, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        architectures=["LlamaForCausalLM"])


def llama_state_dict(model):
    """Our weights under Llama's names, q/k rows permuted for rotate_half."""
    c, sd = model.config, model.state_dict()
    hd = c.dim // c.n_heads
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    names = {"attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(c.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "self_attn.q_proj.weight"] = rotary_to_llama(sd[src + "attention.wq.weight"], c.n_heads, hd)
        out[dst + "self_attn.k_proj.weight"] = rotary_to_llama(sd[src + "attention.wk.weight"], c.n_kv_heads, hd)
        for ours, theirs in names.items():
            out[dst + theirs + ".weight"] = sd[src + ours + ".weight"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def to_llama(model):
    """A transformers LlamaForCausalLM computing the same function as our dense model."""
    from transformers import LlamaForCausalLM
    if model.config.use_moe:
        raise ValueError("--format llama needs a dense model; this checkpoint is mixture-of-experts "
                         "(Llama has no experts): use --format transformers")
    llama = LlamaForCausalLM(llama_config(model.config))
    llama.load_state_dict(llama_state_dict(model), strict=True)
    return llama.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(tokenizer_dir, out):
    """The tokenizer files as shipped (re-saving would rewrite tokenizer_config in a transformers-5-only form)."""
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, Path(out) / name)


def save_generation_config(out):
    from transformers import GenerationConfig
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(out)


@torch.inference_mode()
def max_logit_diff(a, b, vocab_size, seed=0):
    """Largest |logit difference| of two models on a fixed random batch (one row left-padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (2, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    la = a(input_ids=ids, attention_mask=mask).logits.float()
    lb = b(input_ids=ids, attention_mask=mask).logits.float()
    return (la - lb)[mask.bool()].abs().max().item()


def export(model, tokenizer_dir, out, fmt="transformers", dtype="float32"):
    """Write the folder, load it back the way a user would and return the max |logit difference| to `model`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / "config.json").is_file():
        raise ValueError(f"{out} exists and is not an exported model folder; refusing to replace it")
    target = to_llama(model) if fmt == "llama" else model
    tmp = out.with_name(f".{out.name}.tmp")  # written aside, then swapped in: no half-written export
    shutil.rmtree(tmp, ignore_errors=True)
    (copy.deepcopy(target).to(DTYPES[dtype]) if dtype != "float32" else target).save_pretrained(tmp)
    copy_tokenizer(tokenizer_dir, tmp)
    save_generation_config(tmp)
    shutil.rmtree(out, ignore_errors=True)  # stale shards or code of an earlier export must not mix in
    os.replace(tmp, out)
    if fmt == "llama":
        loaded = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    AutoTokenizer.from_pretrained(out, trust_remote_code=fmt != "llama")  # the folder's tokenizer must load too
    return max_logit_diff(model.float(), loaded.eval(), model.config.vocab_size)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=DETAILS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    p.add_argument("--format", choices=["transformers", "llama"], default="transformers")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the saved weights")
    args = p.parse_args(argv)

    if not Path(args.model).exists():
        sys.exit(f"error: model {args.model} not found")
    if not (Path(args.tokenizer) / "tokenizer.json").is_file():
        sys.exit(f"error: tokenizer folder {args.tokenizer} has no tokenizer.json (pass --tokenizer DIR)")
    try:
        model = load_model(args.model, device="cpu", dim=args.dim, n_layers=args.n_layers, use_moe=args.use_moe)
        diff = export(model, args.tokenizer, args.out, args.format, args.dtype)
    except (CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.format} folder {args.out}; reloaded: max |logit difference| = {diff:.3g}")
    return diff


if __name__ == "__main__":
    main()
