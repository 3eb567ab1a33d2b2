"""The one training engine behind every stage script: the data order, gradient accumulation, the LR schedule,
logging, and checkpoints that resume exactly where training stopped."""
import errno
import json
import math
import pickle
import resource
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .batching import (HOST_COUNTS, HostBatch, default_workers, epoch_order, input_tokens, quiet_worker,
                       step_chunks, token_count, token_loss)
from .checkpoint import save_weights
from .device import active_parameters, flops_per_token, peak_tflops
from .errors import TrainError
from .files import first_line, remove, space_left
from .runtime import Runtime
from .stage import seed_everything
from .train_config import TrainConfig
from .train_log import RunLog, progress_bar
from .train_state import (STATE_FORMAT, StateFiles, check_settings, deepspeed_weights_only, rng_state, run_settings,
                          set_rng_state, tensor_bytes)


def lr_at(step, total_steps, peak_lr, warmup_iters):
    """Linear warmup, then cosine decay from the peak to a tenth of it (the seed's floor)."""
    if step < warmup_iters:
        return peak_lr * (step + 1) / warmup_iters
    progress = (step - warmup_iters) / max(1, total_steps - warmup_iters)
    min_lr = peak_lr / 10
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def rollout_seed(seed, step, rank, micro):
    """The sampling seed of one micro-batch's rollouts: fixed by the run's seed, the step, the rank and the
    micro-batch, so a resumed run samples what the uninterrupted one did."""
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1, dtype=np.uint64)[0] >> 1)


