"""Helpers shared by the fused ops: NHWC row views, channels_last allocation, per-channel fp32 vectors, the
CUDA device guard of Triton launches, access to the compiled extension, host-side launch arithmetic (`cdiv`,
`next_power_of_2`), caches of derived weights (`cached_derived`) and of validated argument signatures
(`ValidatedSignatures`), and parameter-gradient strides (`dense_stride`, `with_stride`)."""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import backend


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x in channels_last memory format (no copy when it already is)."""
    return x.contiguous(memory_format=torch.channels_last)


def alert_not_deterministic(caller: str) -> None:
    """What PyTorch's own nondeterministic kernels do under `torch.use_deterministic_algorithms(True)`: raise a
    RuntimeError naming `caller` (warn instead with warn_only=True); nothing otherwise."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"{caller} does not have a deterministic implementation, but you set "
               "'torch.use_deterministic_algorithms(True)'")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message + " (warn_only=True makes this a warning)")


def dense_stride(param: torch.Tensor) -> Optional[tuple]:
    """The strides the gradient of `param` should have: param's own when it is dense (contiguous or channels_last;
    the strides of size-1 dims count: a (Cout, K, 1, 1) weight after `.to(memory_format=torch.channels_last)` has
    (K, 1, K, K)), else None (any dense layout). Autograd's layout contract ignores size-1 dims, but
    DistributedDataParallel compares a gradient's strides with its bucket view exactly and warns and copies the
    gradient every step when they differ."""
    if param.is_contiguous() or param.is_contiguous(memory_format=torch.channels_last):
        return param.stride()
    return None


