"""Backend selection: the API, the environment variable, auto, and clear errors instead of silent fallbacks."""
import os
import subprocess
import sys

import pytest
import torch

import dla_fast
from dla_fast import backend

CPU = torch.device("cpu")


def test_set_backend_and_nested_use_backend():
    assert dla_fast.get_backend() == "auto"
    try:
        dla_fast.set_backend("torch")
        assert dla_fast.get_backend() == "torch"
        with dla_fast.use_backend("triton"):
            assert dla_fast.get_backend() == "triton"
            with dla_fast.use_backend("CUDA"):
                assert dla_fast.get_backend() == "cuda"
            assert dla_fast.get_backend() == "triton"
        assert dla_fast.get_backend() == "torch"
    finally:
        dla_fast.set_backend(None)
    assert dla_fast.get_backend() == "auto"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown dla_fast backend 'tritonn'; choose one of auto, torch, triton, cuda"):
        dla_fast.set_backend("tritonn")
    with pytest.raises(ValueError, match="unknown dla_fast backend"):
        with dla_fast.use_backend("fast"):
            pass


def test_environment_variable_sets_the_default():
    code = "import dla_fast; print(dla_fast.get_backend())"
    env = dict(os.environ, DLA_FAST_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["DLA_FAST_BACKEND"] = "nope"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "DLA_FAST_BACKEND='nope'" in bad.stderr


def test_auto_runs_eager_on_cpu_and_torch_always_eager():
    with dla_fast.use_backend("auto"):
        assert backend.resolve(CPU, "aggregate") == "torch"
    with dla_fast.use_backend("torch"):
        assert backend.resolve(CPU, "aggregate") == "torch"


def test_auto_on_cuda_picks_the_measured_implementation(monkeypatch):
    """auto on CUDA tensors: AUTO_CHOICE per op, Triton when the extension is missing, never eager."""
    gpu = torch.device("cuda")
    monkeypatch.setattr(backend, "_EXTENSION_STATUS", [(True, "built with CUDA kernels", True)])
    with dla_fast.use_backend("auto"):
        assert backend.resolve(gpu, "batchnorm_act") == "cuda"
        assert backend.resolve(gpu, "aggregate") == "triton"
        monkeypatch.setattr(backend, "_EXTENSION_STATUS", [(False, "not built (test)", False)])
        assert backend.resolve(gpu, "batchnorm_act") == "triton"


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with dla_fast.use_backend("triton"), pytest.raises(dla_fast.BackendUnavailable,
                                                         match=r"'triton' cannot run for op 'aggregate'.*TRITON_INTERPRET"):
        backend.resolve(CPU, "aggregate")
    monkeypatch.setattr(backend, "_EXTENSION_STATUS", [(False, "not built (test)", False)])
    with dla_fast.use_backend("cuda"), pytest.raises(dla_fast.BackendUnavailable, match="dla_fast._C is not built"):
        backend.resolve(CPU, "batchnorm_act")


def test_available_backends_reports_every_name():
    report = dla_fast.available_backends()
    assert list(report) == ["auto", "torch", "triton", "cuda"]
    assert report["torch"] is None and report["auto"] is None


def test_aggregate_needs_triton_for_its_gemm_whatever_the_backend(monkeypatch):
    """Backend 'cuda' runs the BatchNorm steps in the extension but the GEMM in Triton: on CPU tensors without the
    interpreter that is a BackendUnavailable, not a crash inside Triton."""
    from dla_fast.ops.aggregate import aggregate

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backend, "_EXTENSION_STATUS", [(True, "built (CPU kernels only)", False)])
    kids = [torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)]
    with dla_fast.use_backend("cuda"), pytest.raises(dla_fast.BackendUnavailable, match="GEMM runs in Triton"):
        aggregate(kids, torch.randn(4, 8, 1, 1), torch.ones(4), torch.zeros(4))
