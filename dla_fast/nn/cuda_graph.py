"""Inference through captured CUDA graphs: one graph replay per call instead of hundreds of kernel launches.

At small batches a DLA forward is bound by the host (Python, dispatch and launch costs of ~150 kernels),
not by the GPU; replaying a captured graph removes that cost for eager, accelerated or any other model.

    graphed = dla_fast.CUDAGraphInference(dla_fast.accelerate(model).eval().cuda())
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = graphed(images)          # first call with this shape/dtype/autocast: warm-up + capture

What a user of CUDA graphs must know (PyTorch's own rules, checked where cheap):
- inference only: the wrapped model must be in eval mode, called without gradients;
- one graph per input signature (shape, dtype, device, memory format, autocast dtype of every input),
  captured at its first call; later calls copy the inputs into the graph's static buffers and replay;
- several positional inputs are taken, e.g. CenterTrack's graphed(img, pre_img, pre_hm): CUDA tensors, or None
  for an input left out (part of the signature: a None input gets its own graph);
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
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map


def check_model(wrapper: str, model) -> None:
    """TypeError naming the argument unless `model` is an nn.Module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{wrapper}: model must be an nn.Module; got {model!r} ({type(model).__name__})")


def check_cuda_inputs(wrapper: str, inputs: Sequence, allow_none: bool) -> None:
    """ValueError naming the input (by position) unless every input is a CUDA tensor (or None, where allowed)
    and all are on one device; at least one input, the first a tensor."""
    if not inputs:
        raise ValueError(f"{wrapper} needs at least one input tensor")
    kinds = "a CUDA tensor or None" if allow_none else "a CUDA tensor"
    for i, x in enumerate(inputs):
        if x is None and allow_none and i > 0:
            continue
        if not isinstance(x, torch.Tensor) or not x.is_cuda:
            got = x.device if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{wrapper} needs a CUDA tensor input; got {got} as input {i} (each input must be "
                             f"{kinds})")
        if x.device != inputs[0].device:
            raise ValueError(f"{wrapper}: input {i} is on {x.device}, input 0 on {inputs[0].device}; "
                             "give every input on one device")


class CUDAGraphInference(nn.Module):
    """Wraps a model for CUDA-graph inference (see the module docstring). `model` stays a submodule, so the
    wrapper's state_dict keys are 'model.<key>'."""

    def __init__(self, model: nn.Module, warmup: int = 3, clone_outputs: bool = True):
        super().__init__()
        check_model("CUDAGraphInference", model)
        self.model = model
        self.warmup = warmup
        self.clone_outputs = clone_outputs
        self._graphs: Dict[tuple, Tuple[torch.cuda.CUDAGraph, List[Optional[torch.Tensor]], object,
                                        List[torch.Tensor]]] = {}

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
    def _signature(inputs: Sequence[Optional[torch.Tensor]]) -> tuple:
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        return tuple(None if x is None else (tuple(x.shape), x.dtype, x.device, _memory_format(x))
                     for x in inputs) + (autocast,)

    def _check(self, inputs: Sequence[Optional[torch.Tensor]], capturing: bool) -> None:
        check_cuda_inputs("CUDAGraphInference", inputs, allow_none=True)
        modules = self.model.named_modules() if capturing else [("", self.model)]
        training = [name or type(self.model).__name__ for name, m in modules if m.training]
        if training:
            raise RuntimeError(f"CUDAGraphInference is for inference: call model.eval() first ({training[0]} is in "
                               "training mode)")
        if torch.is_grad_enabled():
            raise RuntimeError("CUDAGraphInference is for inference: call it under torch.inference_mode() or "
                               "torch.no_grad()")

    def _capture(self, inputs: Sequence[Optional[torch.Tensor]]):
        static_inputs = [None if x is None else x.clone() for x in inputs]
        device = inputs[0].device
        autocast = contextlib.nullcontext()
        if torch.is_autocast_enabled("cuda"):
            autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        with torch.cuda.device(device), autocast:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):  # Triton/cuDNN set-up, folded weights cached, outside the capture
                    self.model(*static_inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self.model(*static_inputs)
        return graph, static_inputs, static_output, self._folded_tensors()

    def forward(self, *inputs: Optional[torch.Tensor]):
        """model(*inputs) replayed from the graph of their signature (captured at its first call)."""
        valid = inputs and all(x is None or isinstance(x, torch.Tensor) for x in inputs)
        key = self._signature(inputs) if valid else None
        entry = self._graphs.get(key)
        self._check(inputs, capturing=entry is None)
        if entry is None:
            entry = self._graphs[key] = self._capture(inputs)
        graph, static_inputs, static_output, _ = entry
        for static, x in zip(static_inputs, inputs):
            if static is not None:
                static.copy_(x)
        graph.replay()
        if not self.clone_outputs:
            return static_output
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, static_output)


