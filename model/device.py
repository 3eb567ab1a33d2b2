"""Which device, precision and FLOP/s peak a run gets: pure rules over the --device flag, the launcher's
environment and the GPU's compute capability, so that they are tested on machines without a GPU."""
import os
import re
from pathlib import Path

import torch

from .errors import UserError


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype names


class DeviceError(UserError, ValueError):
    """A --device that cannot be honoured on this machine: printed as one line."""


def resolve_device(flag, env=None, cuda_count=None, current=None):
    """The torch.device of this process. `cpu` stays; `cuda` is the current GPU (normally the first), or
    cuda:LOCAL_RANK when a launcher (torchrun, deepspeed) started this process; `cuda:N` stays. cuda_count and
    current default to what torch sees; env to os.environ."""
    env = os.environ if env is None else env
    try:
        device = torch.device(flag)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {flag!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_count == 0:
        built = f"torch built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only torch build"
        raise DeviceError(f"--device {flag} was asked for but no CUDA device is visible ({built}); use --device cpu")
    local_rank = env.get("LOCAL_RANK")
    processes = int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    if device.index is not None:
        if processes > 1:
            raise DeviceError(f"--device {flag} names one GPU but {processes} processes were launched on this "
                              "machine; pass --device cuda (each process then takes cuda:LOCAL_RANK)")
        index = device.index
    elif local_rank is not None:
        index = int(local_rank)
    else:
        index = torch.cuda.current_device() if current is None else current
    if index >= cuda_count:
        what = f"LOCAL_RANK {index}" if device.index is None and local_rank is not None else f"cuda:{index}"
        raise DeviceError(f"{what} asked for, but only {cuda_count} CUDA device(s) are visible "
                          f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return torch.device("cuda", index)


def native_bf16(capability):
    """bf16 tensor cores arrive with Ampere (sm_80); older GPUs (V100, T4) only emulate bf16, slowly."""
    return tuple(capability) >= (8, 0)


def cuda_dtype(capability):
    """--dtype auto on a GPU: bf16 where it is native, else fp16 (which the engine pairs with a GradScaler)."""
    return "bfloat16" if native_bf16(capability) else "float16"


def auto_dtype(device):
    """--dtype auto: bf16 where the hardware computes it natively (GPUs: sm_80 and newer, else fp16); on CPUs
    without bf16 units it is emulated and many times slower than fp32 (measured: a 2048x256x6400 matmul 33x
    slower on an AVX2-only CPU)."""
    if device.type == "cuda":
        return cuda_dtype(torch.cuda.get_device_capability(device))
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "float32"


def use_tf32(capability):
    """TF32 tensor cores for fp32 matmuls: Ampere and newer (same rule as native bf16)."""
    return native_bf16(capability)


def enable_tf32():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


# dense (no sparsity) bf16/fp16 tensor-core peak with fp32 accumulation, TFLOP/s, from the datasheets;
# the first pattern that matches torch.cuda.get_device_name() wins
PEAK_TFLOPS = [
    (r"B200", 2250), (r"H200", 989), (r"H100.*PCIe", 756), (r"H100.*NVL", 835), (r"H100|H800", 989),
    (r"A100|A800", 312), (r"L40S", 362), (r"\bL40\b", 181), (r"\bL4\b", 121), (r"\bA10\b", 125),
    (r"RTX A6000", 155), (r"RTX 6000 Ada", 364), (r"RTX 4090", 165), (r"RTX 3090 Ti", 80), (r"RTX 3090", 71),
    (r"V100", 125), (r"\bT4\b", 65),
]


def peak_tflops(name):
    """The table's dense bf16/fp16 peak for a GPU name, or None when the table does not know it."""
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, name):
            return tflops
    return None


def flops_per_token(config, n_params, seq):
    """Training FLOPs per token for MFU: 6 N for the weight matmuls (forward + backward) plus 12 L T d for
    attention scores and values (the PaLM convention: full T x T, causal masking not subtracted)."""
    return 6 * n_params + 12 * config.n_layers * seq * config.dim


def active_parameters(model):
    """Parameters one token passes through: all of a dense model; a mixture of experts counts only its
    num_experts_per_tok routed experts out of n_routed_experts (the shared ones always run)."""
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    if not getattr(config, "use_moe", False):
        return total
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total - routed + routed * config.num_experts_per_tok // config.n_routed_experts
