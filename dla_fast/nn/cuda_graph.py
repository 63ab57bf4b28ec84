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
