"""Training memory of a model: the bytes autograd saves in one training forward (any device), and on CUDA the
peak allocated memory of a training step; the largest batch that fits a memory budget.

`saved_activation_bytes` counts what autograd's saved-tensor hooks see during `model(x)` in training mode: every
saved tensor's storage once (views and tensors saved twice share one), parameters and buffers excluded; inside
dla_fast's memory-efficient mode (dla_fast.ops.recompute) a tensor saved as a recipe counts the tensors the recipe
holds. It is the activation memory a backward needs, independent of the allocator; it does not count the
forward's transient peaks or the backward's own allocations.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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


@dataclasses.dataclass(frozen=True)
class TrainingMemory:
    """Memory of one provider's training step. kind: what `peak_bytes` is — CUDA: torch.cuda.max_memory_allocated
    of a training step (weights, gradients, optimizer state, activations, workspaces); CPU: the saved-activation
    bytes of the training forward (SavedBytes). fixed_bytes + batch * bytes_per_image is the linear fit over the
    batch (CUDA: peaks at two batch sizes; CPU: the parameters three times — weights, gradients, SGD momentum —
    plus the saved activations per image), and largest_batch the largest batch it puts within budget_bytes (None
    without a budget)."""

    kind: str
    peak_bytes: int
    fixed_bytes: float
    bytes_per_image: float
    budget_bytes: Optional[int] = None
    largest_batch: Optional[int] = None


def largest_batch(fixed_bytes: float, bytes_per_image: float, budget_bytes: float) -> int:
    """The largest batch whose memory, fixed_bytes + batch * bytes_per_image, fits budget_bytes; 0 when not even
    one image fits."""
    if bytes_per_image <= 0:
        raise ValueError(f"bytes_per_image must be positive, got {bytes_per_image}")
    return max(0, int((budget_bytes - fixed_bytes) // bytes_per_image))


def _cuda_step_peak(make_step: Callable[[int], Callable[[], None]], batch: int, device: torch.device) -> int:
    """max_memory_allocated over the second of two training steps at `batch` (the first allocates the gradients
    and the optimizer state, which the second then holds as every later step does)."""
    step = make_step(batch)
    step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del step
    return peak


def measure_training_memory(model: nn.Module, make_example: Callable[[int], torch.Tensor],
                            make_step: Callable[[int], Callable[[], None]], batch: int, device: torch.device,
                            budget_bytes: Optional[int] = None,
                            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                            ) -> TrainingMemory:
    """The training memory of `model` (a provider's prepared model, in training mode) at `batch`.

    make_example(b): an input batch of b images; make_step(b): a training step (forward, backward, optimizer
    step) on such a batch. CUDA: the step's peak at `batch` and at a second batch (half of it; twice it up to batch 2)
    fit fixed_bytes and bytes_per_image. CPU: the saved-activation bytes of one training forward under
    `autocast` (see TrainingMemory)."""
    if device.type == "cuda":
        other = batch // 2 if batch > 2 else 2 * batch  # never batch 1: BatchNorm of a 1x1 level would refuse it
        peaks = {b: _cuda_step_peak(make_step, b, device) for b in (batch, other)}
        per_image = (peaks[batch] - peaks[other]) / (batch - other)
        fixed = peaks[batch] - per_image * batch
        kind = "torch.cuda.max_memory_allocated of a training step"
        peak = peaks[batch]
    else:
        with autocast():
            peak = saved_activation_bytes(model, make_example(batch))
        per_image = peak / batch
        fixed = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
        kind = "saved-activation bytes of the training forward (autograd's saved tensors, each storage once)"
    fits = None
    if budget_bytes is not None and per_image > 0:
        fits = largest_batch(fixed, per_image, budget_bytes)
    return TrainingMemory(kind, int(peak), fixed, per_image, budget_bytes, fits)


def memory_lines(rows: Sequence[Tuple[str, TrainingMemory]]) -> List[str]:
    """Footnote lines for `bench --train`: per provider the peak (or saved) memory, and the largest batch within
    the budget when one was given."""
    if not rows:
        return []
    lines = [f"training memory: {rows[0][1].kind}"]
    for provider, m in rows:
        line = (f"  {provider}: {m.peak_bytes / 2**20:.1f} MiB; fit {m.fixed_bytes / 2**20:.1f} MiB + "
                f"{m.bytes_per_image / 2**20:.2f} MiB per image")
        if m.budget_bytes is not None:
            line += f"; largest batch within {m.budget_bytes / 1e9:g} GB: {m.largest_batch}"
        lines.append(line)
    return lines
