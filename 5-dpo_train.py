"""Stage 5, DPO: prefer the chosen answer over the rejected one, measured against a frozen reference model."""
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from model import cli, stage, trainer as T
from model.checkpoint import weights_name
from model.model import preference_batch, sequence_logps

DATA_HOW = "python data_process.py dpo --input RAW.json --output dataset/dpo_data.jsonl"


def dpo_loss_fn(reference, beta):
    """The DPO objective: -log sigmoid(beta * (policy log-ratio - reference log-ratio)), summed over pairs."""
    def loss_fn(policy, batch, autocast):
        ids, labels = preference_batch(batch)
        n = batch["chosen_input_ids"].shape[0]
        logp = sequence_logps(policy, ids, labels, autocast)
        with torch.no_grad():
            ref = sequence_logps(reference, ids, labels, autocast)
        chosen_reward = beta * (logp[:n] - ref[:n])
        rejected_reward = beta * (logp[n:] - ref[n:])
        losses = -F.logsigmoid(chosen_reward - rejected_reward)
        stats = {"chosen_reward": chosen_reward.sum().detach(), "rejected_reward": rejected_reward.sum().detach(),
                 "margin": (chosen_reward - rejected_reward).sum().detach(),
                 "pref_acc": (chosen_reward > rejected_reward).float().sum()}
        return losses.sum(), None, stats
    return loss_fn


def main():
    p = cli.stage_parser(__doc__, lr=1e-5, epochs=1, batch_size=8, data_path="dataset/dpo_data.jsonl")
    p.add_argument("--init", default=None, help="policy start and reference (default: out_dir/full_sft_{dim}.pth)")
    p.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference model")
    args = p.parse_args()
    config = cli.train_config(args)
    stage.require_data(config.data_path, DATA_HOW)
    rt = T.Runtime(config)
    policy = stage.init_model(config, "full_sft")
    reference = copy.deepcopy(policy).to(rt.device).eval().requires_grad_(False)
    from model.dataset import DPODataset, collate_pad
    dataset = DPODataset(config.data_path, stage.load_tokenizer(config, policy), max_length=config.max_seq_len)
    out = Path(config.out_dir) / weights_name("rl", policy.config)
    T.Trainer(config, rt, policy, dataset, collate_pad, out, loss_fn=dpo_loss_fn(reference, args.beta),
              count_fn=lambda b: b["chosen_input_ids"].shape[0],
              metric_names=("chosen_reward", "rejected_reward", "margin", "pref_acc")).fit()


if __name__ == "__main__":
    cli.run(main)
