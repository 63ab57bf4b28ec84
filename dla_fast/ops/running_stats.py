"""BatchNorm bookkeeping shared by the fused ops, exactly as `torch.nn.BatchNorm2d` does it.

The fused kernels return the batch mean and the biased batch variance; the running statistics are then
updated here with plain in-place tensor ops (traceable by torch.compile, capturable in CUDA graphs).
"""
from __future__ import annotations

from typing import Optional

import torch


def uses_batch_stats(training: bool, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor]) -> bool:
    """nn.BatchNorm2d normalizes with batch statistics in training, or when it tracks no running stats."""
    return training or (running_mean is None and running_var is None)


@torch.no_grad()
def update_running_stats(running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                         num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float],
                         batch_mean: torch.Tensor, batch_var: torch.Tensor, count: int) -> None:
    """Fold one batch's statistics into the running ones (a no-op without running statistics).

    batch_var is the biased variance the batch was normalized with; the running variance takes the
    unbiased one (times count / (count - 1)). momentum=None is the cumulative average 1 / batches seen.
    `count` is the number of values per channel (N*H*W).
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
    running_mean.mul_(1.0 - factor).add_(batch_mean.to(running_mean.dtype), alpha=factor)
    unbiased = batch_var.to(running_var.dtype) * (count / (count - 1))
    running_var.mul_(1.0 - factor).add_(unbiased, alpha=factor)


def check_batch_size(count: int, num_channels: int) -> None:
    """nn.BatchNorm2d's error for a batch of one value per channel in training."""
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input with {count} value "
                         f"per channel ({num_channels} channels)")
