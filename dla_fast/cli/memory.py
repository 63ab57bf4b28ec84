"""Training memory of a model: the bytes autograd saves in one training forward (any device), and on CUDA the
peak allocated memory of a training step; the largest batch that fits a memory budget.

`saved_activation_bytes` counts what autograd's saved-tensor hooks see during `model(x)` in training mode: every
saved tensor's storage once (views and tensors saved twice share one), parameters and buffers excluded; inside
dla_fast's memory-efficient mode (dla_fast.ops.recompute) a tensor saved as a recipe counts the tensors the recipe
holds. It is the activation memory a backward needs, independent of the allocator; it does not count the
forward's transient peaks or the backward's own allocations.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn as nn

from ..ops import recompute


def _forward_output_tensors(output) -> list:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _forward_output_tensors(item)]
    return []


def saved_storages(model: nn.Module, x: torch.Tensor) -> Dict[Tuple[torch.device, int], Tuple[int, tuple]]:
    """{(device, storage address): (storage bytes, shape of the first tensor saved in it)} of what autograd saves in
    one forward of `model` on `x` (gradients enabled, in the model's current mode), parameters and buffers
    excluded. Runs the forward (training mode updates BatchNorm running statistics, as any forward does)."""
    excluded = {(t.device, t.untyped_storage().data_ptr()) for t in [*model.parameters(), *model.buffers()]}
    seen: Dict[Tuple[torch.device, int], Tuple[int, tuple]] = {}
    held = []  # keeps every counted storage alive until the end, so that no address is reused and missed

    def record(packed) -> None:
        tensors = packed.tensors() if isinstance(packed, recompute.Recipe) else [packed]
        for t in tensors:
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr())
            if key not in excluded and key not in seen and storage.nbytes() > 0:
                seen[key] = (storage.nbytes(), tuple(t.shape))
                held.append(t)

    with torch.enable_grad(), recompute.observe_saved(record):
        output = model(x)
    del output, held
    return seen


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves in one forward of `model` on `x` (see saved_storages)."""
    return sum(size for size, _ in saved_storages(model, x).values())


def cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """torch.cuda.max_memory_allocated over one call of `step` (after a synchronize), from the current allocation."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def largest_batch(fixed_bytes: int, bytes_per_image: float, budget_bytes: int) -> int:
    """The largest batch whose memory, fixed_bytes + batch * bytes_per_image (linear in the batch), fits
    budget_bytes; 0 when not even one image fits."""
    if bytes_per_image <= 0:
        raise ValueError(f"bytes_per_image must be positive, got {bytes_per_image}")
    return max(0, int((budget_bytes - fixed_bytes) // bytes_per_image))
