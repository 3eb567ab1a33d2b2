"""Stage 1, pretraining: learn to continue text by next-token prediction over a JSONL corpus."""
from pathlib import Path

from model import cli, stage, trainer as T
from model.checkpoint import weights_name

DATA_HOW = "python data_process.py pretrain --input RAW.jsonl --output dataset/pretrain_data.jsonl"


def main():
    p = cli.stage_parser(__doc__, lr=2e-4, epochs=1, batch_size=32, data_path="dataset/pretrain_data.jsonl",
                       warmup_iters=0)
    p.add_argument("--init", default=None, help="continue from this checkpoint instead of random weights")
    p.add_argument("--no_pack", action="store_true",
                   help="one document per row, padded to the batch's longest (the seed's way); by default whole "
                   "documents are packed into full --max_seq_len rows")
    args = p.parse_args()
    config = cli.train_config(args)
    stage.require_data(config.data_path, DATA_HOW)
    rt = T.Runtime(config)
    model = stage.init_model(config, "pretrain") if config.init else stage.new_model(config)
    from model.dataset import PackedPretrainDataset, PretrainDataset, collate_pad
    tokenizer = stage.load_tokenizer(config, model)
    Dataset = PretrainDataset if args.no_pack else PackedPretrainDataset
    dataset = Dataset(config.data_path, tokenizer, max_length=config.max_seq_len)
    out = Path(config.out_dir) / weights_name("pretrain", model.config)
    T.Trainer(config, rt, model, dataset, collate_pad, out).fit()


if __name__ == "__main__":
    cli.run(main)
