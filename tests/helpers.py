"""Shared helpers for the parity tests (see ../shared GUIDE: what counts as parity)."""
import contextlib
import warnings

import torch
import torch.nn as nn


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref|, in float64; NaN anywhere counts as infinite error."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if torch.isnan(out).any() or torch.isnan(ref).any():
        return float("inf")
    scale = ref.abs().max().item()
    diff = (out - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def randomize_bn(model: nn.Module, generator: torch.Generator = None) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics (never 0/1)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                c = m.num_features
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=generator) * 1.5 + 0.25)
                    m.bias.copy_(torch.randn(c, generator=generator) * 0.2)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(c, generator=generator) * 0.2)
                    m.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                    m.num_batches_tracked.fill_(int(torch.randint(1, 100, (1,), generator=generator)))
    return model


def assert_close(out, ref, tol: float, what: str = "output"):
    err = rel_err(out, ref)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


@contextlib.contextmanager
def poisoned_allocations():
    """Every torch.empty / at::empty made inside is NaN-filled (deterministic mode's uninitialised-memory fill),
    so an output element a kernel leaves unwritten shows as NaN. Deterministic mode is on with warn_only=True,
    and the warnings of nondeterministic kernels (the deformable conv's input gradient) are silenced: this is
    about poisoning, not determinism."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(4).isnan().all(), "allocation poisoning is not active"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation")
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = previous[2]


def assert_same_buffers(fused: nn.Module, ref: nn.Module, where: str) -> None:
    """Every buffer of `fused` equals `ref`'s of the same name: floating point within 1e-5 relative (running
    statistics), integers exactly (num_batches_tracked)."""
    ref_buffers = dict(ref.named_buffers())
    for name, b in fused.named_buffers():
        if b.dtype.is_floating_point:
            assert_close(b, ref_buffers[name], 1e-5, f"{where}: {name}")
        else:
            assert torch.equal(b, ref_buffers[name]), f"{where}: {name}"


class LaunchCounter:
    """Names of the Triton kernels launched while it is installed (interpreter or GPU)."""

    def __init__(self, monkeypatch):
        self.names = []
        if torch.cuda.is_available():
            from triton.runtime.jit import JITFunction as kernel_class
        else:
            from triton.runtime.interpreter import InterpretedFunction as kernel_class
        original = kernel_class.run
        names = self.names

        def counting_run(self, *args, **kwargs):
            names.append(self.fn.__name__)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(kernel_class, "run", counting_run)


def assert_same_non_finite(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    """NaN, +Inf and -Inf at exactly the reference's elements, and the finite elements within `tol` relative
    (max|out - ref| / max|ref| over the elements finite in both)."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    for name, pattern in (("NaN", torch.isnan), ("+Inf", lambda t: t == float("inf")),
                          ("-Inf", lambda t: t == float("-inf"))):
        got, expected = pattern(out), pattern(ref)
        assert torch.equal(got, expected), (f"{what}: {name} at {int(got.sum())} elements, the reference at "
                                            f"{int(expected.sum())} ({int((got != expected).sum())} differ)")
    finite = torch.isfinite(ref)
    if finite.any():
        assert_close(out[finite], ref[finite], tol, what)


# Deformable-conv tiles for the interpreter: its cost is per K-chunk loop step, so wide tiles make a whole DCN
# model affordable on CPU (set through dla_fast.ops.deform_conv.launch.TILE_OVERRIDES; the kernels' defaults are
# what the GPU runs and what the op-level tests check)
WIDE_DCN_TILES = dict(fwd=(128, 256, 128), grad_sample=(128, 128, 256), grad_weight=(128, 256, 128))
