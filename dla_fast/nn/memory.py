"""The memory-efficient training mode of accelerate(model, memory_efficient=True): the model's forward runs inside
dla_fast.ops.recompute.recompute_activations().

There the fused ops save, instead of their outputs, how to recompute them: each fused BatchNorm [+ residual] +
ReLU keeps only its input and statistics (its output — the next conv's input, the op's own ReLU mask, a residual,
an aggregation node's child — is recomputed by one pointwise pass when a backward needs it); an aggregation node
keeps its children and pre-BN output (never the concatenation); an IDA up-merge keeps its inputs (the merged
tensor, the next conv's input, is merged again). Outputs, gradients and running statistics are those of the
plain fused path, bit for bit; the recomputation costs about one extra read of each activation and write of its
recomputed output in the backward. Only the fused paths save less: backend 'torch', and `auto` on CPU tensors, run eagerly
and save what eager saves; inside the mode the blocks' training BatchNorm takes the fused op's backend choice
(dla_fast.nn.folded.fused_training_applies: under `auto` on CUDA fused, where outside the mode it stays eager).

The mode is two hooks on the model: a forward pre-hook (first of all) that enters the context when gradients
are enabled, and a forward hook that always runs (also when the forward raises) and leaves it. Under
torch.compile it does nothing (Inductor decides what a compiled graph saves). torch.utils.checkpoint inside the
model (timm's set_grad_checkpointing) takes over the saved-tensor hooks of the stages it wraps: those recompute
whole stages their own way, and the numbers stay the same.
"""
from __future__ import annotations

import threading

import torch
import torch.nn as nn

from ..ops import recompute

_LOCAL = threading.local()  # .stack: the contexts opened by _enter in this thread (None: not opened)


def _stack() -> list:
    if not hasattr(_LOCAL, "stack"):
        _LOCAL.stack = []
    return _LOCAL.stack


def _enter(module: nn.Module, args) -> None:
    context = None
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        context = recompute.recompute_activations()
        context.__enter__()
    _stack().append(context)


def _leave(module: nn.Module, args, output) -> None:
    stack = _stack()
    context = stack.pop() if stack else None
    if context is not None:
        context.__exit__(None, None, None)


def install(model: nn.Module) -> None:
    """The model's forward runs inside recompute_activations() from now on. The hooks are plain functions and the
    contexts per thread (DataParallel replicas), so the model can be deep-copied (an EMA copy keeps the mode)."""
    model.register_forward_pre_hook(_enter, prepend=True)
    model.register_forward_hook(_leave, always_call=True)


def uninstall(model: nn.Module) -> None:
    """Remove the hooks `install` put on `model` (also from a deep copy of it)."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, hook in hooks.items() if hook is _enter or hook is _leave]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
