"""Activations recomputed in the backward instead of saved: the memory-efficient training mode's mechanism.

A fused op whose output is a cheap function of tensors autograd keeps anyway — BatchNorm [+ residual] + ReLU of
its saved pre-BN input and batch statistics, the IDA up-merge of its saved inputs — declares so with
`recomputable(out, fn, *args)` right after computing `out` (out == fn(*args), bit for bit). Inside
`recompute_activations()`, autograd's saved-tensor hooks then save, wherever `out` would be saved (the next
conv's input for its weight gradient, the op's own ReLU mask, an aggregation node's child, a residual), a
`Recipe` that holds `fn` and its arguments instead of `out`; the backward that needs `out` recomputes it (one
pointwise pass, under no_grad) just before it runs. Arguments that are themselves declared outputs are held as
their recipes (a residual chain is recomputed link by link); a recomputed tensor is cached through a weak
reference, so consumers whose backwards overlap share it and nothing outlives its last consumer.

Outside `recompute_activations()` `recomputable` does nothing and every op saves what it always did. Inside
another saved-tensor hooks context (torch.utils.checkpoint's, a user's), those hooks take over and tensors are
saved, or recomputed, their way; the ops' results and gradients never depend on which hooks run. A tensor changed
in place after it was declared (its version counter moved) is saved as it is.

`observe_saved(callback)` shows what the hooks save: callback(packed) for every packed value (a tensor or a
Recipe), also inside `recompute_activations()` (dla_fast.cli.memory counts saved-activation bytes with it).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable, Iterator, List, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

_STATE = threading.local()  # .registry: the active WeakIdKeyDictionary (tensor -> (version, Recipe)) or None
                            # .observers: the callbacks of the open observe_saved contexts


class Recipe:
    """`fn(*args)` computed again on demand: args are tensors (held), Recipes (recomputed first) or plain values."""

    __slots__ = ("fn", "args", "_cache")

    def __init__(self, fn: Callable[..., torch.Tensor], args: tuple):
        self.fn, self.args = fn, args
        self._cache: Optional[weakref.ref] = None

    def tensors(self) -> List[torch.Tensor]:
        """The tensors this recipe (and the recipes it refers to) hold."""
        held = []
        for a in self.args:
            if isinstance(a, Recipe):
                held += a.tensors()
            elif isinstance(a, torch.Tensor):
                held.append(a)
        return held

    def materialize(self) -> torch.Tensor:
        out = self._cache() if self._cache is not None else None
        if out is None:
            args = [a.materialize() if isinstance(a, Recipe) else a for a in self.args]
            with torch.no_grad():
                out = self.fn(*args)
            self._cache = weakref.ref(out)
        return out


def _registry() -> Optional[WeakIdKeyDictionary]:
    return getattr(_STATE, "registry", None)


def active() -> bool:
    """Whether the current thread runs inside recompute_activations() (declared outputs are then not saved)."""
    return _registry() is not None


def recomputable(out: torch.Tensor, fn: Callable[..., torch.Tensor], *args) -> None:
    """Declare that `out` equals fn(*args) bit for bit (fn is deterministic and reads nothing else), so that inside
    recompute_activations() autograd saves the recipe instead of `out`. Nothing happens outside it, or under
    torch.compile (Inductor chooses what to save there). Tensors in args that were declared themselves are held
    as their recipes; args must not be changed in place before the backward (as for any saved tensor)."""
    registry = _registry()
    if registry is None or torch.compiler.is_compiling():
        return
    held = []
    for a in args:
        entry = registry.get(a) if isinstance(a, torch.Tensor) else None
        held.append(entry[1] if entry is not None and entry[0] == a._version else a)
    registry[out] = (out._version, Recipe(fn, tuple(held)))


def _pack(t: torch.Tensor):
    registry = _registry()
    entry = registry.get(t) if registry is not None else None
    packed = entry[1] if entry is not None and entry[0] == t._version else t
    for observer in getattr(_STATE, "observers", ()):
        observer(packed)
    return packed


def _unpack(packed):
    return packed.materialize() if isinstance(packed, Recipe) else packed


@contextlib.contextmanager
def recompute_activations() -> Iterator[None]:
    """Within it, declared outputs (`recomputable`) are saved for the backward as recipes, not as tensors. The
    declarations live as long as the tensors (weakly held) and are private to this thread and this context."""
    previous = _registry()
    _STATE.registry = WeakIdKeyDictionary()
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _STATE.registry = previous


@contextlib.contextmanager
def observe_saved(callback: Callable[[object], None]) -> Iterator[None]:
    """Call `callback(packed)` for every tensor autograd saves in this thread while it is open: `packed` is the
    tensor itself, or the Recipe saved in its place inside recompute_activations(). Contexts nest: every open
    one's callback is called."""
    previous = getattr(_STATE, "observers", ())
    _STATE.observers = previous + (callback,)
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _STATE.observers = previous
