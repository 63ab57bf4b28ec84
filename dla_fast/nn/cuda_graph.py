"""Inference through captured CUDA graphs: one graph replay per call instead of hundreds of kernel launches.

At small batches a DLA forward is bound by the host (Python, dispatch and launch costs of ~150 kernels),
not by the GPU; replaying a captured graph removes that cost for eager, accelerated or any other model.

    graphed = dla_fast.CUDAGraphInference(dla_fast.accelerate(model).eval().cuda())
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = graphed(images)          # first call with this shape/dtype/autocast: warm-up + capture

What a user of CUDA graphs must know (PyTorch's own rules, checked where cheap):
- inference only: the wrapped model must be in eval mode, called without gradients;
- one graph per input signature (shape, dtype, device, memory format, autocast dtype), captured at its first
  call; later calls copy the input into the graph's static buffer and replay;
- the graph reads parameters and buffers where they are, but dla_fast's BatchNorm-folded weights are computed
  before the capture and replayed as they were: after changing weights call `reset()` (switching the
  wrapper's mode with `.eval()`/`.train()` or moving it with `.to()` resets too) to capture again. The wrapper
  keeps the folded tensors its graphs read alive, so a stale graph computes with the old weights, never with
  freed memory;
- autocast's low-precision weight copies are made inside the graph: capture runs with autocast's cache off
  (cached casts are freed when an autocast region ends, so a graph must not read them);
- outputs are cloned out of the graph's static buffers unless clone_outputs=False (then the next call
  overwrites them).
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map


class CUDAGraphInference(nn.Module):
    """Wraps a model for CUDA-graph inference (see the module docstring). `model` stays a submodule, so the
    wrapper's state_dict keys are 'model.<key>'."""

    def __init__(self, model: nn.Module, warmup: int = 3, clone_outputs: bool = True):
        super().__init__()
        self.model = model
        self.warmup = warmup
        self.clone_outputs = clone_outputs
        self._graphs: Dict[tuple, Tuple[torch.cuda.CUDAGraph, torch.Tensor, object, List[torch.Tensor]]] = {}

    def reset(self) -> None:
        """Drop every captured graph (they are captured again at their next call)."""
        self._graphs.clear()

    def train(self, mode: bool = True):
        self.reset()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(), ...: the graphs' tensors move or change
        self.reset()
        return super()._apply(fn, *args, **kwargs)

    def _folded_tensors(self) -> List[torch.Tensor]:
        """The BatchNorm-folded weights the model's fused modules hold now (dla_fast.nn.folded)."""
        return [t for m in self.model.modules() if hasattr(m, "fold_pairs")
                for pair in m.fold_pairs() for t in pair.cached()]

    @staticmethod
    def _signature(x: torch.Tensor) -> tuple:
        fmt = "channels_last" if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else "contiguous"
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        return tuple(x.shape), x.dtype, x.device, fmt, autocast

    def _check(self, x: torch.Tensor, capturing: bool) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_cuda:
            raise ValueError("CUDAGraphInference needs a CUDA tensor input; got "
                             f"{x.device if isinstance(x, torch.Tensor) else type(x).__name__}")
        modules = self.model.named_modules() if capturing else [("", self.model)]
        training = [name or type(self.model).__name__ for name, m in modules if m.training]
        if training:
            raise RuntimeError(f"CUDAGraphInference is for inference: call model.eval() first ({training[0]} is in "
                               "training mode)")
        if torch.is_grad_enabled():
            raise RuntimeError("CUDAGraphInference is for inference: call it under torch.inference_mode() or "
                               "torch.no_grad()")

    def _capture(self, x: torch.Tensor):
        static_input = x.clone()
        autocast = contextlib.nullcontext()
        if torch.is_autocast_enabled("cuda"):
            autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        with torch.cuda.device(x.device), autocast:
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):  # Triton/cuDNN set-up, folded weights cached, outside the capture
                    self.model(static_input)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self.model(static_input)
        return graph, static_input, static_output, self._folded_tensors()

    def forward(self, x: torch.Tensor):
        key = self._signature(x) if isinstance(x, torch.Tensor) else None
        entry = self._graphs.get(key)
        self._check(x, capturing=entry is None)
        if entry is None:
            entry = self._graphs[key] = self._capture(x)
        graph, static_input, static_output, _ = entry
        static_input.copy_(x)
        graph.replay()
        if not self.clone_outputs:
            return static_output
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, static_output)


def _tensor_signature(x: torch.Tensor) -> tuple:
    fmt = "channels_last" if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else "contiguous"
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    return tuple(x.shape), x.dtype, x.device, fmt, x.requires_grad, autocast


def _describe_signature(signature: tuple) -> str:
    shape, dtype, device, fmt, requires_grad, autocast = signature
    return (f"shape {shape}, {dtype}, {device}, {fmt}, requires_grad={requires_grad}, "
            f"autocast {autocast if autocast is not None else 'off'}")


