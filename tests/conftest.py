"""Test setup: Triton runs in its CPU interpreter when there is no GPU (set before dla_fast imports it)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_full_fp32():
    """Fresh seed per test; on the GPU, fp32 convs/matmuls in true fp32 (TF32 off), so that fp32 parity means
    fp32 and not TF32 (dla_fast's fp32 GEMMs follow torch.backends.cudnn.allow_tf32 like eager convs)."""
    torch.manual_seed(0)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
