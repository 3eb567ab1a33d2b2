"""Device, precision and peak rules without a GPU: the functions are pure over the flag, the launcher's
environment and the GPU's capability."""
import pytest
import torch

from model.device import DeviceError, cuda_dtype, peak_tflops, resolve_device, use_tf32


def test_cpu_stays_cpu_whatever_the_launcher_says():
    assert resolve_device("cpu", env={}, cuda_count=0) == torch.device("cpu")
    assert resolve_device("cpu", env={"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, cuda_count=4) == torch.device("cpu")


def test_plain_cuda_is_the_current_gpu_with_an_index():
    # torch.cuda.set_device refuses a device without an index: the resolved one always has it
    assert resolve_device("cuda", env={}, cuda_count=1, current=0) == torch.device("cuda", 0)
    assert resolve_device("cuda", env={}, cuda_count=2, current=1) == torch.device("cuda", 1)


def test_an_explicit_gpu_stays():
    assert resolve_device("cuda:1", env={}, cuda_count=2, current=0) == torch.device("cuda", 1)
    # torchrun with one process may name its GPU
    env = {"LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    assert resolve_device("cuda:1", env=env, cuda_count=2, current=0) == torch.device("cuda", 1)


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_torchrun_ranks_take_their_local_rank(rank):
    env = {"LOCAL_RANK": str(rank), "RANK": str(rank + 4), "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert resolve_device("cuda", env=env, cuda_count=4, current=0) == torch.device("cuda", rank)


def test_torchrun_with_one_process_on_one_gpu():
    env = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    assert resolve_device("cuda", env=env, cuda_count=1, current=0) == torch.device("cuda", 0)


@pytest.mark.parametrize("flag, env, count, expected", [
    ("cuda", {}, 0, "no CUDA device is visible"),
    ("cuda:0", {}, 0, "no CUDA device is visible"),
    ("cuda:2", {}, 2, "cuda:2 asked for, but only 2 CUDA device(s)"),
    ("cuda", {"LOCAL_RANK": "2", "WORLD_SIZE": "3"}, 2, "LOCAL_RANK 2 asked for, but only 2"),
    ("cuda:1", {"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, 2, "names one GPU but 2 processes"),
    ("gpu", {}, 1, "is not a device"),
])
def test_impossible_requests_are_one_line(flag, env, count, expected):
    with pytest.raises(DeviceError) as e:
        resolve_device(flag, env=env, cuda_count=count, current=0)
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("capability, dtype, tf32", [
    ((7, 0), "float16", False),   # V100: bf16 only emulated
    ((7, 5), "float16", False),   # T4
    ((8, 0), "bfloat16", True),   # A100
    ((8, 6), "bfloat16", True),   # RTX 3090
    ((8, 9), "bfloat16", True),   # RTX 4090, L4
    ((9, 0), "bfloat16", True),   # H100
    ((10, 0), "bfloat16", True),  # B200
])
def test_precision_follows_the_compute_capability(capability, dtype, tf32):
    assert cuda_dtype(capability) == dtype
    assert use_tf32(capability) == tf32


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA GeForce RTX 3090", 71), ("NVIDIA GeForce RTX 3090 Ti", 80),
    ("NVIDIA GeForce RTX 4090", 165), ("NVIDIA L4", 121), ("NVIDIA L40S", 362), ("Tesla T4", 65),
    ("Some Future GPU", None),
])
def test_peak_table(name, tflops):
    assert peak_tflops(name) == tflops


def test_cuda_on_a_machine_without_one_is_one_line_from_the_runtime():
    from types import SimpleNamespace
    from model.errors import TrainError
    from model.runtime import Runtime
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(TrainError, match="no CUDA device is visible"):
        Runtime(SimpleNamespace(device="cuda", dtype="auto", deepspeed=None))


def test_runtime_on_a_simulated_one_gpu_machine(monkeypatch):
    """The launch that crashed: `--device cuda` on one GPU. set_device gets an indexed device (torch's own
    index rule applied), bf16 and TF32 follow the capability."""
    from types import SimpleNamespace
    from torch._utils import _get_device_index
    from model import runtime
    calls = []
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(_get_device_index(d)))
    for capability, dtype, tf32 in (((8, 6), "bfloat16", True), ((7, 5), "float16", False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        monkeypatch.setattr(runtime, "enable_tf32", lambda: calls.append("tf32"))
        monkeypatch.setattr(runtime.torch, "autocast", lambda **k: k)
        calls.clear()
        rt = runtime.Runtime(SimpleNamespace(device="cuda", dtype="auto", deepspeed=None))
        assert rt.device == torch.device("cuda", 0) and rt.dtype_name == dtype
        assert calls == [0, "tf32"] if tf32 else calls == [0]
