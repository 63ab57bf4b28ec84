"""Shared helpers for the parity tests (see ../shared GUIDE: what counts as parity)."""
import contextlib

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
    so an output element a kernel leaves unwritten shows as NaN."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(4).isnan().all(), "allocation poisoning is not active"
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.utils.deterministic.fill_uninitialized_memory = previous[1]
