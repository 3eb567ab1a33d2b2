"""Stage 1, pretraining: learn to continue text by next-token prediction over a JSONL corpus."""
from pathlib import Path

from model import cli, trainer as T
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
    T.require_data(args.data_path, DATA_HOW)
    rt = T.Runtime(args)
    if args.init:
        model = T.init_model(args, "pretrain")
    else:
        model = T.new_model(args, dim=512, n_layers=8)
    from model.dataset import PackedPretrainDataset, PretrainDataset, collate_pad
    tokenizer = T.load_tokenizer(args, model)
    Dataset = PretrainDataset if args.no_pack else PackedPretrainDataset
    dataset = Dataset(args.data_path, tokenizer, max_length=args.max_seq_len)
    out = Path(args.out_dir) / weights_name("pretrain", model.config)
    T.Trainer(args, rt, model, dataset, collate_pad, out).fit()


if __name__ == "__main__":
    cli.run(main)
