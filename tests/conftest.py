"""Shared pytest set-up: offline Hugging Face, a bounded thread count, and the repository root importable."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# the unit tests use tiny shapes: one thread avoids thread wake-ups that cost more than the maths
torch.set_num_threads(1)


def pytest_configure(config):
    # `pytest -m "not slow"` is the quick loop (under two minutes on two cores); CI runs everything
    config.addinivalue_line("markers", "slow: real launchers, server processes, the browser, benchmarks and the "
                            "end-to-end demo (minutes)")
