"""Export a checkpoint as a transformers folder (our code, trust_remote_code), a stock Llama folder, or one GGUF
file for llama.cpp and the tools built on it (ollama, LM Studio)."""

import argparse
import copy
import json
import shutil
import sys
from pathlib import Path

import torch

from model import chat_format
from model.checkpoint import CheckpointError, load_model, load_tokenizer_dir
from model.cli import add_model_args
from model.files import atomic_folder

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
--format gguf [--outtype f32|f16|q8_0]: one .gguf file with the weights, the tokenizer (vocabulary, merges,
  token types, special ids, GPT-2's byte-level pre-tokenizer) and the chat template. Dense models are llama.cpp's
  "llama" architecture, MoE models its "bailingmoe" (softmax router, renormalised top-k, ungated shared experts:
  exactly ours); both rotate consecutive channel pairs as we do, so wq and wk are written unpermuted. Norms and
  the MoE router stay f32 in every outtype; q8_0 rows whose length is not a multiple of 32 stay f16. --model may
  also be a --format llama folder (its rotary permutation is undone).
After writing, the output is loaded back and its logits are compared with the checkpoint's. A GGUF file is read
back with the gguf package and, when llama-cpp-python is installed, also by llama.cpp itself (tokenization of a
fixed text set, of texts holding every added token of the tokenizer, and of a sample of --check_data; the
logits of one sequence): a text tokenized differently is an error. Tokens added to the BPE vocabulary are
written as llama.cpp's control tokens (special ones) or user-defined tokens (whole words), which it matches
before BPE, as the tokenizer folder does.
"""


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
        mlp_bias=False, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
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
    from model.LMConfig import LMConfig
    from model.model import Transformer
    llama = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lc, sd = llama.config, llama.state_dict()
    if not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
        raise ValueError(f"{folder}: lm_head and embed_tokens differ; our model ties them")
    theta = (getattr(lc, "rope_parameters", None) or {}).get("rope_theta", getattr(lc, "rope_theta", 1e4))
    c = LMConfig(dim=lc.hidden_size, n_layers=lc.num_hidden_layers, n_heads=lc.num_attention_heads,
                 n_kv_heads=lc.num_key_value_heads, vocab_size=lc.vocab_size, hidden_dim=lc.intermediate_size,
                 norm_eps=lc.rms_norm_eps, max_seq_len=lc.max_position_embeddings, rope_theta=float(theta))
    if getattr(lc, "head_dim", None) not in (None, c.dim // c.n_heads):
        raise ValueError(f"{folder}: head_dim {lc.head_dim} is not hidden_size / num_attention_heads")
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
        raise ValueError("--format llama needs a dense model; this checkpoint is mixture-of-experts "
                         "(Llama has no experts): use --format transformers")
    llama = LlamaForCausalLM(llama_config(model.config))
    llama.load_state_dict(llama_state_dict(model), strict=True)
    return llama.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(tokenizer_dir, out):
    """The tokenizer files as shipped (re-saving would rewrite tokenizer_config in a transformers-5-only form), with
    the chat format's own template, whatever template an older tokenizer folder carried."""
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, Path(out) / name)
    config_path = Path(out) / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["chat_template"] = chat_format.CHAT_TEMPLATE
        config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    if (Path(out) / "chat_template.jinja").is_file():
        (Path(out) / "chat_template.jinja").write_text(chat_format.CHAT_TEMPLATE, encoding="utf-8")


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
    with atomic_folder(out) as tmp:  # swapped in whole: no half-written export, no stale shards of an earlier one
        (copy.deepcopy(target).to(DTYPES[dtype]) if dtype != "float32" else target).save_pretrained(tmp)
        copy_tokenizer(tokenizer_dir, tmp)
        save_generation_config(tmp)
    if fmt == "llama":
        loaded = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    AutoTokenizer.from_pretrained(out, trust_remote_code=fmt != "llama")  # the folder's tokenizer must load too
    return max_logit_diff(model.float(), loaded.eval(), model.config.vocab_size)


