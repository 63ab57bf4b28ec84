"""Synchronized BatchNorm for the fused ops: the collectives of `nn.SyncBatchNorm`, kept out of the kernels.

A fused op that computes batch statistics (aggregate, batchnorm_act) runs with `sync=True` for a BatchNorm that
is an `nn.SyncBatchNorm` (its `process_group`, None meaning the whole world). Everything collective is here:

- `sync_group(sync, process_group, training)`: the group to synchronize over, or None to run as plain
  BatchNorm, decided exactly as `nn.SyncBatchNorm.forward` of torch 2.14 does: only in training, only with
  torch.distributed available and initialized, and only when the group has more than one rank (a rank outside
  the group sees world size -1 and also runs plain BatchNorm). Unlike nn.SyncBatchNorm, CPU tensors are
  accepted (gloo), so the fused paths and their eager reference also run on CPU.
- forward, between the statistics kernel and the normalize pass: `merge_batch_stats(mean, var, count, group)`
  all-gathers every rank's (count, mean, M2 = var * count) per channel and merges them with Chan's formula in
  rank order (fp64, the same result on every rank; ranks with an empty batch contribute count 0), giving the
  global mean and biased variance, and the global count as a tensor (no host synchronization).
  `update_running_stats(...)` then folds them into the running statistics with the global count, as
  `torch.batch_norm_gather_stats_with_counts` does (unbiased variance var * N / (N - 1)).
- backward, before the input-gradient pass: `all_reduce_grad_sums(sum_g, sum_g_xhat, group, count,
  total_count)` sums the two per-channel reductions over the group (one all-reduce). The input-gradient
  kernels divide these sums by the local row count M; with synchronization the divisor is the global count N,
  so the summed values are returned pre-scaled by M / N and the kernels run unchanged. The gradients of the
  BatchNorm's weight and bias stay local (DistributedDataParallel all-reduces them), as in nn.SyncBatchNorm.
- `check_channels(channels, group, device)`: every rank must normalize the same number of channels; a mismatch
  raises ValueError on every rank (one small all-reduce) instead of corrupting or hanging the all-gather.
- `sync_batch_norm_reference(...)`: the eager reference of synchronized BatchNorm (two-pass global mean and
  variance through an autograd-aware all-reduce); backend 'torch' runs it.

Every rank of the group must call the fused op the same number of times in the same order (as with
nn.SyncBatchNorm), including ranks whose local batch is empty: their statistics count 0 and their backward
still takes part in the all-reduce.

torch.compile: the collectives here are eager torch.distributed calls, which dynamo does not trace inside the
ops; the public ops run their synchronized path through `torch.compiler.disable` (a graph break: the
synchronized BatchNorm runs eagerly, the rest of the model stays compiled). Unsynchronized calls (plain
BatchNorm, eval, no process group) are unaffected.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist


def sync_group(sync: bool, process_group, training: bool):
    """The process group a SyncBatchNorm synchronizes over in this call, or None to run as plain BatchNorm.

    sync: the BatchNorm is an nn.SyncBatchNorm; process_group: its process_group (None: the whole world).
    """
    if not (sync and training and dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def _all_gather_rows(payload: torch.Tensor, group) -> torch.Tensor:
    """[world, L]: every rank's 1-D payload (same length on all ranks), in rank order."""
    world = dist.get_world_size(group)
    if dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor
        rows = [torch.empty_like(payload) for _ in range(world)]
        dist.all_gather(rows, payload, group=group)
        return torch.stack(rows)
    gathered = payload.new_empty(world * payload.numel())
    dist.all_gather_into_tensor(gathered, payload, group=group)
    return gathered.view(world, -1)


