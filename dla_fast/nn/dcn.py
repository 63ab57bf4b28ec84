"""Fused deformable-conv modules: CenterNet's DCN block and torchvision's DeformConv2d, drop-in and reversible.

- `FusedDCNBlock` replaces CenterNet's IDAConv(deformable=True) (dla_fast.models.centernet: a
  ModulatedDeformConv3x3 `conv` with its `conv_offset_mask`, then `actf` = (BatchNorm2d, ReLU)). It holds the
  same children (same parameters, buffers and state_dict keys) and runs the offset-mask conv as a plain conv,
  then dla_fast.ops.deform_conv.block on its output as it is (split and sigmoid while loading):
  in eval mode without gradients with the BatchNorm folded into the deformable conv's weight and bias and the
  ReLU in the kernel's epilogue (one kernel writes the block's output); otherwise (training, or gradients
  wanted) the conv's epilogue reduces the batch statistics, one BN + ReLU pass follows, and the backward runs
  through all of it. An nn.SyncBatchNorm (converted before or after accelerate()) runs the same fused block with
  its statistics synchronized over its process group in training (dla_fast.ops.sync_stats), and folded like a
  BatchNorm2d in eval. Backend 'torch' (and 'auto' on CPU tensors) runs the replaced module itself (a
  SyncBatchNorm in training: the block's eager synchronized reference, which unlike nn.SyncBatchNorm also runs
  on CPU tensors in a process group).
- `FusedDeformConv2d` replaces a torchvision.ops.DeformConv2d: same parameters, forward(input, offset, mask)
  on dla_fast.ops.deform_conv.deform_conv2d.
- `FoldedDCN` is the folded-weight cache of one (ModulatedDeformConv3x3, BatchNorm2d or SyncBatchNorm) pair
  (FoldedConvBN's cache: one entry per dtype, refolded when a parameter or running statistic changes);
  FusedIDAUpAdd uses it and `deform_conv_bn_relu` for its deformable proj/node steps.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from .. import backend
from ..models.centernet import IDAConv, ModulatedDeformConv3x3
from ..ops.conv_bn_act import compute_dtype
from ..ops import deform_conv
from ..ops.deform_conv.block import OP_NAME, dcn_block, dcn_block_inference
from .batchnorm import batchnorm_unsupported, sync_args
from .folded import FoldedConvBN, fold_applies
from .op_kinds import ALL_OP_KINDS

_PADDING = (1, 1)  # ModulatedDeformConv3x3: 3x3 taps, stride 1, padding 1, dilation 1


def dcn_unsupported(conv: nn.Module, bn: nn.Module) -> str:
    """Why this (deformable conv, BatchNorm) pair cannot run fused ('' when it can)."""
    if type(conv) is not ModulatedDeformConv3x3:
        return f"{type(conv).__name__} is not dla_fast's ModulatedDeformConv3x3"
    om = conv.conv_offset_mask
    taps = conv.weight.shape[2] * conv.weight.shape[3]
    if (type(om) is not nn.Conv2d or om.out_channels != 3 * taps or om.groups != 1 or om.padding_mode != "zeros"
            or om.kernel_size != (3, 3) or om.stride != (1, 1) or om.padding != _PADDING or om.dilation != (1, 1)):
        return "its conv_offset_mask is not a plain 3x3 nn.Conv2d (stride 1, padding 1) with 27 outputs"
    reason = batchnorm_unsupported(bn)
    if reason:
        return reason
    if bn.running_mean is None or bn.running_var is None:
        return f"{type(bn).__name__} without running statistics"
    if bn.num_features != conv.weight.shape[0]:
        return f"the conv has {conv.weight.shape[0]} output channels, BatchNorm {bn.num_features}"
    return ""


class FoldedDCN(FoldedConvBN):
    """One (ModulatedDeformConv3x3, BatchNorm2d or SyncBatchNorm) pair: calling it runs the block in inference,
    BatchNorm folded (fp32 fold, cached per dtype like FoldedConvBN), ReLU in the kernel's epilogue. Not a
    module: it refers to modules owned by its parent."""

    def __init__(self, conv: ModulatedDeformConv3x3, bn: nn.Module):
        # FoldedConvBN's own __init__ takes only plain nn.Conv2d: the pair is checked here instead
        reason = dcn_unsupported(conv, bn)
        if reason:
            raise ValueError(f"cannot fuse this deformable conv and BatchNorm: {reason}")
        self.conv, self.bn = conv, bn
        self._cache = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, finite = self._folded(compute_dtype(x))
        if not finite:  # degenerate statistics: unfolded, BatchNorm's NaN / Inf pattern (FoldedConvBN._folded)
            return deform_conv_bn_relu(self.conv, self.bn, x)
        offset_mask = self.conv.conv_offset_mask(x)
        return dcn_block_inference(x, offset_mask, weight, bias, padding=_PADDING)


def _synchronized(bn: nn.Module) -> bool:
    """Whether `bn` is a SyncBatchNorm in training: then the block always runs dcn_block's synchronized path, whose
    backend 'torch' is the eager synchronized reference (nn.SyncBatchNorm itself refuses CPU tensors in a
    process group), as dla_fast.nn.folded does for the blocks."""
    return isinstance(bn, nn.SyncBatchNorm) and bn.training


def deform_conv_bn_relu(conv: ModulatedDeformConv3x3, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """relu(bn(conv(x))) through the fused block with autograd (training, or gradients wanted): the offset-mask
    conv, then one deformable-conv kernel with the batch statistics in its epilogue and one BN + ReLU pass;
    bn an nn.BatchNorm2d or an nn.SyncBatchNorm (statistics synchronized over its process group in training).
    Backend 'torch' (and 'auto' on CPU tensors): the modules themselves, except a SyncBatchNorm in training
    (see `_synchronized`)."""
    if backend.resolve(x.device, OP_NAME) == "torch" and not _synchronized(bn):
        return torch.relu(bn(conv(x)))
    offset_mask = conv.conv_offset_mask(x)
    return dcn_block(x, offset_mask, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                     bn.num_batches_tracked, bn.training, bn.momentum, bn.eps, padding=_PADDING, **sync_args(bn))


class FusedDCNBlock(nn.Module):
    """CenterNet's IDAConv(deformable=True) fused: same children `conv` and `actf`, `original` gives it back.

    forward(x): x (N, Cin, H, W) -> (N, Cout, H, W), channels_last; equal to the replaced module (running
    statistics included). Without the op kind "fold_bn" in `ops` the eval-mode call runs unfolded (the deformable
    conv with the statistics epilogue, then BN + ReLU).
    """

    def __init__(self, original: nn.Module, ops=ALL_OP_KINDS):
        super().__init__()
        reason = self.unsupported(original)
        if reason:
            raise ValueError(f"FusedDCNBlock cannot replace this {type(original).__name__}: {reason}")
        for name, child in original.named_children():
            self.add_module(name, child)
        self.training = original.training
        self.__dict__["_original"] = original  # not a submodule: no duplicate state_dict keys
        self.__dict__["_fold"] = FoldedDCN(self.conv, self.actf[0])
        self.__dict__["_ops"] = frozenset(ops)

    def _pair(self):
        """The FoldedDCN of the children as they are now (rebuilt when one was replaced, e.g. by
        convert_sync_batchnorm after accelerate), or None when they can no longer run fused (e.g. a
        normalization replaced by a frozen BatchNorm: the block then runs its children eagerly, as accelerate()
        would have left such a module)."""
        conv, bn = self.conv, self.actf[0]
        fold = self.__dict__["_fold"]
        if fold is None or fold.conv is not conv or fold.bn is not bn:
            fold = self.__dict__["_fold"] = None if dcn_unsupported(conv, bn) else FoldedDCN(conv, bn)
        return fold

    @staticmethod
    def unsupported(module: nn.Module) -> str:
        """Why `module` cannot be replaced ('' when it can)."""
        if type(module) is not IDAConv:
            return f"{type(module).__name__} is not CenterNet's IDAConv"
        children = dict(module.named_children())
        actf = children.get("actf")
        if set(children) != {"conv", "actf"} or type(actf) is not nn.Sequential or len(actf) != 2 \
                or type(actf[1]) is not nn.ReLU:
            return "its children are not conv + actf = (BatchNorm2d, ReLU)"
        return dcn_unsupported(module.conv, actf[0])

    @property
    def original(self) -> nn.Module:
        return self.__dict__["_original"]

    def fold_pairs(self) -> List[FoldedConvBN]:
        fold = self._pair()
        return [] if fold is None else [fold]

    def train(self, mode: bool = True):
        fold = self._pair()
        if fold is not None:
            fold.clear()
        self.original.training = mode
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.actf[0]
        if backend.resolve(x.device, OP_NAME) == "torch" and not _synchronized(bn):
            return self.original(x)
        fold = self._pair()
        if fold is None:  # a child replaced after accelerate() by one it cannot fuse (a frozen BatchNorm, ...):
            return self.actf(self.conv(x))  # IDAConv's own forward on the children as they are now
        if "fold_bn" in self.__dict__["_ops"] and fold_applies(self, [fold], x):
            return fold(x)
        return deform_conv_bn_relu(self.conv, bn, x)


def is_torchvision_deform_conv(module: nn.Module) -> bool:
    """Whether `module` is a torchvision.ops.DeformConv2d (checked without importing torchvision)."""
    cls = type(module)
    return cls.__name__ == "DeformConv2d" and cls.__module__.startswith("torchvision.ops")


class FusedDeformConv2d(nn.Module):
    """torchvision.ops.DeformConv2d on dla_fast's deform_conv2d: the same `weight` and `bias` parameters (same
    state_dict keys); `original` gives the module back.

    forward(input, offset, mask=None): input (N, Cin, H, W), offset (N, 2*G*kh*kw, Ho, Wo), mask (N, G*kh*kw,
    Ho, Wo) or None -> (N, Cout, Ho, Wo), as torchvision.ops.deform_conv2d.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        reason = self.unsupported(original)
        if reason:
            raise ValueError(f"FusedDeformConv2d cannot replace this {type(original).__name__}: {reason}")
        self.weight = original.weight
        self.bias = original.bias
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            setattr(self, name, getattr(original, name))
        self.training = original.training
        self.__dict__["_original"] = original

    @staticmethod
    def unsupported(module: nn.Module) -> str:
        if not is_torchvision_deform_conv(module):
            return f"{type(module).__name__} is not torchvision.ops.DeformConv2d"
        if module.groups != 1:
            return f"weight groups {module.groups} (dla_fast's deform_conv2d takes groups 1)"
        return ""

    @property
    def original(self) -> nn.Module:
        return self.__dict__["_original"]

    def train(self, mode: bool = True):
        self.original.training = mode
        return super().train(mode)

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask=None) -> torch.Tensor:
        return deform_conv.deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        return self.original.extra_repr()