def export_gguf(model, tokenizer_dir, out, outtype="f32", check_data=None):
    """Write the GGUF file, read it back and return (max |logit difference| of what it stores, llama.cpp's check
    or None when llama-cpp-python is not installed)."""
    from model.gguf_export import llama_cpp_check, model_from_gguf, write_gguf
    out = Path(out)
    if out.is_dir() or (out.is_file() and out.read_bytes()[:4] != b"GGUF"):
        raise ValueError(f"{out} exists and is not a GGUF file; refusing to replace it")
    write_gguf(model, tokenizer_dir, out, outtype)
    diff = max_logit_diff(model.float(), model_from_gguf(out), model.config.vocab_size)
    try:
        import llama_cpp  # noqa: F401  (a test requirement; the export works without it)
    except ImportError:
        return diff, None
    return diff, llama_cpp_check(out, model, tokenizer_dir, sample_path=check_data)


def load_source(args):
    """The model to export: a --format llama folder, or whatever load_model reads."""
    if Path(args.model).is_dir() and is_llama_folder(args.model):
        return from_llama(args.model)
    return load_model(args.model, device="cpu", dim=args.dim, n_layers=args.n_layers, use_moe=args.use_moe)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=DETAILS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--out", required=True, help="folder to write, or the .gguf file (replaced if it exists)")
    p.add_argument("--format", choices=["transformers", "llama", "gguf"], default="transformers")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the saved weights (folders)")
    p.add_argument("--outtype", choices=["f32", "f16", "q8_0"], default=None, help="GGUF weight type (default f32)")
    p.add_argument("--check_data", default=None, metavar="JSONL",
                   help="GGUF: also compare llama.cpp's tokenization on a sample of this text (the tokenizer's or "
                   "the model's training data, {\"text\": ...} rows)")
    args = p.parse_args(argv)
    if args.outtype and args.format != "gguf":
        p.error("--outtype is for --format gguf (folders take --dtype)")
    if args.check_data and args.format != "gguf":
        p.error("--check_data is for --format gguf")
    if args.check_data and not Path(args.check_data).is_file():
        sys.exit(f"error: --check_data {args.check_data} not found")

    if not Path(args.model).exists():
        sys.exit(f"error: model {args.model} not found")
    if not (Path(args.tokenizer) / "tokenizer.json").is_file():
        sys.exit(f"error: tokenizer folder {args.tokenizer} has no tokenizer.json (pass --tokenizer DIR)")
    if Path(args.out).resolve() == Path(args.model).resolve():
        sys.exit(f"error: --out {args.out} is the --model itself; writing there would destroy it")
    try:
        model = load_source(args)
        load_tokenizer_dir(args.tokenizer, model.config.vocab_size)  # before writing: a broken folder is named
        if args.format == "gguf":
            diff, check = export_gguf(model, args.tokenizer, args.out, args.outtype or "f32", args.check_data)
        else:
            diff = export(model, args.tokenizer, args.out, args.format, args.dtype)
    except (CheckpointError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    if args.format != "gguf":
        print(f"wrote {args.format} folder {args.out}; reloaded: max |logit difference| = {diff:.3g}")
        return diff
    print(f"wrote GGUF file {args.out} ({args.outtype or 'f32'}); read back with the gguf package: max |logit "
          f"difference| = {diff:.3g}")
    if check is None:
        print("llama.cpp check skipped: llama-cpp-python is not installed (pip install llama-cpp-python)")
    else:
        print(f"llama.cpp: tokenization equal on {check['tokenization_equal']}/{check['texts']} texts, max |logit "
              f"difference| = {check['max_logit_diff']:.3g} over {check['positions']} positions")
        if check["first_difference"] is not None:
            sys.exit(f"error: llama.cpp tokenizes {check['texts'] - check['tokenization_equal']} of {check['texts']} "
                     f"texts differently from {args.tokenizer}, first {check['first_difference'][:60]!r}; "
                     f"{args.out} would not answer as the model does")
    return diff


if __name__ == "__main__":
    main()
