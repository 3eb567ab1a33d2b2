"""Chat with a fine-tuned model: the seed's demo questions, a prompt file or an interactive session, streamed."""
import argparse

from model.cli import add_model_args, add_sampling_args, load_or_exit, sampling_kwargs
from model.evaluation import chat_input_ids, read_prompts
from model.generate import Engine

DEMO_QUESTIONS = [
    "长江有多长？", "泰山在哪里？", "世界上最高的山峰是什么？", "万有引力是谁提出的？", "大熊猫的主要食物是什么？",
    "第一颗人造卫星是哪个国家发射的？", "海水为什么是咸的？",
    "What is the longest river in China?", "Who proposed the law of universal gravitation?",
]


def questions(args):
    """The questions to ask, one at a time: typed ones, a file's, or the demo list."""
    if args.interactive:
        while True:
            try:
                q = input("Q: ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if q in ("exit", "quit"):
                return
            if q:
                yield q
    else:
        yield from (read_prompts(args.prompts) if args.prompts else DEMO_QUESTIONS)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_model_args(p, default_model="out/full_sft_512.pth")
    add_sampling_args(p)
    p.add_argument("--prompts", default=None, help="file of questions: one per line, or JSONL with a prompt field")
    p.add_argument("--interactive", action="store_true", help="type questions; an empty line is skipped, exit quits")
    p.add_argument("--history", action="store_true", help="multi-turn: earlier turns stay in the prompt")
    p.add_argument("--system", default=None, help="optional system text put before the conversation")
    args = p.parse_args(argv)

    model, tokenizer = load_or_exit(args)
    engine = Engine(model, tokenizer)
    max_len = model.config.max_seq_len
    budget = max(max_len - args.max_new_tokens, max_len // 2)  # prompt tokens kept, oldest turns dropped first
    history = [{"role": "system", "content": args.system}] if args.system else []
    for q in questions(args):
        messages = history + [{"role": "user", "content": q}]
        if not args.interactive:
            print(f"Q: {q}")
        print("A: ", end="", flush=True)
        answer = ""
        for piece in engine.stream(chat_input_ids(tokenizer, messages, budget), **sampling_kwargs(args)):
            answer += piece
            print(piece, end="", flush=True)
        print("\n")
        if args.history:
            history = messages + [{"role": "assistant", "content": answer}]


if __name__ == "__main__":
    main()
