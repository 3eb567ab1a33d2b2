"""Let a pretrained (not yet chat-tuned) model continue text: a quick look at what pretraining taught it; --bpb FILE
measures it instead, in bits per byte of held-out text (a number models with different tokenizers share)."""
import argparse

from model.cli import add_model_args, add_sampling_args, load_from_flags, sampling_kwargs, script
from model.errors import EvalError
from model.evaluation import bits_per_byte, read_documents, read_prompts
from model.engine import Engine

DEMO_PROMPTS = [
    "长江是中国", "泰山位于", "世界上最高的山峰是", "牛顿提出了", "大熊猫主要吃", "人工智能的发展",
    "The longest river in China is", "Water is made of",
]


@script
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_model_args(p, default_model="out/pretrain_512.pth")
    add_sampling_args(p, max_new_tokens=128)
    p.add_argument("--prompts", default=None, help="file of prompts: one per line, or JSONL with a prompt/text field")
    p.add_argument("--bpb", metavar="FILE", default=None,
                   help="print bits per byte over FILE's documents instead (JSONL {\"text\": ...} as pretraining "
                        "reads it, or any other file as one document) and exit")
    args = p.parse_args(argv)

    model, tokenizer = load_from_flags(args)
    if args.bpb:
        try:
            result = bits_per_byte(model, tokenizer, read_documents(args.bpb, tokenizer))
        except ValueError as e:
            raise EvalError(str(e)) from None
        if result["bpb"] is None:
            raise EvalError(f"{args.bpb} holds no text")
        print(f"bits per byte: {result['bpb']:.4f} over {result['bytes']} bytes ({result['tokens']} tokens, "
              f"{result['documents']} documents) of {args.bpb}")
        return result
    engine = Engine(model, tokenizer)
    budget = max(model.config.max_seq_len - args.max_new_tokens, 1)
    for prompt in read_prompts(args.prompts) if args.prompts else DEMO_PROMPTS:
        # pretraining documents start with <s>, so a continuation starts from the same state
        ids = tokenizer.encode(tokenizer.bos_token + prompt, add_special_tokens=False)[-budget:]
        print(f"Q: {prompt}\nA: {prompt}", end="", flush=True)
        for piece in engine.stream(ids, **sampling_kwargs(args)):
            print(piece, end="", flush=True)
        print("\n")


if __name__ == "__main__":
    main()
