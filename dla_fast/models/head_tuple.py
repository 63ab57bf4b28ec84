"""HeadTuple: a CenterNet-style model's [dict(head -> tensor)] output as a plain tuple, for exporters and
tracers that want tensors (torch.jit.trace, named ONNX outputs, C++ callers of an AOTInductor package)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn


class HeadTuple(nn.Module):
    """Wraps a CenterNet or CenterTrack model (any module with a `heads` dict whose forward returns
    [dict(head -> tensor)]): forward returns the last dict's tensors as a tuple, in `heads` order (`names`).

    The wrapped model is the submodule `model` (state_dict keys gain the prefix "model."); its inputs pass
    through unchanged: `HeadTuple(centertrack)(img, pre_img, pre_hm)`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        heads = getattr(model, "heads", None)
        if not isinstance(heads, dict) or not heads:
            raise ValueError(f"HeadTuple wraps a CenterNet-style model with a non-empty `heads` dict; "
                             f"{type(model).__name__} has heads={heads!r}")
        self.model = model
        self.names = tuple(heads)

    def forward(self, x: torch.Tensor, pre_img: Optional[torch.Tensor] = None,
                pre_hm: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
        inputs = (x,) if pre_img is None and pre_hm is None else (x, pre_img, pre_hm)
        out = self.model(*inputs)[-1]
        return tuple(out[name] for name in self.names)

    def extra_repr(self) -> str:
        return f"names={self.names}"
