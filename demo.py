"""The whole MiniMind pipeline on the embedded demo world, on a CPU, in minutes: every stage script runs as a
user would run it, and a report card measures what each stage did on data it never trained on."""
import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STAGES = ("data", "tokenizer", "pretrain", "sft", "sft_multi", "lora", "dpo", "tools", "grpo", "ceval", "ceval_cloze",
          "export")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="out/demo", help="where checkpoints, logs and the report go")
    p.add_argument("--data", default="dataset/demo", help="where the demo world is generated")
    p.add_argument("--fresh", action="store_true", help="redo every stage (default: reuse finished ones)")
    p.add_argument("--shipped_tokenizer", action="store_true",
                   help="use model/minimind_tokenizer instead of training one on the demo's pretraining text")
    p.add_argument("--seed", type=int, default=42, help="the demo world's seed")
    p.add_argument("--n_entities", type=int, default=240, help="made-up entities in the demo world")
    p.add_argument("--rounds", type=int, default=30,
                   help="times the pretraining text states every fact, each time in fresh orders and lead-ins")
    p.add_argument("--mcq_drills", type=int, default=1, help="multiple-choice drills per SFT fact")
    p.add_argument("--followup_pages", type=float, default=0.0,
                   help="share of SFT entities per round whose questions also appear in a row in pretraining, the "
                        "later ones by pronoun (see data_process.py demo --followup_pages)")
    p.add_argument("--vocab_size", type=int, default=2000, help="size of the tokenizer trained on the demo text")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--n_kv_heads", type=int, default=2)
    p.add_argument("--max_seq_len", type=int, default=256)
    p.add_argument("--pretrain_epochs", type=int, default=1, help="passes over the (already repetitive) corpus")
    p.add_argument("--pretrain_batch", type=int, default=16)
    p.add_argument("--pretrain_lr", type=float, default=3e-3)
    p.add_argument("--sft_epochs", type=int, default=4)
    p.add_argument("--sft_lr", type=float, default=1.5e-4, help="low, so SFT keeps what pretraining stored")
    p.add_argument("--multi_lr", type=float, default=5e-5,
                   help="lower still: the multi-turn chats are about SFT entities and would overwrite held-out facts")
    p.add_argument("--lora_lr", type=float, default=5e-3,
                   help="LoRA sits inside the chain: 1e-2 gave the identity but cost a third of the held-out answers")
    p.add_argument("--dpo_lr", type=float, default=3e-5)
    p.add_argument("--tools_stage", action="store_true",
                   help="add the tool-call and thinking stage between DPO and GRPO (off by default: at this model size "
                        "it learns neither and costs the earlier lessons; see the README)")
    p.add_argument("--tools_lr", type=float, default=3e-5, help="the tool and thinking stage's learning rate")
    p.add_argument("--grpo_lr", type=float, default=3e-4,
                   help="1e-4 for 120 steps of 8 prompts gains half as much pass@1; without the replay and the clean "
                        "reward 3e-4 erases the identity and the abstentions (see the README)")
    p.add_argument("--grpo_steps", type=int, default=240, help="GRPO steps of --grpo_batch prompts x 8 sampled answers")
    p.add_argument("--grpo_batch", type=int, default=16, help="prompts per GRPO step")
    p.add_argument("--grpo_replay", action=argparse.BooleanOptionalAction, default=True,
                   help="replay the earlier lessons in the GRPO prompts (data_process.py demo; see the README)")
    p.add_argument("--grpo_reward", default="answer*clean",
                   help="6-grpo_train.py --reward: the first answer right and the whole reply clean (with the first "
                        "answer alone the text after it decays)")
    p.add_argument("--dtype", default="auto", help="autocast precision of every training stage (see 1-pretrain.py)")
    p.add_argument("--eval_limit", type=int, default=300, help="held-out rows sampled per measurement")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's epochs (a quick run: 0.3)")
    p.add_argument("--until", choices=STAGES, help="stop after this stage, without the report (e.g. a scaling sweep)")
    return p.parse_args(argv)