class Trainer:
    """Runs one stage. The stage script provides the model, the dataset, the loss and what to save.

    Reinforcement learning plugs in rollout_fn(model, batch, seed) -> batch: it turns a collated micro-batch of
    prompts into a training batch with the model as it is now (sampled answers, rewards, advantages), seeded by
    rollout_seed. Each batch of rollouts is trained on for `reuse` optimizer steps (GRPO's mu); a state saved
    between them keeps the rollouts, so a resumed run goes on with the same ones."""

    def __init__(self, config: TrainConfig, runtime: Runtime, model, dataset, collate, out_weights, *,
                 loss_fn=token_loss, count_fn=token_count, trainable=None, save_fn=save_weights, metric_names=(),
                 rollout_fn=None, reuse=1, plot_keys=("loss",)):
        self.config, self.rt = config, runtime
        self.dataset, self.collate = dataset, collate
        self.loss_fn, self.count_fn = loss_fn, count_fn
        self.rollout_fn, self.reuse = rollout_fn, reuse
        self.pending, self.inner = None, 0  # the rollouts in use, and how many optimizer steps have used them
        self.rollout_seconds = 0.0
        self.out_weights = Path(out_weights)
        self.stem = self.out_weights.stem
        self.save_fn = save_fn
        # the weights' folder holds all the run writes: states, metrics, plot, DeepSpeed's state
        self.out_dir = self.out_weights.parent
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.states = StateFiles(self.out_dir, self.stem)
        self.log = RunLog(self.out_weights, metric_names, plot_keys)
        if config.accumulation_steps < 1 or config.batch_size < 1:
            raise TrainError("--batch_size and --accumulation_steps must be at least 1")
        if len(dataset) == 0:
            raise TrainError(f"{config.data_path}: the data file has no samples")

        seed_everything(config.seed)
        torch.manual_seed(config.seed + runtime.rank)  # dropout differs per rank; the data order does not use it
        self.model = model.to(runtime.device)
        if config.grad_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        params = [p for p in (trainable if trainable is not None else model.parameters()) if p.requires_grad]
        self.params = params
        self.global_batch = config.batch_size * config.accumulation_steps * runtime.world_size
        self.steps_per_epoch = math.ceil(len(dataset) / self.global_batch)
        self.total_steps = self.steps_per_epoch * config.epochs * reuse
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.flops_per_token = flops_per_token(model.config, active_parameters(model), config.max_seq_len)
        peak = config.peak_tflops
        if peak is None and runtime.device.type == "cuda":
            peak = peak_tflops(torch.cuda.get_device_name(runtime.device))
        self.peak_flops = peak * 1e12 * runtime.world_size if peak else None  # MFU only against a known peak
        self.ds_engine = None
        if config.deepspeed:
            self._init_deepspeed(params)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0,
                                               fused=runtime.device.type == "cuda")
            self.scaler = torch.amp.GradScaler(enabled=runtime.dtype == torch.float16)
            self.wrapped = torch.compile(model) if config.compile else model
            if runtime.distributed:
                from torch.nn.parallel import DistributedDataParallel
                ids = [runtime.device.index] if runtime.device.type == "cuda" else None
                self.wrapped = DistributedDataParallel(
                    self.wrapped, device_ids=ids, find_unused_parameters=bool(getattr(model.config, "use_moe", False)))
        self.settings = run_settings(config, model, params)
        self.partial_weights = self.out_weights.with_name(f"{self.stem}.partial{self.out_weights.suffix}")
        self.step, self.epoch, self.position, self.tokens_seen = 0, 0, 0, 0
        self.num_workers = default_workers(runtime.device) if config.num_workers is None else config.num_workers
        self._batches, self._batches_at = None, None
        self.saved_step = None
        self.state_step = None  # the step of the newest training state of this run on disk
        self.resumed = False  # set when --resume found a state (its "previous" state is then this run's too)
        self.stop_requested = 0  # the signal that asked to stop
        self.wandb = None

    # -- set-up helpers

    def _init_deepspeed(self, params):
        c, rt = self.config, self.rt
        if Path(c.deepspeed).is_file():
            config = json.loads(Path(c.deepspeed).read_text())
        elif c.deepspeed.isdigit():
            config = {"zero_optimization": {"stage": int(c.deepspeed)}}
        else:
            raise TrainError(f"--deepspeed {c.deepspeed}: neither a config file nor a ZeRO stage number")
        if config.get("zero_optimization", {}).get("stage", 0) >= 3:
            raise TrainError(f"--deepspeed {c.deepspeed}: ZeRO stage 3 is not supported (it partitions the weights "
                             "across processes and the weights saved would be empty); use stage 1 or 2")
        if c.compile:
            raise TrainError("--compile with --deepspeed is not supported; drop one of them")
        import deepspeed
        config.update(train_micro_batch_size_per_gpu=c.batch_size, gradient_accumulation_steps=c.accumulation_steps,
                      gradient_clipping=c.grad_clip, zero_allow_untested_optimizer=True)
        config.pop("train_batch_size", None)
        config["bf16"] = {"enabled": rt.dtype == torch.bfloat16}
        config["fp16"] = {"enabled": rt.dtype == torch.float16}
        optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=0.0)
        self.ds_engine, self.optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer,
                                                                    config=config)
        self.wrapped = self.ds_engine
        self.scaler = None

    def _install_signal_handlers(self):
        def request_stop(signum, frame):
            self.stop_requested = signum
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)

    # -- checkpointing

    def save(self, final=False):
        """The full state for --resume, and the weights: under the seed's name once training is finished, under
        `<stem>.partial.pth` before (the final name never holds a half-trained model). Rank 0 writes."""
        rt = self.rt
        rngs = [rng_state()]
        pending = [self._cpu(self.pending)]
        if rt.distributed:
            rngs, pending = [None] * rt.world_size, [None] * rt.world_size
            dist.all_gather_object(rngs, rng_state())
            if self.pending is not None:
                dist.all_gather_object(pending, self._cpu(self.pending))
        if self.ds_engine is not None:
            self.ds_engine.save_checkpoint(str(self.out_dir / f"{self.stem}.deepspeed"),
                                           tag="latest_state")
        if rt.is_main:
            state = {
                "format": STATE_FORMAT,
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": None if self.ds_engine is not None else self.optimizer.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "step": self.step, "epoch": self.epoch, "position": self.position, "tokens_seen": self.tokens_seen,
                "world_size": rt.world_size, "global_batch": self.global_batch,
                "total_steps": self.total_steps, "rng": rngs, "seed": self.config.seed,
                "deepspeed": self.ds_engine is not None, "settings": self.settings,
                "inner": self.inner, "pending": pending if self.pending is not None else None,
            }
            try:
                self.save_fn(self.model, self.out_weights if final else self.partial_weights)
                # the first save of a fresh run must not keep an earlier run's state as its "previous"
                self.states.save(state, keep_previous=self.resumed or self.saved_step is not None)
            except OSError as e:  # a WriteError naming the file, or the OS's own message
                raise TrainError(self._write_failure(e, state)) from None
            if final:
                for path in self.partial_paths():
                    remove(path)
        self.saved_step = self.state_step = self.step
        rt.barrier()

    def partial_paths(self):
        """Where save_fn puts weights given the partial name: the .pth and its .json, or a LoRA adapter folder."""
        p = self.partial_weights
        return [p, p.with_suffix(".json"), p.with_suffix("")]

    @staticmethod
    def written(weights):
        """What save_fn wrote for a weights name: the .pth, or the adapter folder a LoRA run writes instead."""
        return next((p for p in (weights, weights.with_suffix("")) if p.exists()), weights)

    def _write_failure(self, e, state=None):
        """One line: what could not be written (on a full disk, how much room it needed and had), and only true
        statements about what survives."""
        if getattr(self, "bar", None) is not None:
            self.bar.close()  # the error line goes below the progress bar, not onto it
        what = first_line(e)
        if getattr(e, "errno", None) == errno.ENOSPC:
            needed = tensor_bytes(state) + tensor_bytes(state["model"]) if state else 0  # the state and the weights
            what = f"cannot write {e.filename or self.out_dir}: {space_left(self.out_dir, needed)}"
        if self.state_step is None:
            return (f"{what}; no training state of this run was written before it: free "
                    f"space in {self.out_dir} and start the run again")
        return (f"{what}; the training state of step {self.state_step} ({self.states.latest}) is intact: free "
                "space and rerun with --resume")

    def try_resume(self):
        rt, c = self.rt, self.config
        state = self.states.load(rt.print)
        if state is None:
            if self.out_weights.exists():
                raise TrainError(f"--resume: no training state for {self.stem} in {self.out_dir}, but "
                                 f"{self.out_weights} exists; pass --fresh to train from the beginning and replace it")
            rt.print(f"resume: no training state for {self.stem} in {self.out_dir}; starting from the beginning")
            return
        check_settings(state, self.settings, self.total_steps, c.allow_changes, self.states.latest, rt.print)
        self.resumed = True
        self.model.load_state_dict(state["model"])
        if self.ds_engine is not None:
            folder = self.out_dir / f"{self.stem}.deepspeed"
            try:
                with deepspeed_weights_only():
                    self.ds_engine.load_checkpoint(str(folder), tag="latest_state", load_module_strict=False)
            except pickle.UnpicklingError as e:
                raise TrainError(f"--resume: cannot read the DeepSpeed state in {folder}: {first_line(e)} "
                                 "(refused: loading it could run code)") from None
        elif state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.state_step = self.step
        self.tokens_seen = state.get("tokens_seen", 0)
        self.inner = state.get("inner", 0)
        if state.get("pending") is not None and state["world_size"] == rt.world_size:
            batches, n_samples = state["pending"][rt.rank]
            self.pending = [(self._to_device(b), w) for b, w in batches], n_samples
        elif self.inner:
            rt.print(f"resume: the rollouts of step {self.step} were made by another process count; sampling anew")
            self.inner = 0
        if state["world_size"] == rt.world_size:
            set_rng_state(state["rng"][rt.rank])
        else:
            rt.print(f"resume: the state was written by {state['world_size']} process(es), this run has "
                     f"{rt.world_size}. The global sample order is unchanged and continues at sample "
                     f"{self.position} of epoch {self.epoch}; only the split of each step across processes "
                     f"and the global batch ({state['global_batch']} -> {self.global_batch}) change. "
                     "Random states are re-seeded per rank.")
            torch.manual_seed(c.seed + 1000 * self.step + rt.rank)
        rt.print(f"resume: continuing {self.stem} at step {self.step} (epoch {self.epoch}, sample {self.position})")
        if rt.is_main:
            self.log.truncate(self.step, rt.print)

    # -- the loop

    def _to_device(self, batch):
        return {k: v.to(self.rt.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    @staticmethod
    def _cpu(pending):
        if pending is None:
            return None
        batches, n_samples = pending
        return [({k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()}, w) for b, w in batches], n_samples

    def _my_chunks(self, order, position):
        """This rank's micro-batch index lists of the steps from `position` to the end of the epoch: (indices,
        weight), weight 0 (and the epoch's first sample as a stand-in) for the empty chunks of a short last step."""
        rt, c = self.rt, self.config
        while position < len(order):
            chunks = step_chunks(order, position, self.global_batch, c.accumulation_steps * rt.world_size)
            for m in range(c.accumulation_steps):
                chunk = chunks[m * rt.world_size + rt.rank]
                yield (chunk, 1.0) if chunk else (order[:1].tolist(), 0.0)
            position += self.global_batch

    def _loader(self, order):
        """This rank's micro-batches from the current position on, read, tokenized and collated ahead by
        --num_workers processes into pinned memory; the same batches in the same order whatever the worker count,
        so a resumed run sees exactly what the uninterrupted one saw."""
        workers = self.num_workers
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=(c for c, _ in self._my_chunks(order, self.position)),
            collate_fn=HostBatch(self.collate, None if self.rollout_fn else self.count_fn), num_workers=workers,
            pin_memory=self.rt.device.type == "cuda", prefetch_factor=4 if workers else None,
            worker_init_fn=quiet_worker if workers else None)
        return zip(loader, (w for _, w in self._my_chunks(order, self.position)))

    def _micro_batches(self, order):
        """This rank's micro-batches of the current step on the device: (batch, weight) with weight 0 for padding
        chunks."""
        rt, c = self.rt, self.config
        if self._batches is None or self._batches_at != (self.epoch, self.position):
            self._batches = self._loader(order)  # a new epoch, a resume, or a position set from outside
        batches = []
        for m in range(c.accumulation_steps):
            batch, weight = next(self._batches)
            batch = self._to_device(batch)
            if self.rollout_fn is not None:
                started = time.time()
                batch = self.rollout_fn(self.model, batch, rollout_seed(c.seed, self.step, rt.rank, m))
                self.rollout_seconds += time.time() - started
            batches.append((batch, weight))
        n_samples = len(order[self.position:self.position + self.global_batch])
        self._batches_at = (self.epoch, self.position + n_samples)
        return batches, n_samples

    def fit(self):
        """Train to the end; True when this run trained and wrote the final weights (a signal exits instead)."""
        try:
            return self._fit()
        finally:
            self._batches = None  # the loader's workers end now

    def _fit(self):
        c, rt = self.config, self.rt
        if c.continues:
            self.try_resume()
        elif rt.is_main:
            self.log.clear()
        self._install_signal_handlers()
        if c.use_wandb and rt.is_main:
            import wandb
            self.wandb = wandb.init(project=c.wandb_project, name=self.stem, config=c.flags())
        rt.print(f"{self.stem}: {len(self.dataset)} samples, global batch {self.global_batch} "
                 f"({rt.world_size} process(es) x {c.batch_size} x {c.accumulation_steps} accumulation), "
                 f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps in total, "
                 f"{sum(p.numel() for p in self.params) / 1e6:.3f}M trainable parameters, {rt.dtype_name} on {rt.device}")
        self.model.train()
        t0, tokens_since, tokens_pending, t_last = time.time(), 0, 0, time.time()
        steps_at_start = self.step
        self.bar = progress_bar(self.stem, self.total_steps, self.step, enabled=rt.is_main)
        while self.step < self.total_steps and self.epoch < c.epochs:
            order = epoch_order(len(self.dataset), c.seed, self.epoch)
            while self.position < len(order) and self.step < self.total_steps:
                step_metrics, n_tokens = self._train_step(order)
                tokens_pending += n_tokens  # on the device when distributed: read on logging and saving steps
                self.step += 1
                self.bar.update(1)
                log = self.step % c.log_interval == 0 or self.step == self.total_steps or self.step == 1
                stop = self._agree_to_stop()
                if log or stop or self.step % c.save_interval == 0:
                    n = int(tokens_pending)
                    self.tokens_seen += n
                    tokens_since += n
                    tokens_pending = 0
                if log:
                    metrics = self._reduce_metrics(step_metrics)
                    now = time.time()
                    tok_s = tokens_since / max(now - t_last, 1e-9)
                    done = self.step - steps_at_start
                    eta = (now - t0) / max(done, 1) * (self.total_steps - self.step)
                    self._log({**metrics, **self._performance(tok_s)}, tok_s, eta)
                    tokens_since, t_last = 0, now
                if stop and self.step < self.total_steps:  # (a stop at the last step lets the run finish)
                    self.bar.close()
                    self.save()
                    self._exit_interrupted(stop)
                if self.step % c.save_interval == 0 and self.step < self.total_steps:
                    self.save()
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        self.bar.close()
        self.tokens_seen += int(tokens_pending)
        if self.step == steps_at_start:
            rt.print(f"{self.stem}: nothing to train: the saved run is at step {self.step} of {self.total_steps} "
                     f"(raise --max_steps or --epochs to go on); nothing was written")
            return False
        self.save(final=True)
        if rt.is_main:
            self.log.plot()
            rt.print(f"{self.stem}: done in {time.time() - t0:.1f}s -> {self.written(self.out_weights)}")
        if self.wandb is not None:
            self.wandb.finish()
        return True

    def _agree_to_stop(self):
        """The signal that stops the run (0: go on); one rank's signal stops them all (agreed on the host)."""
        if not self.rt.distributed:
            return self.stop_requested
        return self.stop_requested or (signal.SIGTERM if self.rt.any_rank(self.stop_requested > 0) else 0)

    def _exit_interrupted(self, signum):
        """Exit as a shell expects of a process stopped by a signal (128 + its number: 130 for SIGINT, 143 for
        SIGTERM), so that `a && b` does not go on with a half-trained model."""
        if self.rt.is_main:
            print(f"{self.stem}: stopped by {signal.Signals(signum).name} at step {self.step} of "
                  f"{self.total_steps}: training state in {self.states.latest} (continue with --resume), "
                  f"partial weights in {self.written(self.partial_weights)}; "
                  f"{self.out_weights} was not written",
                  file=sys.stderr, flush=True)
        if self.wandb is not None:
            self.wandb.finish(exit_code=128 + signum)
        raise SystemExit(128 + signum)

    def _counts(self, batch, weight):
        """(loss count, input tokens) of a micro-batch: the loader's host counts, or for a batch made on the
        device (a rollout) counted there (a host sync, beside the many of sampling)."""
        count, tokens = batch[HOST_COUNTS] if HOST_COUNTS in batch else (self.count_fn(batch), input_tokens(batch))
        return count * weight, tokens * int(weight)

    def _train_step(self, order):
        """One optimizer step. Returns its metrics still on the device (numbers only through _reduce_metrics) and
        its input tokens over all ranks: an int, or a device tensor when distributed. No host sync in here for
        loader batches (fp16's GradScaler makes one, to skip a step whose gradients overflowed)."""
        c, rt = self.config, self.rt
        started, self.rollout_seconds = time.time(), 0.0
        lr = lr_at(self.step, self.total_steps, c.learning_rate, c.warmup_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.pending is None:
            self.pending = self._micro_batches(order)
        batches, n_samples = self.pending
        counted = [self._counts(b, w) for b, w in batches]
        local_count, n_tokens = sum(c for c, _ in counted), sum(t for _, t in counted)
        if rt.distributed:  # summed on the device: the step goes on without waiting for the result
            # queued from pinned memory: torch.tensor(..., device=cuda) would wait for the GPU's queue to drain
            totals = torch.tensor([local_count, n_tokens], dtype=torch.float64)
            totals = (totals.pin_memory() if rt.device.type == "cuda" else totals).to(rt.device, non_blocking=True)
            dist.all_reduce(totals)
            global_count, n_tokens = totals[0].clamp(min=1.0), totals[1]
            scale = (rt.world_size / global_count).float()
        else:
            global_count = max(local_count, 1)
            scale = 1.0 / global_count
        # each micro-batch's loss is its summed loss over the global count, so gradients (averaged across
        # ranks by DDP/DeepSpeed) equal those of one process seeing the whole global batch
        sums, counts = {}, {}

        def add(into, k, v, weight):
            into[k] = into.get(k, 0.0) + torch.as_tensor(v, device=rt.device).detach().double() * weight
        for i, (batch, weight) in enumerate(batches):
            last = i == len(batches) - 1
            sync = nullcontext() if (last or not rt.distributed or self.ds_engine is not None) \
                else self.wrapped.no_sync()
            with sync:
                loss_sum, aux, extra = self.loss_fn(self.wrapped, batch, rt.autocast)
                loss = loss_sum * scale * weight
                if aux is not None:
                    loss = loss + aux * weight / len(batches)
                if self.ds_engine is not None:
                    self.ds_engine.backward(loss, scale_wrt_gas=False)
                    self.ds_engine.step()
                else:
                    self.scaler.scale(loss).backward()
            for k, v in {"loss": loss_sum, **extra}.items():  # a (sum, count) pair is averaged over its own count
                total, count = v if isinstance(v, tuple) else (v, None)
                add(sums, k, total, weight)
                if count is not None:
                    add(counts, k, count, weight)
        if self.ds_engine is None:
            if c.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        times = {}
        if self.rollout_fn is not None:  # (rank 0's times)
            times = {"rollout_s": self.rollout_seconds, "step_s": time.time() - started}
        self.inner += 1
        if self.inner == self.reuse:
            self.position += n_samples
            self.pending, self.inner = None, 0
        return (sums, counts, global_count, lr, times), n_tokens

    def _reduce_metrics(self, step_metrics):
        """A step's metrics as numbers, summed over ranks and divided by the global count (or a pair's own
        count): a host sync, and a collective every rank joins, so fit() calls it on logging steps only."""
        sums, counts, global_count, lr, times = step_metrics
        keys, own = sorted(sums), sorted(counts)
        values = torch.stack([sums[k] for k in keys] + [counts[k] for k in own])
        if self.rt.distributed:
            dist.all_reduce(values)
        totals, count = values.tolist(), float(global_count)
        metrics = {k: v / count for k, v in zip(keys, totals)}
        for k, c in zip(own, totals[len(keys):]):
            metrics[k] = totals[keys.index(k)] / max(c, 1e-12)
        return {**metrics, "lr": lr, **times}

    def _performance(self, tok_s):
        """MFU (model FLOPs of the real tokens per second over the devices' peak, when it is known) and this
        process's peak memory: what the GPU holds at most, or on CPU the resident set."""
        out = {}
        if self.peak_flops:
            out["mfu"] = tok_s * self.flops_per_token / self.peak_flops
        if self.rt.device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.rt.device) / 2**30
        else:
            out["peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return out

    def _log(self, metrics, tok_s, eta):
        if not self.rt.is_main:
            return
        record = {"step": self.step, "epoch": self.epoch, **metrics, "tokens": self.tokens_seen,
                  "tokens_per_s": round(tok_s, 1), "time": round(time.time(), 3)}
        try:
            self.log.append(record)
        except OSError as e:
            raise TrainError(self._write_failure(e)) from None
        self.log.show(self.bar, metrics, f"step {self.step}/{self.total_steps} epoch {self.epoch + 1}/"
                      f"{self.config.epochs}", tok_s, eta)
        if self.wandb is not None:
            self.wandb.log(record, step=self.step)
