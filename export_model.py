"""Export a checkpoint as a transformers folder (our code, trust_remote_code), a stock Llama folder, or one GGUF
file for llama.cpp and the tools built on it (ollama, LM Studio)."""

import argparse
import copy
import json
import shutil
from pathlib import Path

import torch

from model import chat_format
from model.checkpoint import load_model, load_tokenizer_dir
from model.cli import add_model_args, check_model_flags, script
from model.device import DTYPES
from model.errors import CheckpointError, ExportError
from model.files import atomic_folder
from model.LMConfig import BOS_ID, EOS_ID, PAD_ID
from model.llama_export import from_llama, is_llama_folder, to_llama

DETAILS = """\
--format transformers (default): config.json with auto_map, model.py + LMConfig.py, safetensors weights,
  tokenizer files and generation_config.json; loads with
  AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) and
  AutoTokenizer.from_pretrained(DIR, trust_remote_code=True) (without the flag transformers first asks
  whether to run the folder's code, since config.json names it).
--format llama (dense models only): a plain LlamaForCausalLM folder that needs no remote code, so tools that
  know Llama can load it. Our rotary rotates channel pairs (2k, 2k+1) of each head; Llama rotates (k, k+d/2).
  Reordering the rows of wq and wk within each head to [0, 2, 4, ..., 1, 3, 5, ...] turns one into the other
  (q.k is unchanged by a permutation applied to both), so the logits stay the same (model/llama_export.py).
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
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(out)


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
        raise ExportError(f"{out} exists and is not an exported model folder; refusing to replace it")
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
        raise ExportError(f"{out} exists and is not a GGUF file; refusing to replace it")
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
    try:
        return load_model(args.model, device="cpu", dim=args.dim, n_layers=args.n_layers, use_moe=args.use_moe)
    except ValueError as e:  # a shape the flags ask for that no model can have
        raise CheckpointError(str(e)) from None


@script
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
        raise ExportError(f"--check_data {args.check_data} not found")
    check_model_flags(args)
    if Path(args.out).resolve() == Path(args.model).resolve():
        raise ExportError(f"--out {args.out} is the --model itself; writing there would destroy it")
    model = load_source(args)
    load_tokenizer_dir(args.tokenizer, model.config.vocab_size)  # before writing: a broken folder is named
    if args.format == "gguf":
        diff, check = export_gguf(model, args.tokenizer, args.out, args.outtype or "f32", args.check_data)
    else:
        diff = export(model, args.tokenizer, args.out, args.format, args.dtype)
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
            raise ExportError(f"llama.cpp tokenizes {check['texts'] - check['tokenization_equal']} of {check['texts']} "
                     f"texts differently from {args.tokenizer}, first {check['first_difference'][:60]!r}; "
                     f"{args.out} would not answer as the model does")
    return diff


if __name__ == "__main__":
    main()