class Pipeline:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.done_dir = self.out / "stages"
        self.done_dir.mkdir(exist_ok=True)
        self.t0 = time.time()
        self.rerun = args.fresh  # once a stage runs, every later stage runs too: its input changed

    def stage(self, name, cmd):
        """Run one stage script as a subprocess unless it already finished with the same command."""
        marker = self.done_dir / f"{name}.json"
        cmd = [str(c) for c in cmd]
        if marker.exists() and not self.rerun:
            info = json.loads(marker.read_text())
            if info.get("command") == " ".join(cmd):
                print(f"[{self.elapsed()}] {name}: reused ({info['seconds']:.0f}s when it ran)", flush=True)
                self.stop_if_last(name)
                return info
        self.rerun = True
        marker.unlink(missing_ok=True)
        print(f"[{self.elapsed()}] {name}: {' '.join(cmd)}", flush=True)
        start = time.time()
        log = self.out / f"{name}.log"
        returncode = run_logged([sys.executable, *cmd], log, f"[{self.elapsed()}] {name}")
        if returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            sys.exit(f"demo: stage {name} failed (exit {returncode}); log {log}:\n{tail}")
        info = {"seconds": time.time() - start, "command": " ".join(cmd)}
        marker.write_text(json.dumps(info))
        self.stop_if_last(name)
        return info

    def stop_if_last(self, name):
        if name == self.args.until:
            print(f"[{self.elapsed()}] stopped after {name} (--until); checkpoints in {self.out}", flush=True)
            sys.exit(0)

    def seconds(self):
        return {p.stem: round(json.loads(p.read_text())["seconds"], 1) for p in sorted(self.done_dir.glob("*.json"))}

    def elapsed(self):
        """Time since the start, and the time left as estimated from the share of the work already done."""
        spent = time.time() - self.t0
        done = sum(WORK_SHARE[p.stem] for p in self.done_dir.glob("*.json") if p.stem in WORK_SHARE)
        left = f", ~{clock(spent * (1 - done) / done)} left" if 0.05 < done < 1 and self.rerun else ""
        return clock(spent) + left


# the rough share of a default run's time each stage takes (measured on a 2-core CPU), for the time-left estimate
WORK_SHARE = {"data": 0.01, "tokenizer": 0.01, "pretrain": 0.25, "sft": 0.08, "sft_multi": 0.09, "lora": 0.05,
              "dpo": 0.03, "tools": 0.08, "grpo": 0.42, "ceval": 0.01, "ceval_cloze": 0.01, "export": 0.01}


def clock(seconds):
    s = int(seconds)
    return f"{s // 60:02d}:{s % 60:02d}"


def run_logged(cmd, log, label):
    """Run a stage script with every output line in its log file; on a terminal, the stage's live progress bar
    (what the script writes with carriage returns) is shown on one line under the label."""
    live = sys.stdout.isatty()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        pending = b""
        while chunk := proc.stdout.read1(4096):
            pending += chunk
            *pieces, pending = pending.replace(b"\r\n", b"\n").split(b"\n")
            for piece in pieces:  # complete lines: the bar's redraws (before a \r) are not kept in the log
                f.write(piece.split(b"\r")[-1].decode("utf-8", "replace") + "\n")
            f.flush()
            if live and b"\r" in pending:
                bar = pending.split(b"\r")[-2 if pending.endswith(b"\r") else -1].decode("utf-8", "replace")
                sys.stdout.write(f"\r{label} {bar.strip()}"[:shutil.get_terminal_size().columns - 1] + "\x1b[K")
                sys.stdout.flush()
                pending = pending[pending.rfind(b"\r"):]
        f.write(pending.split(b"\r")[-1].decode("utf-8", "replace"))
    if live:
        sys.stdout.write("\r\x1b[K")
    return proc.wait()


def cpu_kind():
    """The CPU and the precision --dtype auto trains in on it."""
    import torch

    from model.device import auto_dtype
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{model}, --dtype auto: {auto_dtype(torch.device('cpu'))}"


def training_chain(args, out, files, tokenizer, vocab, name):
    """The training stages in order: (stage, command, weights it writes). One chain: each stage starts from the
    weights of the one before, and the last one's are what the learner chats with."""
    shape = ["--dim", args.dim, "--n_layers", args.n_layers, "--n_heads", args.n_heads, "--n_kv_heads", args.n_kv_heads]
    common = ["--out_dir", out, "--tokenizer", tokenizer, "--max_seq_len", args.max_seq_len, "--save_interval", 200,
              "--device", "cpu", "--dtype", args.dtype, "--log_interval"]
    common, every_step = common + [10], common + [1]  # GRPO logs every step: its reward curve is the lesson
    ep = lambda n: max(1, round(n * args.scale))
    chain = [
        ("pretrain", ["1-pretrain.py", *common, *shape, "--vocab_size", vocab, "--data_path", files["pretrain"],
                      "--epochs", ep(args.pretrain_epochs), "--batch_size", args.pretrain_batch,
                      "--learning_rate", args.pretrain_lr, "--warmup_iters", 30], out / name("pretrain")),
        ("sft", ["3-full_sft.py", *common, "--init", out / name("pretrain"), "--data_path", files["sft_single"],
                 "--epochs", ep(args.sft_epochs), "--batch_size", 16, "--learning_rate", args.sft_lr,
                 "--warmup_iters", 10], out / name("full_sft")),
        ("sft_multi", ["3-full_sft.py", *common, "--init", out / name("full_sft"), "--out_name", "full_sft_multi",
                       "--data_path", files["sft_multi"], "--epochs", ep(3), "--batch_size", 8,
                       "--learning_rate", args.multi_lr], out / name("full_sft_multi")),
        ("lora", ["4-lora_sft.py", *common, "--init", out / name("full_sft_multi"), "--data_path", files["lora"],
                  "--epochs", ep(3), "--batch_size", 16, "--learning_rate", args.lora_lr, "--merge"], out / name("lora")),
        ("dpo", ["5-dpo_train.py", *common, "--init", out / name("lora"), "--data_path", files["dpo"],
                 "--epochs", ep(2), "--batch_size", 16, "--learning_rate", args.dpo_lr, "--beta", 0.1], out / name("rl")),
    ]
    if args.tools_stage:
        chain.append(("tools", ["3-full_sft.py", *common, "--init", chain[-1][2], "--out_name", "full_sft_tools",
                                "--data_path", files["sft_tools"], "--epochs", ep(2), "--batch_size", 16,
                                "--learning_rate", args.tools_lr], out / name("full_sft_tools")))
    chain.append(("grpo", ["6-grpo_train.py", *every_step, "--init", chain[-1][2], "--data_path", files["grpo"],
                           "--reward", args.grpo_reward, "--batch_size", args.grpo_batch, "--num_generations", 8,
                           "--max_new_tokens", 40,
                           "--learning_rate", args.grpo_lr, "--max_steps", max(1, round(args.grpo_steps * args.scale)),
                           "--warmup_iters", 5], out / name("grpo")))
    return chain


