"""The compiled extension dla_fast._C: it imports, says how it was built, registers its ops with the
dispatcher, and rejects bad arguments with clear TORCH_CHECK messages."""
import pytest
import torch

from dla_fast import backend

BUILT, DETAIL = backend.extension_status()
pytestmark = pytest.mark.skipif(
    not BUILT, reason=f"dla_fast._C is {DETAIL}: build it with DLA_FAST_FORCE_CUDA=1 pip install "
    "--no-build-isolation -e .")

BATCHNORM_OPS = ("bn_channel_stats", "bn_apply", "bn_backward_reduce", "bn_backward_apply")


def ops():
    from dla_fast import _C  # noqa: F401

    return torch.ops.dla_fast_C


def test_imports_and_reports_cuda_kernels():
    from dla_fast import _C

    # setup.py builds the extension only as a CUDAExtension (.cpp + .cu, -DWITH_CUDA).
    assert _C.has_cuda() is True
    assert backend.unavailable_reason("cuda", torch.device("cpu")) is None
    assert DETAIL == "built with CUDA kernels"


@pytest.mark.parametrize("name", BATCHNORM_OPS)
def test_batchnorm_ops_registered_for_cpu_and_cuda(name):
    op = getattr(ops(), name).default
    assert op._schema.name == f"dla_fast_C::{name}"
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), f"{name} has no {key} kernel"


def _rows(m=6, c=5, dtype=torch.float32, device="cpu"):
    return torch.randn(m, c, dtype=dtype, device=device)


def _vec(c=5, device="cpu"):
    return torch.rand(c, device=device) + 0.5


BAD_APPLY_ARGS = [  # (what to change in good bn_apply arguments, expected message)
    pytest.param(dict(y=torch.randn(2, 3, 5)), "bn_apply: y must be a 2-D", id="3-D y"),
    pytest.param(dict(y=torch.randn(5, 6).t()), "bn_apply: y must be contiguous", id="transposed y"),
    pytest.param(dict(y=torch.randn(6, 5, dtype=torch.float64)), "y must be float32, float16 or bfloat16",
                 id="fp64 y"),
    pytest.param(dict(mean=torch.rand(5, dtype=torch.float16)), "mean must be a float32 per-channel vector",
                 id="fp16 mean"),
    pytest.param(dict(var=torch.rand(4)), r"var must have shape \[5\]", id="var channels"),
    pytest.param(dict(weight=torch.rand(7)), r"weight must have shape \[5\]", id="weight channels"),
    pytest.param(dict(residual=torch.randn(6, 5, dtype=torch.float16)), "residual has dtype Half but y has dtype",
                 id="residual dtype"),
    pytest.param(dict(residual=torch.randn(7, 5)), "residual has shape", id="residual rows"),
    pytest.param(dict(out=torch.empty(6, 4)), "out has shape", id="out shape"),
]


@pytest.mark.parametrize("change, message", BAD_APPLY_ARGS)
def test_bn_apply_argument_checks(change, message):
    args = dict(y=_rows(), mean=_vec(), var=_vec(), weight=None, bias=None, eps=1e-5, residual=None, relu=True,
                out=torch.empty(6, 5))
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        ops().bn_apply(*args.values())


def test_reduction_argument_checks():
    y, g = _rows(), _rows()
    with pytest.raises(RuntimeError, match="bn_channel_stats: y has no rows"):
        ops().bn_channel_stats(torch.empty(0, 5), _vec(), _vec())
    with pytest.raises(RuntimeError, match="relu=True needs the forward output"):
        ops().bn_backward_reduce(g, None, y, _vec(), _vec(), 1e-5, True, _vec(), _vec())
    with pytest.raises(RuntimeError, match="give both sum_g and sum_g_xhat"):
        ops().bn_backward_apply(g, None, y, _vec(), _vec(), None, _vec(), None, 1e-5, False, torch.empty_like(y), None)
    with pytest.raises(RuntimeError, match="grad_residual has dtype"):
        ops().bn_backward_apply(g, None, y, _vec(), _vec(), None, None, None, 1e-5, False, torch.empty_like(y),
                                torch.empty(6, 5, dtype=torch.bfloat16))


@pytest.mark.cuda
def test_device_mismatch_is_named():
    y = _rows(device="cuda")
    with pytest.raises(RuntimeError, match="bn_apply: mean is on cpu but the activations are on cuda"):
        ops().bn_apply(y, _vec(), _vec(device="cuda"), None, None, 1e-5, None, True, torch.empty_like(y))
    with pytest.raises(RuntimeError, match="bn_apply: residual is on cpu but y is on cuda"):
        ops().bn_apply(y, _vec(device="cuda"), _vec(device="cuda"), None, None, 1e-5, _rows(), True,
                       torch.empty_like(y))