def check_channels(channels: int, group, device: torch.device) -> None:
    """Raise ValueError on every rank when the ranks of `group` normalize different numbers of channels.
    device: where the group's collectives run (the activations' device). Skipped while a CUDA graph is being
    captured (the check reads the result on the host, which capture forbids; the eager steps before it ran it)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    bounds = torch.tensor([channels, -channels], dtype=torch.int64, device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=group)
    largest, smallest = int(bounds[0]), -int(bounds[1])
    if largest != smallest:
        raise ValueError(f"SyncBatchNorm: the ranks of the process group normalize different numbers of "
                         f"channels (between {smallest} and {largest}; this rank {channels}); every rank must "
                         "run the same model")


def merge_batch_stats(mean: torch.Tensor, var: torch.Tensor, count: int, group
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(global mean, global biased var, global count) over the ranks of `group`.

    mean, var: this rank's batch mean and biased variance, fp32 [C] (any values when count == 0);
    count: this rank's values per channel (N*H*W, may be 0). Returns fp32 [C], fp32 [C] and a 0-d fp64 tensor,
    bitwise identical on every rank. Checks the channel counts first (check_channels).
    """
    channels = mean.shape[0]
    check_channels(channels, group, mean.device)
    local = torch.empty(2 * channels + 1, dtype=torch.float64, device=mean.device)
    local[0] = count
    if count > 0:
        local[1:channels + 1] = mean
        local[channels + 1:] = var.double() * count
    else:
        local[1:].zero_()
    gathered = _all_gather_rows(local, group)
    counts, means, m2s = gathered[:, :1], gathered[:, 1:channels + 1], gathered[:, channels + 1:]
    total = counts.sum()
    global_mean = (counts * means).sum(0) / total
    global_m2 = (m2s + counts * (means - global_mean) ** 2).sum(0)
    return global_mean.float(), (global_m2 / total).float(), total


@torch.no_grad()
def update_running_stats(running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                         num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float],
                         mean: torch.Tensor, var: torch.Tensor, total_count: torch.Tensor) -> None:
    """Fold the global batch statistics into the running ones, as nn.SyncBatchNorm does (a no-op without
    running statistics). num_batches_tracked must already count this batch (it is not incremented here);
    momentum=None is the cumulative average 1 / num_batches_tracked. var: the global biased variance;
    total_count: the global count (from merge_batch_stats)."""
    if running_mean is None or running_var is None:
        return
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        factor = 1.0 / num_batches_tracked.to(torch.float64)
    else:
        factor = torch.tensor(momentum, dtype=torch.float64, device=mean.device)
    unbiased = var.double() * (total_count / (total_count - 1))
    running_mean.copy_(running_mean.double() * (1 - factor) + mean.double() * factor)
    running_var.copy_(running_var.double() * (1 - factor) + unbiased * factor)


def all_reduce_grad_sums(sum_g: torch.Tensor, sum_g_xhat: torch.Tensor, group, count: int,
                         total_count: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum_g, sum_g_xhat) summed over the ranks of `group` and scaled by count / total_count, as new fp32 [C]
    tensors (the inputs, this rank's sums and its weight/bias gradients, are left alone): the input-gradient
    pass divides by the local count, so it then divides by the global one. A rank with an empty batch
    (count 0) passes zeros and still takes part."""
    channels = sum_g.shape[0]
    combined = torch.cat([sum_g, sum_g_xhat]).double()
    dist.all_reduce(combined, group=group)
    combined *= count / total_count
    combined = combined.float()
    return combined[:channels], combined[channels:]


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of the sum of every rank's loss is the all-reduced sum of
    the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sync_batch_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                              running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                              num_batches_tracked: Optional[torch.Tensor], momentum: Optional[float], eps: float,
                              group) -> torch.Tensor:
    """nn.SyncBatchNorm's training forward over `group` in eager ops (any device, autograd through the
    all-reduces): x (N, C, H, W) -> normalized with the global batch mean and biased variance (two passes),
    running statistics updated with the global count and num_batches_tracked counted."""
    channels = x.shape[1]
    check_channels(channels, group, x.device)
    xf = x.double() if x.dtype == torch.float64 else x.float()
    dims = (0, 2, 3)
    count = x.new_full((1,), x.numel() // max(channels, 1), dtype=xf.dtype)
    totals = _AllReduceSum.apply(torch.cat([count, xf.sum(dims)]), group)
    total_count, mean = totals[0], totals[1:] / totals[0]
    centred = xf - mean.view(1, -1, 1, 1)
    var = _AllReduceSum.apply((centred * centred).sum(dims), group) / total_count
    out = centred * torch.rsqrt(var + eps).view(1, -1, 1, 1)
    if weight is not None:
        out = out * weight.view(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    if running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean.detach(), var.detach(),
                         total_count.detach().double())
    return out.to(x.dtype)
