"""The whole MiniMind pipeline on the embedded demo world, on a CPU, in minutes: every stage script runs as a
user would run it, and a report card measures what each stage did on data it never trained on."""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="out/demo", help="where checkpoints, logs and the report go")
    p.add_argument("--data", default="dataset/demo", help="where the demo world is generated")
    p.add_argument("--fresh", action="store_true", help="redo every stage (default: reuse finished ones)")
    p.add_argument("--shipped_tokenizer", action="store_true",
                   help="use model/minimind_tokenizer instead of training one on the demo text")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--n_entities", type=int, default=48, help="made-up entities in the demo world")
    p.add_argument("--vocab_size", type=int, default=2000,
                   help="tokenizer size: small, so that the tiny repetitive world is cut into words, not sentences")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--n_kv_heads", type=int, default=2)
    p.add_argument("--max_seq_len", type=int, default=160)
    p.add_argument("--pretrain_epochs", type=int, default=50)
    p.add_argument("--pretrain_batch", type=int, default=16)
    p.add_argument("--pretrain_lr", type=float, default=5e-3)
    p.add_argument("--sft_epochs", type=int, default=6)
    p.add_argument("--sft_lr", type=float, default=3e-3)
    p.add_argument("--eval_limit", type=int, default=240, help="held-out rows sampled per measurement")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's epochs (a quick run: 0.3)")
    return p.parse_args()


class Pipeline:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.done_dir = self.out / "stages"
        self.done_dir.mkdir(exist_ok=True)
        self.report = {"stages": {}}
        self.t0 = time.time()

    def stage(self, name, cmd):
        """Run one stage script as a subprocess unless it already finished (its marker file exists)."""
        marker = self.done_dir / f"{name}.json"
        if marker.exists() and not self.args.fresh:
            info = json.loads(marker.read_text())
            print(f"[{self.elapsed()}] {name}: reused ({info['seconds']:.0f}s when it ran)", flush=True)
            return info
        cmd = [str(c) for c in cmd]
        print(f"[{self.elapsed()}] {name}: {' '.join(cmd)}", flush=True)
        start = time.time()
        log = self.out / f"{name}.log"
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            sys.exit(f"demo: stage {name} failed (exit {proc.returncode}); log {log}:\n{tail}")
        info = {"seconds": time.time() - start, "command": " ".join(cmd)}
        marker.write_text(json.dumps(info))
        return info

    def elapsed(self):
        s = int(time.time() - self.t0)
        return f"{s // 60:02d}:{s % 60:02d}"


def main():
    args = parse_args()
    pipe = Pipeline(args)
    out, data = pipe.out, Path(args.data)
    world = ["data_process.py", "demo", "--out", data, "--seed", args.seed, "--n_entities", args.n_entities]
    pipe.stage("data", world)
    manifest = json.loads((data / "manifest.json").read_text())
    files = {role: data / Path(path).name for role, path in manifest["files"].items()}
    files["ceval_dir"] = data / "ceval"

    tokenizer, vocab = ROOT / "model" / "minimind_tokenizer", 6400
    if not args.shipped_tokenizer:
        tokenizer, vocab = out / "tokenizer", args.vocab_size
        pipe.stage("tokenizer", ["train_tokenizer.py", "--data_path", files["tokenizer"], "--out_dir", tokenizer,
                                 "--vocab_size", vocab])

    dim = args.dim
    shape = ["--dim", dim, "--n_layers", args.n_layers, "--n_heads", args.n_heads, "--n_kv_heads", args.n_kv_heads]
    common = ["--out_dir", out, "--tokenizer", tokenizer, "--max_seq_len", args.max_seq_len, "--log_interval", 10,
              "--save_interval", 200, "--device", "cpu"]
    ep = lambda n: max(1, round(n * args.scale))
    pipe.stage("pretrain", ["1-pretrain.py", *common, *shape, "--vocab_size", vocab, "--data_path", files["pretrain"],
                            "--epochs", ep(args.pretrain_epochs), "--batch_size", args.pretrain_batch,
                            "--learning_rate", args.pretrain_lr, "--warmup_iters", 20])
    pretrain = out / f"pretrain_{dim}.pth"
    pipe.stage("sft", ["3-full_sft.py", *common, "--init", pretrain, "--data_path", files["sft_single"],
                       "--epochs", ep(args.sft_epochs), "--batch_size", 16, "--learning_rate", args.sft_lr,
                       "--warmup_iters", 10])
    pipe.stage("sft_multi", ["3-full_sft.py", *common, "--init", out / f"full_sft_{dim}.pth", "--out_name",
                             "full_sft_multi", "--data_path", files["sft_multi"], "--epochs", ep(1),
                             "--batch_size", 8, "--learning_rate", 3e-4])
    sft = out / f"full_sft_multi_{dim}.pth"
    pipe.stage("lora", ["4-lora_sft.py", *common, "--init", sft, "--data_path", files["lora"], "--epochs", ep(4),
                        "--batch_size", 16, "--learning_rate", 1e-2, "--merge"])
    pipe.stage("dpo", ["5-dpo_train.py", *common, "--init", sft, "--data_path", files["dpo"], "--epochs", ep(4),
                       "--batch_size", 16, "--learning_rate", 5e-5, "--beta", 0.1])
    rl = out / f"rl_{dim}.pth"
    pipe.stage("ceval", ["eval_ceval.py", "--model", rl, "--tokenizer", tokenizer, "--data_dir", files["ceval_dir"],
                         "--out_dir", out / "ceval", "--batch_size", 16, "--device", "cpu"])
    pipe.stage("export", ["export_model.py", "--model", rl, "--tokenizer", tokenizer, "--out", out / "export"])

    print(f"[{pipe.elapsed()}] measuring every stage on held-out data", flush=True)
    from model.demo_report import measure, write_report
    report = measure(args, out, files, manifest, tokenizer)
    report["wall_seconds"] = round(time.time() - pipe.t0, 1)
    for name in ("data", "tokenizer", "pretrain", "sft", "sft_multi", "lora", "dpo", "ceval", "export"):
        marker = pipe.done_dir / f"{name}.json"
        if marker.exists():
            report.setdefault("stage_seconds", {})[name] = round(json.loads(marker.read_text())["seconds"], 1)
    write_report(report, out)
    print((out / "report.md").read_text())
    print(f"demo finished in {report['wall_seconds'] / 60:.1f} min. Chat with the result:\n"
          f"  python 2-eval.py --model {rl} --tokenizer {tokenizer}\n"
          f"  python my_openai_api.py --model {rl} --tokenizer {tokenizer}   # then, in another shell:\n"
          f"  python chat_openai_api.py\n"
          f"  streamlit run fast_inference.py -- --model {rl} --tokenizer {tokenizer}")


if __name__ == "__main__":
    main()
