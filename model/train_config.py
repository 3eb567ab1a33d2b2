"""Every setting the training engine reads, as one typed value built from the parsed flags (cli.train_config)."""
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str  # where the stage's weights, training states, metrics and plot go
    data_path: str
    tokenizer: str
    device: str
    dtype: str  # auto, float32, bfloat16 or float16
    epochs: int
    batch_size: int  # samples per process per micro-batch
    learning_rate: float
    accumulation_steps: int
    grad_clip: float
    warmup_iters: int
    log_interval: int
    save_interval: int
    max_seq_len: int
    max_steps: Optional[int]
    seed: int
    num_workers: Optional[int]  # None: model.batching.default_workers
    resume: bool
    fresh: bool
    allow_changes: Optional[str]
    deepspeed: Optional[str]  # a DeepSpeed JSON file or a ZeRO stage number
    compile: bool
    grad_checkpointing: bool
    peak_tflops: Optional[float]
    use_wandb: bool
    wandb_project: str
    init: Optional[str] = None  # the starting checkpoint (None: the previous stage's in out_dir)
    shape: dict = field(default_factory=dict)  # the shape flags given (model.LMConfig.SHAPE_FLAGS)
    stage_flags: dict = field(default_factory=dict)  # the stage's own flags: recorded with the run, not read

    @property
    def continues(self):
        """Whether this run continues a saved one (--resume without --fresh)."""
        return self.resume and not self.fresh

    def flags(self):
        """Every flag of the run by name, as the command line gave them (the wandb record)."""
        flat = {k: v for k, v in asdict(self).items() if k not in ("shape", "stage_flags")}
        return {**flat, **self.shape, **self.stage_flags}
