"""Where a training process runs: rank and world size, the device, the precision and its autocast context."""
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

from .device import DTYPES, DeviceError, auto_dtype, enable_tf32, resolve_device, use_tf32
from .errors import TrainError


class Runtime:
    """Rank, world size, device and precision of this process, from the --device, --dtype and --deepspeed
    settings (any object with those three fields; a TrainConfig in the engine)."""

    def __init__(self, config):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = self.world_size > 1
        self.is_main = self.rank == 0
        try:
            self.device = resolve_device(config.device)
        except DeviceError as e:
            raise TrainError(str(e)) from None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if use_tf32(torch.cuda.get_device_capability(self.device)):
                enable_tf32()
        if self.distributed and not dist.is_initialized():
            self._init_process_group(deepspeed=bool(config.deepspeed))
        # host-side agreements (stop on a signal) go over a CPU group: no wait for the GPU's queue
        self.host_group = (dist.new_group(backend="gloo") if self.distributed and self.device.type == "cuda"
                           else None)
        self.dtype_name = auto_dtype(self.device) if config.dtype == "auto" else config.dtype
        self.dtype = DTYPES[self.dtype_name]
        if self.dtype == torch.float16 and self.device.type == "cpu":
            raise TrainError("--dtype float16 needs a GPU; on CPU use bfloat16 or float32")
        # DeepSpeed runs the model in bf16/fp16 itself (from dtype): an autocast of ours would only add casts
        self.autocast = (nullcontext() if self.dtype == torch.float32 or config.deepspeed else
                         torch.autocast(device_type=self.device.type, dtype=self.dtype))

    def _init_process_group(self, deepspeed):
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if deepspeed:
            import deepspeed as ds
            if self.device.type == "cpu":
                # DeepSpeed's shared-memory allreduce kernel is compiled on first use (minutes on a small CPU);
                # plain gloo does the same job for models of this size
                ds.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            ds.init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend=backend)

    def any_rank(self, flag):
        """Whether any rank's flag is set, agreed on the host (a CPU collective, never a GPU sync)."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, group=self.host_group)
        return bool(t[0] > 0)

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def print(self, *a, **k):
        if self.is_main:
            print(*a, **k, flush=True)
