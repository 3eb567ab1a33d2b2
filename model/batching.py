"""The engine's data side: the sample order of each epoch, its split into micro-batches, the collate step run in
the loader's workers, and the token loss with the count it is averaged over."""
import os
import signal

import numpy as np
import torch.nn.functional as F

from .LMConfig import PAD_ID
from .model import IGNORE, next_token_targets


def epoch_order(n, seed, epoch):
    """The global sample order of one epoch: the same on every rank and every run with this seed."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_chunks(order, start, global_batch, n_chunks):
    """The samples of the optimizer step starting at `start`, split into n_chunks micro-batches (rank-major
    within each micro step). Fewer samples at the end of an epoch leave some chunks empty."""
    indices = order[start:start + global_batch]
    return [c.tolist() for c in np.array_split(indices, n_chunks)]



def token_loss(model, batch, autocast):
    """Summed next-token cross-entropy over target tokens, with the count it is summed over."""
    with autocast:
        out = model(input_ids=batch["input_ids"])
    logits, targets = out.logits, next_token_targets(batch["labels"])
    loss_sum = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    aux = getattr(out, "aux_loss", None)
    return loss_sum, aux, {}


def token_count(batch):
    return int((next_token_targets(batch["labels"]) != IGNORE).sum())


def input_tokens(batch):
    """Real (non-padding) input tokens of a batch."""
    return sum(int((v != PAD_ID).sum()) for k, v in batch.items() if k.endswith("input_ids"))


HOST_COUNTS = "host_counts"  # the batch key of (loss count, input tokens), counted by the loader on the host


class HostBatch:
    """The collate step run in the loader's workers: the padded batch, plus under HOST_COUNTS the numbers the
    step needs from it (count_fn's count and the real input tokens), counted on the host so that the step never
    asks the GPU. count_fn None: no counts (a rollout replaces the batch; the step counts what it made)."""

    def __init__(self, collate, count_fn):
        self.collate, self.count_fn = collate, count_fn

    def __call__(self, items):
        batch = self.collate(items)
        if self.count_fn is not None:
            batch[HOST_COUNTS] = (self.count_fn(batch), input_tokens(batch))
        return batch


def quiet_worker(_worker_id):
    """Loader workers leave Ctrl-C (sent to the whole foreground process group) to the training process, which
    finishes its step (reading from them), saves and stops; they end when it closes its loader."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers(device, cpus=None):
    """--num_workers by default: loader processes on a GPU (the model is not waiting on the CPU there); none on
    CPU, where workers would take cores from the training maths (bench/bench_data.py measures both)."""
    cpus = cpus or len(os.sched_getaffinity(0))
    return min(4, max(cpus - 1, 0)) if device.type == "cuda" else 0
