"""BatchNorm bookkeeping shared by the fused ops, exactly as `torch.nn.BatchNorm2d` does it.

The fused kernels return the batch mean and the biased batch variance; the running statistics are then
updated here with plain in-place tensor ops (traceable by torch.compile, capturable in CUDA graphs).
"""
from __future__ import annotations

from typing import Optional

import torch

from .common import check_channel_vectors


def uses_batch_stats(training: bool, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor]) -> bool:
    """nn.BatchNorm2d normalizes with batch statistics in training, or when it tracks no running stats."""
    return training or (running_mean is None and running_var is None)


def update_running_stats(running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                         num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float],
                         batch_mean: torch.Tensor, batch_var: torch.Tensor, count: int) -> None:
    """Fold one batch's statistics into the running ones (a no-op without running statistics).

    batch_var is the biased variance the batch was normalized with; the running variance takes the
    unbiased one (times count / (count - 1)). momentum=None is the cumulative average 1 / batches seen.
    `count` is the number of values per channel (N*H*W). The batch statistics are detached (not a
    `torch.no_grad()` block: torch.export records one as a grad-mode region that a saved train-mode
    ExportedProgram could not load back).
    """
    if running_mean is None or running_var is None:
        return
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if count == 0:  # an empty batch counts as seen but leaves the statistics alone, as in PyTorch
        return
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / num_batches_tracked.item()
    else:
        factor = momentum
    running_mean.mul_(1.0 - factor).add_(batch_mean.detach().to(running_mean.dtype), alpha=factor)
    unbiased = batch_var.detach().to(running_var.dtype) * (count / (count - 1))
    running_var.mul_(1.0 - factor).add_(unbiased, alpha=factor)


def check_batch_size(count: int, num_channels: int) -> None:
    """nn.BatchNorm2d's error for a batch of one value per channel in training."""
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input with {count} value "
                         f"per channel ({num_channels} channels)")


def check_batchnorm_args(op: str, x_dtype: torch.dtype, channels: int, count: int, device: torch.device, *,
                         weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                         num_batches_tracked: Optional[torch.Tensor], training: bool, momentum: Optional[float],
                         eps: float, synchronized: bool = False) -> None:
    """nn.BatchNorm2d's argument rules for activations of `x_dtype` with `channels` channels and `count` values
    per channel, raised the same way on every backend (ValueError/TypeError naming the argument; PyTorch's
    messages for the batch size and eps):

    - weight, bias, running_mean, running_var: shape (channels,) on `device`, floating point, of the
      activations' dtype or float32 (16-bit activations with fp32 statistics, as under autocast);
    - running_mean and running_var both given or both None; num_batches_tracked one element on `device`;
    - batch statistics (training, or no running statistics): more than one value per channel (unless
      `synchronized`: the statistics are then the process group's, as nn.SyncBatchNorm), eps > 0;
      running statistics: eps >= 0;
    - momentum a number in training with running statistics, or None with num_batches_tracked (the cumulative
      average counts the batches).
    """
    vectors = dict(weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    check_channel_vectors(op, channels, device, **vectors)
    allowed = {x_dtype, torch.float32} if x_dtype in (torch.float16, torch.bfloat16) else {x_dtype}
    for name, v in vectors.items():
        if v is not None and v.dtype not in allowed:
            raise TypeError(f"{op}: {name} has dtype {v.dtype}; with {x_dtype} activations it must be "
                            f"{' or '.join(sorted(str(t) for t in allowed))}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: give both running_mean and running_var, or neither")
    if num_batches_tracked is not None and (not isinstance(num_batches_tracked, torch.Tensor)
                                            or num_batches_tracked.numel() != 1
                                            or num_batches_tracked.device != device):
        raise ValueError(f"{op}: num_batches_tracked must be a one-element tensor on {device}, got "
                         f"{tuple(getattr(num_batches_tracked, 'shape', ()))} on "
                         f"{getattr(num_batches_tracked, 'device', type(num_batches_tracked).__name__)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a number, got {type(eps).__name__}")
    batch_stats = uses_batch_stats(training, running_mean, running_var)
    if batch_stats:
        if not synchronized:
            check_batch_size(count, channels)
        if eps <= 0.0:  # PyTorch's F.batch_norm rules and messages
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if training and running_mean is not None:
        if momentum is None:
            if num_batches_tracked is None:
                raise ValueError(f"{op}: momentum=None (cumulative average) needs num_batches_tracked")
        elif isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            raise TypeError(f"{op}: momentum must be a number or None, got {type(momentum).__name__}")
