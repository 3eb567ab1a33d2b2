"""Stage 6, GRPO: reinforcement learning from rewards a program checks. For each prompt the model samples a group
of answers, each is scored, and the policy moves towards the better ones of its group (clipped ratio, KL leash to
the frozen start model)."""
import copy
from pathlib import Path

import numpy as np
import torch

from model import cli, stage, trainer as T
from model.batching import token_count
from model.checkpoint import weights_name
from model.model import IGNORE, token_logps

DATA_HOW = "a JSONL of prompts with answers (dataset/README.md); python data_process.py demo writes the demo's grpo.jsonl"
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def group_advantages(rewards, group_size, scale=True):
    """Each reward minus its group's mean, divided by the group's standard deviation (Bessel-corrected, plus 1e-4)
    unless scale is False (Dr. GRPO). A group whose answers all score alike teaches nothing: advantages 0."""
    r = rewards.view(-1, group_size)
    advantages = r - r.mean(1, keepdim=True)
    if scale:
        advantages = advantages / (r.std(1, keepdim=True) + 1e-4)
    return advantages.flatten()


def clipped_objective(logp, old_logp, ref_logp, advantages, eps_low, eps_high, beta):
    """Per-token loss: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * KL, with the k3
    estimate KL = exp(ref - logp) - (ref - logp) - 1 of the divergence from the reference. Also the KL and which
    tokens the clip held back (ratio past its bound in the direction the advantage pushes)."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    loss = -torch.min(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1 if beta else torch.zeros_like(logp)
    clipped = ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
    return loss + beta * kl, kl, clipped


def aggregate(per_token, mask, loss_type, max_new_tokens):
    """The loss summed over what the engine averages it by (count_fn): grpo, each answer's token mean (over answers);
    dapo, every token alike (over tokens); dr_grpo, token sums over the fixed length max_new_tokens (over answers)."""
    summed = (per_token * mask).sum(-1)
    if loss_type == "grpo":
        return (summed / mask.sum(-1).clamp(min=1)).sum()
    if loss_type == "dr_grpo":
        return summed.sum() / max_new_tokens
    return summed.sum()


def scored_batch(policy, reference, prompts, completions, rewards, args, autocast):
    """The training batch of one group of rollouts: prompt + answer token rows (answers are the targets), the
    group-normalised advantages, and the log-probabilities of the sampling policy (when mu > 1 reuses the batch)
    and of the reference."""
    rows = [p + c for p, c in zip(prompts, completions)]
    input_ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
    device = next(policy.parameters()).device
    batch = {"input_ids": input_ids.to(device), "labels": labels.to(device), "rewards": rewards.to(device),
             "advantages": group_advantages(rewards, args.num_generations, args.loss_type != "dr_grpo").to(device)}
    scores = lambda model: token_logps(model, batch["input_ids"], batch["labels"], autocast, args.temperature)[0]
    with torch.no_grad():
        if args.mu > 1:
            batch["old_logps"] = scores(policy)
        if args.beta:
            batch["ref_logps"] = scores(reference)
    return batch


def grpo_loss_fn(args):
    def loss_fn(policy, batch, autocast):
        logp, mask = token_logps(policy, batch["input_ids"], batch["labels"], autocast, args.temperature)
        old = batch.get("old_logps", logp.detach())
        ref = batch.get("ref_logps", logp.detach())
        per_token, kl, clipped = clipped_objective(logp, old, ref, batch["advantages"], args.epsilon,
                                                   args.epsilon_high or args.epsilon, args.beta)
        n, tokens = len(batch["rewards"]), mask.sum()
        groups = batch["rewards"].view(-1, args.num_generations)
        stats = {"reward": (batch["rewards"].sum(), n), "reward_std": (groups.std(1).sum(), len(groups)),
                 "kl": ((kl * mask).sum().detach(), tokens), "clip_frac": ((clipped * mask).sum(), tokens),
                 "completion_len": (tokens, n)}
        return aggregate(per_token, mask, args.loss_type, args.max_new_tokens), None, stats
    return loss_fn


def count_fn(args):
    """What the loss is averaged over: answer tokens (dapo) or answers."""
    if args.loss_type == "dapo":
        return token_count
    return lambda batch: batch["input_ids"].shape[0]


def make_rollout(tokenizer, reference, reward, args, runtime):
    """rollout(model, batch, seed): num_generations answers per prompt sampled in one batch by the generation
    engine (KV cache), each request seeded from the step's seed, then scored into a training batch."""
    from model.engine import Engine, run_to_completion
    from model.sampling import SamplingParams
    engines = {}

    def rollout(model, batch, seed):
        prompts = [p for p in batch["prompt_ids"] for _ in range(args.num_generations)]
        rows = [r for r in batch["row"] for _ in range(args.num_generations)]
        was_training = model.training
        engine = engines.get(len(prompts))
        if engine is None:
            engine = engines[len(prompts)] = Engine(model, tokenizer, max_batch=len(prompts))
        engine.refresh()
        seeds = np.random.SeedSequence(seed).generate_state(len(prompts), dtype=np.uint64) >> np.uint64(1)
        requests = [engine.prepare(p, SamplingParams(temperature=args.temperature, top_p=1.0, top_k=0,
                                                     max_new_tokens=args.max_new_tokens, seed=int(s)))
                    for p, s in zip(prompts, seeds)]
        done = run_to_completion(engine, requests)
        model.train(was_training)
        rewards = torch.tensor([reward(c.text, row, c.finish_reason == "stop") for c, row in zip(done, rows)],
                               dtype=torch.float32)
        return scored_batch(model, reference, prompts, [c.token_ids for c in done], rewards, args, runtime.autocast)
    return rollout


