"""The GPU path on a real GPU (skipped without one; bench/gpu_check.sh runs them): device resolution, no host sync
in a training step, loader workers, --compile, bf16 serving with flash prefill and batched sampling."""
import sys

import pytest
import torch

from test_gpu_path import Rows, make_trainer, metrics, mixed_requests, tiny_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_trainer(tmp_path, *flags, dataset=None):
    return make_trainer(tmp_path, "--device", "cuda", "--dtype", "auto", *flags, dataset=dataset)


def test_plain_cuda_resolves_and_picks_the_precision(tmp_path):
    t = cuda_trainer(tmp_path)
    assert t.rt.device == torch.device("cuda", torch.cuda.current_device())
    major, _ = torch.cuda.get_device_capability()
    assert t.rt.dtype == (torch.bfloat16 if major >= 8 else torch.float16)
    assert torch.backends.cuda.matmul.allow_tf32 == (major >= 8)
    assert t.optimizer.defaults["fused"] is True


def test_no_host_sync_in_a_quiet_training_step(tmp_path, monkeypatch):
    """CUDA's own sync detector, set to raise, around every step that does not log (bf16: no GradScaler)."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("fp16 steps sync once by design (the GradScaler's overflow check)")
    from model import trainer as T
    real_step, quiet = T.Trainer._train_step, []

    def train_step(self, order):
        if (self.step + 1) % self.config.log_interval and self.step > 0:
            torch.cuda.set_sync_debug_mode("error")
            quiet.append(self.step + 1)
        try:
            return real_step(self, order)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setattr(T.Trainer, "_train_step", train_step)
    t = cuda_trainer(tmp_path, "--log_interval", "5", "--max_steps", "9", "--num_workers", "2",
                     "--accumulation_steps", "2", "--epochs", "3")
    t.fit()
    assert quiet == [2, 3, 4, 6, 7, 8]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 5, 9]


def test_compiled_bf16_training_learns_and_reports_mfu(tmp_path):
    t = cuda_trainer(tmp_path, "--log_interval", "1", "--max_steps", "30", "--compile", "--batch_size", "8",
                     "--epochs", "10", "--learning_rate", "1e-2", dataset=Rows(length=32, n=16))
    t.fit()
    rows = metrics(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert rows[-1]["peak_mem_gib"] > 0
    from model.device import peak_tflops
    if peak_tflops(torch.cuda.get_device_name()):
        assert 0 < rows[-1]["mfu"] < 1


def test_serving_in_bf16_with_flash_prefill_and_batched_sampling():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    answers = {}
    for batched in (False, True):
        engine = tiny_engine(batched, device="cuda", dtype=torch.bfloat16)
        reqs = mixed_requests(engine)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if prefill handed SDPA a mask
            engine.add_many(reqs)
        while engine.active:
            engine.step()
        answers[batched] = [r.token_ids for r in reqs]
    assert answers[True] == answers[False]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