class CUDAGraphTraining(nn.Module):
    """The forward and backward of a training step replayed from two captured CUDA graphs, for one fixed input
    signature (torch.cuda.make_graphed_callables on the wrapped model).

        model = dla_fast.accelerate(create_model("centernet_dla34")).cuda().train()
        graphed = dla_fast.CUDAGraphTraining(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for images, targets in loader:                  # every batch of one shape, dtype and memory format
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = graphed(images)                    # first call: warm-up + capture, then one replay
                loss = criterion(out, targets)           # the loss and the optimizer step run outside the graphs
            loss.backward()                              # replays the captured backward for the model's part
            optimizer.step()

    Rules (PyTorch's, checked where cheap):
    - training only (use CUDAGraphInference for eval), with gradients enabled, CUDA inputs and a model on that
      device; the first call fixes the input signature (shape, dtype, device, memory format, requires_grad,
      autocast dtype): a call with another one raises ValueError; `reset()` drops the graphs so the next call
      captures for its own signature (so do `.to()`, and `.train()`/`.eval()` on the wrapper);
    - BatchNorm running statistics (and num_batches_tracked) move exactly once per call: the warm-up runs that
      precede the capture are undone before the first replay. BatchNorm with momentum=None (cumulative average)
      in training reads its factor on the host and cannot be captured: ValueError;
    - parameters are read where they are: update them in place (optimizers do), never replace them; the
      optimizer step, the loss and anything else outside the model run eagerly;
    - outputs and the parameter gradients the backward returns live in the graphs' static memory and are
      overwritten by the next replay: use (or clone) them before the next call, and zero the gradients with
      `zero_grad(set_to_none=True)` each step (accumulating gradients across calls is not supported);
    - forward hooks of submodules run during capture only; the model itself must have none;
    - autocast's weight cache is off during capture (make_graphed_callables requires it).
    """

    def __init__(self, model: nn.Module, warmup: int = 3):
        super().__init__()
        self.model = model
        self.warmup = warmup
        self._signature = None
        self._graphed = None

    def reset(self) -> None:
        """Drop the captured graphs; the next call captures again for its input signature."""
        self._signature = None
        self._graphed = None

    def train(self, mode: bool = True):
        self.reset()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.reset()
        return super()._apply(fn, *args, **kwargs)

    def _check(self, x: torch.Tensor) -> None:
        if not self.model.training:
            raise RuntimeError("CUDAGraphTraining captures training steps: call model.train() first (use "
                               "dla_fast.CUDAGraphInference for eval-mode inference)")
        if not torch.is_grad_enabled():
            raise RuntimeError("CUDAGraphTraining captures forward and backward: call it with gradients enabled "
                               "(not under torch.no_grad() or torch.inference_mode())")
        if not isinstance(x, torch.Tensor) or not x.is_cuda:
            raise ValueError("CUDAGraphTraining needs a CUDA tensor input; got "
                             f"{x.device if isinstance(x, torch.Tensor) else type(x).__name__}")

    def _check_capturable(self, x: torch.Tensor) -> None:
        model = self.model
        if model._forward_hooks or model._forward_pre_hooks or model._backward_hooks:
            raise ValueError("CUDAGraphTraining: the wrapped model has hooks of its own, which a captured graph "
                             "cannot run; register them on a module around it, or after the first call")
        for name, t in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            if t.device != x.device:
                raise ValueError(f"CUDAGraphTraining: the input is on {x.device} but the model's {name} is on "
                                 f"{t.device}; move the model to the input's device first")
        for name, m in self.model.named_modules():
            if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
                    and m.momentum is None):
                raise ValueError(f"CUDAGraphTraining: BatchNorm {name or type(m).__name__} has momentum=None "
                                 "(cumulative average), whose factor is read on the host each step and cannot be "
                                 "captured; give it a momentum")

    def _capture(self, x: torch.Tensor):
        self._check_capturable(x)
        buffers = list(self.model.buffers())
        with torch.no_grad():
            before = [b.clone() for b in buffers]
        autocast = contextlib.nullcontext()
        if torch.is_autocast_enabled("cuda"):
            autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        model = self.model
        with torch.cuda.device(x.device), autocast:
            torch.cuda.make_graphed_callables(model, (x.detach().clone().requires_grad_(x.requires_grad),),
                                              num_warmup_iters=self.warmup, allow_unused_input=True)
        graphed = model.__dict__.pop("forward")  # the graphed forward; the model keeps its own forward
        with torch.no_grad():
            for b, saved in zip(buffers, before):  # undo the warm-up steps' running-statistics updates
                b.copy_(saved)
        return graphed

    def forward(self, x: torch.Tensor):
        self._check(x)
        signature = _tensor_signature(x)
        if self._graphed is None:
            self._graphed = self._capture(x)
            self._signature = signature
        elif signature != self._signature:
            raise ValueError(f"CUDAGraphTraining captured its graphs for input {_describe_signature(self._signature)}; "
                             f"got {_describe_signature(signature)}. Call reset() to capture for the new one")
        return self._graphed(x)