def collate_prompts(items):
    return {"prompt_ids": [i["prompt_ids"] for i in items], "row": [i["row"] for i in items]}


def parser():
    p = cli.stage_parser(__doc__, lr=1e-6, epochs=1, batch_size=4, data_path="dataset/grpo.jsonl",
                         save_interval=20, log_interval=1)
    p.add_argument("--init", default=None, help="policy start and reference (default: out_dir/rl_{dim}.pth, DPO's)")
    p.add_argument("--reward", default="answer*clean", help="answer, format, tool or clean (model/rewards.py); "
                   "several joined by + score their mean, by * their product (answer*clean: right and a clean reply)")
    p.add_argument("--num_generations", type=cli.checked(int, lambda v: v >= 2, "at least 2"), default=8,
                   help="answers sampled per prompt (the group G); --batch_size counts prompts")
    p.add_argument("--max_new_tokens", type=cli.checked(int, lambda v: v >= 1, "at least 1"), default=64)
    p.add_argument("--temperature", type=cli.checked(float, lambda v: 0 < v <= 2, "in (0, 2]"), default=1.0,
                   help="sampling temperature of the rollouts (log-probabilities are taken at the same)")
    p.add_argument("--beta", type=float, default=0.04, help="weight of the KL to the reference (0: none)")
    p.add_argument("--epsilon", type=float, default=0.2, help="ratio clip: 1 - epsilon .. 1 + epsilon_high")
    p.add_argument("--epsilon_high", type=float, default=None, help="upper clip (default: --epsilon)")
    p.add_argument("--mu", type=cli.checked(int, lambda v: v >= 1, "at least 1"), default=1,
                   help="optimizer steps on each batch of rollouts (GRPO's mu)")
    p.add_argument("--loss_type", choices=LOSS_TYPES, default="grpo",
                   help="grpo: mean over each answer's tokens, then over answers; dapo: mean over all tokens; dr_grpo "
                   "(Dr. GRPO): no division by the group's std nor by each answer's length")
    return p


def main():
    args = parser().parse_args()
    config = cli.train_config(args)
    stage.require_data(config.data_path, DATA_HOW)
    from model.rewards import reward_fn
    try:
        reward = reward_fn(args.reward)
    except ValueError as e:
        raise T.TrainError(str(e)) from None
    rt = T.Runtime(config)
    policy = stage.init_model(config, "rl")
    reference = copy.deepcopy(policy).to(rt.device).eval().requires_grad_(False) if args.beta else None
    from model.dataset import PromptDataset
    tokenizer = stage.load_tokenizer(config, policy)
    dataset = PromptDataset(config.data_path, tokenizer, max_length=config.max_seq_len)
    out = Path(config.out_dir) / weights_name("grpo", policy.config)
    T.Trainer(config, rt, policy, dataset, collate_prompts, out, loss_fn=grpo_loss_fn(args), count_fn=count_fn(args),
              rollout_fn=make_rollout(tokenizer, reference, reward, args, rt), reuse=args.mu,
              plot_keys=("loss", "reward", "kl"),
              metric_names=("reward", "reward_std", "kl", "clip_frac", "completion_len", "rollout_s", "step_s")).fit()


if __name__ == "__main__":
    cli.run(main)
