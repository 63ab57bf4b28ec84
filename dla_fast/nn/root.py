"""FusedRoot: a drop-in for DLA's aggregation node (dla_fast's Root or timm's DlaRoot)."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from ..ops.aggregate import aggregate
from .batchnorm import batchnorm_unsupported, sync_args


class FusedRoot(nn.Module):
    """ReLU(BN(conv1x1(cat(children))) [+ children[0]]) through dla_fast.ops.aggregate.

    Holds the original Root's `conv` and `bn` modules themselves (shared, not copied), so parameters,
    buffers and state_dict keys are unchanged; `original` returns the module it replaced. With backend
    'torch' it computes the eager reference.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, residual: bool, original: nn.Module):
        super().__init__()
        reason = self.unsupported(conv, bn)
        if reason:
            raise ValueError(f"FusedRoot cannot replace this node: {reason}")
        self.conv = conv
        self.bn = bn
        self.residual = residual
        self.training = original.training
        self.__dict__["_original"] = original  # not a submodule: no duplicate state_dict keys

    @staticmethod
    def unsupported(conv: nn.Module, bn: nn.Module) -> str:
        """Why a node with this conv and BatchNorm cannot be fused ('' when it can): the kernel computes a 1x1
        conv (stride 1, no padding, groups or bias) followed by an affine BatchNorm2d or SyncBatchNorm."""
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (1, 1):
            return f"kernel_size {getattr(conv, 'kernel_size', '?')} (the fused node takes 1x1)"
        if conv.stride != (1, 1) or conv.padding not in ((0, 0), "valid") or conv.groups != 1 or conv.bias is not None:
            return (f"a 1x1 conv with stride {conv.stride}, padding {conv.padding}, groups {conv.groups}, "
                    f"bias {conv.bias is not None} (the fused node takes stride 1, no padding, groups or bias)")
        reason = batchnorm_unsupported(bn)
        if reason:
            return f"{reason} (the fused node takes an affine BatchNorm2d or SyncBatchNorm)"
        if not bn.affine:
            return f"{type(bn).__name__} without affine parameters (the fused node takes an affine BatchNorm)"
        return ""

    @property
    def original(self) -> nn.Module:
        return self.__dict__["_original"]

    def forward(self, children: List[torch.Tensor]) -> torch.Tensor:
        bn = self.bn
        return aggregate(children, self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                         bn.num_batches_tracked, bn.training, bn.momentum, bn.eps, self.residual, **sync_args(bn))

    def extra_repr(self) -> str:
        return f"{self.conv.in_channels} -> {self.conv.out_channels}, residual={self.residual}"