def with_stride(grad: torch.Tensor, stride: Optional[tuple]) -> torch.Tensor:
    """`grad` with strides `stride` (from dense_stride): itself when they already match or `stride` is None, else
    a copy."""
    if stride is None or grad.stride() == stride:
        return grad
    return torch.empty_strided(grad.shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """The [N*H*W, C] rows of a channels_last-contiguous (N, C, H, W) tensor, as a view (callers guarantee the
    layout: tensors they allocated with `empty_channels_last`, or passed through `channels_last`)."""
    n, c, h, w = x.shape
    return x.as_strided((n * h * w, c), (c, 1))


def nhwc_rows(x: torch.Tensor) -> torch.Tensor:
    """The [N*H*W, C] rows of any (N, C, H, W) tensor, copying it to channels_last once if it is not."""
    return rows_view(channels_last(x))


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of ints, as `triton.cdiv` gives it, in plain Python for the launchers' host code: since Triton
    3.5 `triton.cdiv` and `triton.next_power_of_2` are constexpr functions, ~1.8 us per host call (a launcher
    makes up to a dozen such calls)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as `triton.next_power_of_2` (0 for n <= 0), in plain Python (see cdiv)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def empty_channels_last(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized (N, C, H, W) tensor with the strides of a contiguous (N, H, W, C) tensor permuted to
    NCHW, whatever its sizes (also C == 1, H*W == 1, empty). Not a view: an autograd.Function may return it
    and callers may modify it in place."""
    n, c, h, w = shape
    stride_w = max(c, 1)
    stride_h = stride_w * max(w, 1)
    return torch.empty_strided(shape, (stride_h * max(h, 1), 1, stride_h, stride_w), dtype=dtype, device=device)


def fp32_vector(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A per-channel vector as contiguous fp32 (no call at all when it already is: this runs on every node)."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's for the launches in the block."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a small stand-in for the interpreter on the CPU)."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(device: torch.device) -> int:
    """A device's SM count, asked once per device (the launchers ask on every call)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


_EXTENSION_OPS: list = []


def extension_ops():
    """torch.ops.dla_fast_C, loading the compiled extension on first use (BackendUnavailable without it)."""
    if not _EXTENSION_OPS:
        try:
            from .. import _C  # noqa: F401  (registers the torch.ops.dla_fast_C kernels)
        except ImportError as e:
            raise backend.BackendUnavailable(f"backend 'cuda' needs the compiled extension dla_fast._C: {e}") from e
        _EXTENSION_OPS.append(torch.ops.dla_fast_C)
    return _EXTENSION_OPS[0]


def check_channel_vectors(op: str, channels: int, device: torch.device, **vectors: Optional[torch.Tensor]) -> None:
    """ValueError unless every given per-channel vector has shape (channels,) and lives on `device`."""
    for name, v in vectors.items():
        if v is not None and (v.shape != (channels,) or v.device != device):
            raise ValueError(f"{op}: {name} must have shape ({channels},) (one value per channel) on {device}; "
                             f"got {tuple(v.shape)} on {v.device}")


_DERIVED = WeakIdKeyDictionary()


def clear_derived() -> None:
    """Forget every tensor cached by cached_derived (each is made again at its next use)."""
    _DERIVED.clear()


def cached_derived(source: torch.Tensor, key, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`make()` (a tensor computed from `source` alone: a weight cast to the activations' dtype, a weight in a
    kernel's layout), cached per (source, key) and made again once `source` changed in place (its version
    counter), moved, or was freed. Not cached (made every call) while torch.compile traces, while a CUDA graph
    is being captured (the graph must compute it, so that replays see later weight updates), for inference
    tensors (no version counter), or for a source that requires grad while grad mode is on (the result must
    stay in the autograd graph). Made under inference_mode, the cached tensor is still a normal tensor. It
    cannot see writes that leave the version counter and storage as they were: edits through `tensor.data`,
    FSDP2's all-gather into the unsharded parameters (under `_unsafe_preserve_version_counter`), an optimizer
    step replayed from a CUDA graph; after one, `clear_derived()` (dla_fast.clear_weight_caches)."""
    if (torch.compiler.is_compiling() or source.is_inference() or (source.requires_grad and torch.is_grad_enabled())
            or (source.is_cuda and torch.cuda.is_current_stream_capturing())):
        return make()
    stamp = (source._version, source.data_ptr(), source.device)
    entries = _DERIVED.get(source)
    if entries is None:
        entries = _DERIVED[source] = {}
    hit = entries.get(key)
    if hit is None or hit[0] != stamp:
        with torch.inference_mode(False):  # a normal tensor even when made under inference_mode: later
            value = make()                 # training calls may save it for backward
        hit = entries[key] = (stamp, value)
    return hit[1]


def tensor_signature(t: Optional[torch.Tensor]):
    """What argument checks read of an optional tensor argument: (type, shape, dtype, device), or None.
    AttributeError for an argument that is not a tensor (callers then run their checks)."""
    return None if t is None else (type(t), t.shape, t.dtype, t.device)


class ValidatedSignatures:
    """The argument signatures an op's checks accepted, so that later calls with the same signature skip them.

    A signature is a hashable tuple of everything the checks read: types, shapes, dtypes and devices of the
    tensors, and the flags and numbers they test (eps, momentum, ... with their types: True == 1 == 1.0 in a
    tuple). Never a tensor's values. Callers build it only outside torch.compile (None: run the checks), and only
    if building it costs clearly less than the checks (benchmarks/NOTES.md, "host time per call"). Bounded:
    cleared when it holds `limit` signatures."""

    def __init__(self, limit: int = 4096):
        self._seen: set = set()
        self._limit = limit

    def __contains__(self, signature) -> bool:
        try:
            return signature is not None and signature in self._seen
        except TypeError:  # an unhashable argument: the checks run (and name it)
            return False

    def check_once(self, signature, check: Callable[[], None]) -> None:
        """Run `check` (it raises for bad arguments) unless `signature` passed it before; None always runs it."""
        if signature not in self:
            check()
            self.add(signature)

    def add(self, signature) -> None:
        if signature is None:
            return
        if len(self._seen) >= self._limit:
            self._seen.clear()
        try:
            self._seen.add(signature)
        except TypeError:
            pass

