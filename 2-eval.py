"""Chat with a fine-tuned model: the seed's demo questions, a prompt file or an interactive session, streamed.
Thinking is shown apart from the answer; with --tools the demo world's tools are offered and run here when the
model calls them (the tool loop a client runs)."""
import argparse
import json

from model import chat_format
from model.cli import add_model_args, add_sampling_args, load_from_flags, sampling_kwargs, script
from model.demo.tools import TOOLS, load_world, run_tool
from model.evaluation import chat_input_ids, read_prompts
from model.engine import Engine

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


@script
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    add_model_args(p, default_model="out/full_sft_512.pth")
    add_sampling_args(p)
    p.add_argument("--prompts", default=None, help="file of questions: one per line, or JSONL with a prompt field")
    p.add_argument("--interactive", action="store_true", help="type questions; an empty line is skipped, exit quits")
    p.add_argument("--history", action="store_true", help="multi-turn: earlier turns stay in the prompt")
    p.add_argument("--system", default=None, help="optional system text put before the conversation")
    p.add_argument("--tools", metavar="DEMO_DIR", nargs="?", const="dataset/demo", default=None,
                   help="offer the demo world's lookup and calculate tools (the world of DEMO_DIR/manifest.json, "
                   "default dataset/demo) and run them when the model calls them")
    p.add_argument("--thinking", choices=("auto", "on", "off"), default="auto",
                   help="auto: the model decides; on: it starts with a thought; off: it answers directly")
    args = p.parse_args(argv)

    world, tools = None, None
    if args.tools:
        try:
            world, tools = load_world(args.tools), TOOLS
        except ValueError as e:
            p.error(str(e))
    model, tokenizer = load_from_flags(args)
    engine = Engine(model, tokenizer)
    max_len = model.config.max_seq_len
    budget = max(max_len - args.max_new_tokens, max_len // 2)  # prompt tokens kept, oldest turns dropped first
    thinking = {"auto": None, "on": True, "off": False}[args.thinking]
    history = [{"role": "system", "content": args.system}] if args.system else []
    for q in questions(args):
        messages = history + [{"role": "user", "content": q}]
        if not args.interactive:
            print(f"Q: {q}")
        for _ in range(4):  # the answer, after at most three rounds of tool calls
            ids = chat_input_ids(tokenizer, messages, budget, tools, thinking)
            turn = show_answer(engine.stream(ids, **sampling_kwargs(args)), tools, thinking)
            messages.append(turn)
            if not turn.get("tool_calls"):
                break
            for call in turn["tool_calls"]:
                result = run_tool(world, call)
                print(f"   → {result}")
                messages.append({"role": "tool", "content": result})
        print()
        if args.history:
            history = messages


def show_answer(deltas, tools, thinking):
    """Print an answer as it streams, its thought apart (💭) from what it says (A:) and its tool calls (🔧);
    returns it as an assistant message."""
    start = {True: chat_format.THINK_OPEN, False: chat_format.THINK_OFF}.get(thinking, "")
    reader, shown = chat_format.ReplyReader(tools, start), None
    turn = {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": []}

    def events():
        for delta in deltas:
            yield from reader.feed(delta)
        yield from reader.close()

    for kind, value in events():
        label = {"reasoning": "💭 ", "content": "A: ", "call": "🔧 "}[kind]
        if kind != shown or kind == "call":
            print(("\n" if shown else "") + label, end="")
            shown = kind
        if kind == "call":
            turn["tool_calls"].append(value)
            print(f"{value['name']}({json.dumps(value['arguments'], ensure_ascii=False)})", end="")
        else:
            turn["reasoning_content" if kind == "reasoning" else "content"] += value
            print(value, end="", flush=True)
    if not turn["content"] and not turn["tool_calls"]:
        print(("\n" if shown else "") + "A: ", end="")  # an empty answer is an answer too
    print()
    return {k: v for k, v in turn.items() if v or k == "content"}


if __name__ == "__main__":
    main()
