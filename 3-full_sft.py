"""Stage 3, supervised fine-tuning: teach the pretrained model to answer, with loss on assistant tokens only."""
from pathlib import Path

from model import cli, stage, trainer as T
from model.checkpoint import weights_name

DATA_HOW = "python data_process.py sft --input RAW.jsonl --output dataset/sft_data_single.jsonl"


def main():
    p = cli.stage_parser(__doc__, lr=5e-5, epochs=1, batch_size=32, data_path="dataset/sft_data_single.jsonl")
    p.add_argument("--init", default=None, help="start checkpoint (default: out_dir/pretrain_{dim}[_moe].pth)")
    p.add_argument("--out_name", default="full_sft", help="weights file prefix (the seed's full_sft)")
    p.add_argument("--freeze", default=None, metavar="REGEX",
                   help="keep parameters whose names match frozen, e.g. 'feed_forward|tok_embeddings' to teach the "
                   "answer format while the feed-forward layers, where pretraining stored its facts, stay as they are")
    args = p.parse_args()
    config = cli.train_config(args)
    stage.require_data(config.data_path, DATA_HOW)
    rt = T.Runtime(config)
    model = stage.init_model(config, "pretrain")
    stage.freeze_matching(model, args.freeze)
    from model.dataset import SFTDataset, collate_pad
    dataset = SFTDataset(config.data_path, stage.load_tokenizer(config, model), max_length=config.max_seq_len)
    out = Path(config.out_dir) / weights_name(args.out_name, model.config)
    T.Trainer(config, rt, model, dataset, collate_pad, out).fit()


if __name__ == "__main__":
    cli.run(main)