def _memory_format(x: torch.Tensor) -> str:
    return "channels_last" if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else "contiguous"


def _tensor_signature(inputs: Sequence[torch.Tensor]) -> tuple:
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    return tuple((tuple(x.shape), x.dtype, x.device, _memory_format(x), x.requires_grad) for x in inputs) + (autocast,)


def _describe_signature(signature: tuple) -> str:
    *inputs, autocast = signature
    described = [f"shape {shape}, {dtype}, {device}, {fmt}, requires_grad={requires_grad}"
                 for shape, dtype, device, fmt, requires_grad in inputs]
    inputs = described[0] if len(described) == 1 else "; ".join(f"{i}: {d}" for i, d in enumerate(described))
    return f"{inputs}, autocast {autocast if autocast is not None else 'off'}"


class CUDAGraphTraining(nn.Module):
    """The forward and backward of a training step replayed from two captured CUDA graphs, for one fixed input
    signature (torch.cuda.make_graphed_callables on the wrapped model). The model may take several positional
    tensor inputs (CenterTrack: graphed(img, pre_img, pre_hm)); every one must be given, as a CUDA tensor.

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
        check_model("CUDAGraphTraining", model)
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

    def _check(self, inputs: Sequence[torch.Tensor]) -> None:
        if not self.model.training:
            raise RuntimeError("CUDAGraphTraining captures training steps: call model.train() first (use "
                               "dla_fast.CUDAGraphInference for eval-mode inference)")
        if not torch.is_grad_enabled():
            raise RuntimeError("CUDAGraphTraining captures forward and backward: call it with gradients enabled "
                               "(not under torch.no_grad() or torch.inference_mode())")
        check_cuda_inputs("CUDAGraphTraining", inputs, allow_none=False)

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

    def _capture(self, inputs: Sequence[torch.Tensor]):
        x = inputs[0]
        self._check_capturable(x)
        buffers = list(self.model.buffers())
        with torch.no_grad():
            before = [b.clone() for b in buffers]
        autocast = contextlib.nullcontext()
        if torch.is_autocast_enabled("cuda"):
            autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        model = self.model
        with torch.cuda.device(x.device), autocast:
            samples = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
            torch.cuda.make_graphed_callables(model, samples, num_warmup_iters=self.warmup, allow_unused_input=True)
        graphed = model.__dict__.pop("forward")  # the graphed forward; the model keeps its own forward
        with torch.no_grad():
            for b, saved in zip(buffers, before):  # undo the warm-up steps' running-statistics updates
                b.copy_(saved)
        return graphed

    def forward(self, *inputs: torch.Tensor):
        """model(*inputs) (positional CUDA tensors), forward and backward replayed from the captured graphs."""
        self._check(inputs)
        signature = _tensor_signature(inputs)
        if self._graphed is None:
            self._graphed = self._capture(inputs)
            self._signature = signature
        elif signature != self._signature:
            raise ValueError(f"CUDAGraphTraining captured its graphs for input {_describe_signature(self._signature)}; "
                             f"got {_describe_signature(signature)}. Call reset() to capture for the new one")
        return self._graphed(*inputs)