def main():
    args = parse_args()
    pipe = Pipeline(args)
    out, data = pipe.out, Path(args.data)
    pipe.stage("data", ["data_process.py", "demo", "--out", data, "--seed", args.seed, "--n_entities", args.n_entities,
                        "--rounds", max(1, round(args.rounds * args.scale)), "--mcq_drills", args.mcq_drills,
                        "--followup_pages", args.followup_pages,
                        "--grpo_replay" if args.grpo_replay else "--no-grpo_replay"])
    manifest = json.loads((data / "manifest.json").read_text())
    files = {role: data / Path(path).name for role, path in manifest["files"].items()}

    tokenizer, vocab = ROOT / "model" / "minimind_tokenizer", 6400
    if not args.shipped_tokenizer:
        tokenizer, vocab = out / "tokenizer", args.vocab_size
        pipe.stage("tokenizer", ["train_tokenizer.py", "--data_path", files["tokenizer"], "--out_dir", tokenizer,
                                 "--vocab_size", vocab, "--whole_words", files["names"]])

    from model.checkpoint import weights_name
    from model.LMConfig import LMConfig
    config = LMConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads)
    name = lambda prefix: weights_name(prefix, config)
    chain = training_chain(args, out, files, tokenizer, vocab, name)
    for stage, cmd, _ in chain:
        pipe.stage(stage, cmd)
    final = chain[-1][2]
    for stage, method in (("ceval", "letter"), ("ceval_cloze", "cloze")):
        pipe.stage(stage, ["eval_ceval.py", "--model", final, "--tokenizer", tokenizer, "--data_dir", files["ceval_dir"],
                           "--out_dir", out / stage, "--method", method, "--batch_size", 16, "--device", "cpu"])
    pipe.stage("export", ["export_model.py", "--model", final, "--tokenizer", tokenizer, "--out", out / "export"])

    print(f"[{pipe.elapsed()}] measuring every stage on held-out data", flush=True)
    from model.demo.report import measure, write_report
    names = {"pretrain": name("pretrain"), "sft": name("full_sft"), "sft_multi": name("full_sft_multi"),
             "lora": name("lora"), "dpo": name("rl"), "grpo": name("grpo")}
    if args.tools_stage:
        names["tools"] = name("full_sft_tools")
    metrics = {stage: Path(n).with_suffix(".metrics.jsonl").name for stage, n in names.items()}
    metrics["lora"] = Path(name("lora_sft")).with_suffix(".metrics.jsonl").name  # the adapter's training log
    measuring = time.time()
    report = measure(args, out, files, manifest, tokenizer, names, metrics)
    report["stages"]["final"]["checkpoint"] = str(final)
    # every stage's own run time (reused stages count what they took when they ran) plus the measurements
    report["wall_seconds"] = round(sum(pipe.seconds().values()) + time.time() - measuring, 1)
    report["stage_seconds"] = pipe.seconds()
    report["cpu"] = cpu_kind()
    report["world"] = {"seed": args.seed, "n_entities": args.n_entities}
    write_report(report, out)
    print((out / "report.md").read_text())
    print(f"demo finished in {report['wall_seconds'] / 60:.1f} min. Chat with the result:\n"
          f"  python 2-eval.py --model {final} --tokenizer {tokenizer} --interactive --history\n"
          f"  python my_openai_api.py --model {final} --tokenizer {tokenizer}   # then, in another shell:\n"
          f"  python chat_openai_api.py\n"
          f"  streamlit run fast_inference.py -- --model {final} --tokenizer {tokenizer}")


if __name__ == "__main__":
    main()
