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


class SavedBytes:
    """Counts, while open (`with SavedBytes(model) as saved: out = model(x)`), the storages of what autograd saves,
    each once, parameters and buffers of `model` excluded: `saved.bytes`, and `saved.storages` {(device, storage
    address): (bytes, shape of the first tensor saved in it)}. Counted storages are kept alive until the context
    closes (so no address is freed, reused and missed)."""

    def __init__(self, model: nn.Module):
        self._excluded = {(t.device, t.untyped_storage().data_ptr()) for t in [*model.parameters(), *model.buffers()]}
        self.storages: Dict[Tuple[torch.device, int], Tuple[int, tuple]] = {}
        self._held: list = []
        self._context = None

    @property
    def bytes(self) -> int:
        return sum(size for size, _ in self.storages.values())

    def _record(self, packed) -> None:
        tensors = packed.tensors() if isinstance(packed, recompute.Recipe) else [packed]
        for t in tensors:
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr())
            if key not in self._excluded and key not in self.storages and storage.nbytes() > 0:
                self.storages[key] = (storage.nbytes(), tuple(t.shape))
                self._held.append(t)

    def __enter__(self) -> "SavedBytes":
        self._context = recompute.observe_saved(self._record)
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)
        self._held.clear()


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves in one forward of `model` on `x` with gradients enabled, in the model's current mode
    (training mode updates the BatchNorm running statistics, as any training forward does); see SavedBytes."""
    with torch.enable_grad(), SavedBytes(model) as saved:
        output = model(x)
    del output
    return saved.bytes


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
