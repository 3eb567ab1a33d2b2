"""Stage 4, LoRA: adapt an SFT model with small low-rank adapters (peft) while its own weights stay frozen."""
import json
from pathlib import Path

from model import cli, stage, trainer as T
from model.checkpoint import save_weights, weights_name
from model.files import atomic_folder

DATA_HOW = "python data_process.py demo   (its lora_identity.jsonl), or an SFT file made by data_process.py sft"
TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def save_adapter(peft_model, weights_path):
    """The adapter folder (peft format) beside the state files, swapped in whole."""
    with atomic_folder(Path(weights_path).with_suffix("")) as tmp:
        peft_model.save_pretrained(tmp)
        # peft keeps target_modules as a set, written in an order that changes with Python's string hashing: sorted,
        # the same run gives the same folder byte for byte
        config = Path(tmp) / "adapter_config.json"
        if config.is_file():
            fields = json.loads(config.read_text(encoding="utf-8"))
            if isinstance(fields.get("target_modules"), list):
                fields["target_modules"] = sorted(fields["target_modules"])
            config.write_text(json.dumps(fields, indent=2, sort_keys=True), encoding="utf-8")


def main():
    p = cli.stage_parser(__doc__, lr=1e-4, epochs=5, batch_size=16, data_path="dataset/lora_identity.jsonl")
    p.add_argument("--init", default=None, help="base checkpoint (default: out_dir/full_sft_{dim}[_moe].pth)")
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.1)
    p.add_argument("--merge", action="store_true", help="also write the merged model as lora_{dim}[_moe].pth")
    args = p.parse_args()
    config = cli.train_config(args)
    stage.require_data(config.data_path, DATA_HOW)
    rt = T.Runtime(config)
    base = stage.init_model(config, "full_sft")
    from peft import LoraConfig, get_peft_model
    lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=TARGETS, bias="none")
    stage.seed_everything(config.seed)  # the adapters' initial values come from the run's seed
    model = get_peft_model(base, lora)
    from model.dataset import SFTDataset, collate_pad
    dataset = SFTDataset(config.data_path, stage.load_tokenizer(config, base), max_length=config.max_seq_len)
    adapter = Path(config.out_dir) / f"lora_{weights_name('sft', base.config)}"
    finished = T.Trainer(config, rt, model, dataset, collate_pad, adapter, save_fn=save_adapter).fit()
    if finished and args.merge and rt.is_main:
        merged = model.merge_and_unload()
        out = adapter.with_name(weights_name("lora", merged.config))
        save_weights(merged, out)
        print(f"merged LoRA weights -> {out}")


if __name__ == "__main__":
    cli.run(main)
