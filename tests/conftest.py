"""Test setup: Triton runs in its CPU interpreter when there is no GPU (set before dla_fast imports it)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


# Test files that build and run whole networks (minutes each on 2 CPU cores, mostly Triton's interpreter) run
# after the op-level files, and `slow`-marked tests last of all: pytest's progress starts with the quick tests
# instead of sitting on one dot for minutes (a grouping by kind of test, not a measured order).
MODEL_LEVEL_FILES = ("test_accelerate.py", "test_accelerate_op_kinds.py", "test_centernet.py",
                     "test_centertrack.py", "test_compile.py", "test_cuda_graph_training.py", "test_deploy.py",
                     "test_dla_up.py", "test_folded.py", "test_memory_efficient.py", "test_reliability_models.py",
                     "test_sync_batchnorm.py", "test_timm_api.py")


# Started first: the AOT sm_90 check is one subprocess compiling for minutes, printing nothing; begun first, it runs
# beside the quick tests of the other pytest-xdist worker instead of being the last thing CI waits for.
FIRST_FILES = ("test_aot_sm90.py",)


def _run_order(item) -> int:
    if item.path.name in FIRST_FILES:
        return -1
    if item.get_closest_marker("slow") is not None:
        return 2
    return 1 if item.path.name in MODEL_LEVEL_FILES else 0


def pytest_collection_modifyitems(config, items):
    items.sort(key=_run_order)  # stable: file and definition order within each group
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
