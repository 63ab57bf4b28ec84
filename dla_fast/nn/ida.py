"""Fused IDA up-path modules: drop-ins for DLA-Up's IDAUp (concat merge) and CenterNet's IDAUpAdd (add merge).

Each holds the original module's own submodules (proj_i, up_i, node_i: same parameters, same state_dict keys)
and runs the same computation through the fused ops:
- the bilinear transposed-conv upsample is merged with the finer level by `upsample_merge` (the upsampled
  tensor is never written by itself, and for DLA-Up the concatenation is written directly);
- every conv + BatchNorm + ReLU keeps its conv (cuDNN) and runs BN + ReLU as one pass with `batchnorm_act`;
  DLA-Up's 1x1 projections run as a one-child aggregation node (GEMM + BN + ReLU in one kernel); CenterNet's
  deformable conv + BN + ReLU runs as the fused DCN block (dla_fast.nn.dcn: batch statistics in the
  deformable conv's epilogue, then one BN + ReLU pass);
- in eval mode without gradients, every conv + BN + ReLU instead runs as one convolution with the BatchNorm
  folded in (dla_fast.nn.folded: one fused cuDNN call on CUDA; a deformable conv: one kernel, ReLU in its
  epilogue);
- an nn.SyncBatchNorm synchronizes its statistics through the fused ops (sync / process_group), the fused
  DCN block of the deformable steps included, also when the model was converted with convert_sync_batchnorm
  after accelerate() (the folded pairs follow the submodules as they are now).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from ..ops.aggregate import aggregate
from ..ops.batchnorm_act import batchnorm_act
from ..ops.upsample_merge import upsample_merge
from .batchnorm import batchnorm_unsupported, sync_args
from .conv_chain import chain_applies, check_conv_choice, run_chain
from .dcn import FoldedDCN, dcn_unsupported, deform_conv_bn_relu
from .folded import FoldedConvBN, fold_applies, unsupported
from .op_kinds import ALL_OP_KINDS


def bn_relu(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """ReLU(bn(x)) in one pass, with the module's statistics and training mode."""
    return batchnorm_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                         bn.training, bn.momentum, bn.eps, relu=True, **sync_args(bn))


def conv1x1_bn_relu(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """ReLU(bn(conv1x1(x))) as a one-child aggregation node."""
    return aggregate([x], conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                     bn.training, bn.momentum, bn.eps, **sync_args(bn))


class _FusedIDA(nn.Module):
    """Shares the original IDA module's submodules; `original` gives the module back (for restore). `ops`: the op
    kinds it runs fused (dla_fast.nn.op_kinds); each step of a kind not in it runs as the replaced module runs it."""

    def __init__(self, original: nn.Module, ops=ALL_OP_KINDS):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.training = original.training
        self.in_channels = original.in_channels
        self.out_channels = original.out_channels
        self.up_factors = original.up_factors
        self.__dict__["_original"] = original  # not a submodule: no duplicate state_dict keys
        self.__dict__["_ops"] = frozenset(ops)
        self.__dict__["_conv"] = "cudnn"
        self.__dict__["_folded"] = {}  # "proj_i" / "node_i" -> FoldedConvBN (plain convs) or FoldedDCN
        self.__dict__["_fold_sources"] = {}  # "proj_i" / "node_i" -> submodule paths of its (conv, bn)

    def _add_fold(self, name: str, conv_path: str, bn_path: str) -> None:
        self.__dict__["_fold_sources"][name] = (conv_path, bn_path)
        self._refresh_fold(name)

    def _refresh_fold(self, name: str) -> None:
        """(Re)build the folded pair of step `name` when its conv or BatchNorm is not the one it folds."""
        conv, bn = (self.get_submodule(path) for path in self.__dict__["_fold_sources"][name])
        folded = self.__dict__["_folded"]
        pair = folded.get(name)
        if pair is not None and pair.conv is conv and pair.bn is bn:
            return
        folded.pop(name, None)
        if not unsupported(conv, bn):
            folded[name] = FoldedConvBN(conv, bn)
        elif not dcn_unsupported(conv, bn) and "deform_conv" in self.__dict__["_ops"]:
            folded[name] = FoldedDCN(conv, bn)

    @property
    def original(self) -> nn.Module:
        return self.__dict__["_original"]

    def fold_pairs(self) -> List[FoldedConvBN]:
        for name in self.__dict__["_fold_sources"]:
            self._refresh_fold(name)
        return list(self.__dict__["_folded"].values())

    def use_conv(self, choice: str) -> None:
        """Which node convs a call that is not folded runs through the implicit GEMM (accelerate's `conv`;
        DLA-Up's concatenating nodes only: dla_fast.nn.conv_chain)."""
        self.__dict__["_conv"] = check_conv_choice(choice)

    def _fuses(self, op_kind: str) -> bool:
        return op_kind in self.__dict__["_ops"]

    def _folds(self, layers: Sequence[torch.Tensor]) -> bool:
        """Whether this call runs the plain conv + BN + ReLU steps folded (eval, no gradients)."""
        pairs = self.fold_pairs()
        return self._fuses("fold_bn") and len(pairs) > 0 and fold_applies(self, pairs, *layers)  # not bool(list): dynamo 2.11 cannot trace it

    def _conv_bn_relu(self, name: str, conv: nn.Module, bn: nn.BatchNorm2d, x: torch.Tensor,
                      fold: bool) -> torch.Tensor:
        pair = self.__dict__["_folded"].get(name)
        if fold and pair is not None:
            return pair(x)
        if pair is None and batchnorm_unsupported(bn):  # replaced after accelerate() (a frozen BatchNorm, ...)
            return torch.relu(bn(conv(x)))
        if isinstance(pair, FoldedDCN):
            return deform_conv_bn_relu(conv, bn, x)
        if not self._fuses("batchnorm_act") or (pair is None and not dcn_unsupported(conv, bn)):
            return torch.relu(bn(conv(x)))  # BN + ReLU kept eager, or a deformable conv kept eager (deform_conv)
        return bn_relu(bn, conv(x))

    def _upsample_merge(self, i: int, projected: torch.Tensor, x: torch.Tensor, mode: str) -> torch.Tensor:
        """up_i(projected) merged with x: added, or concatenated after x."""
        up = getattr(self, f"up_{i}")
        if self._fuses("upsample_merge"):
            return upsample_merge(projected, up.weight, x, self.up_factors[i], mode)
        upsampled = up(projected)
        return upsampled + x if mode == "add" else torch.cat([x, upsampled], 1)

    def train(self, mode: bool = True):
        for pair in self.__dict__["_folded"].values():
            pair.clear()
        return super().train(mode)

    def _check(self, layers: Sequence[torch.Tensor]) -> None:
        if len(layers) != len(self.in_channels):
            raise ValueError(f"{type(self.original).__name__} was built for {len(self.in_channels)} inputs; "
                             f"got {len(layers)}")


class FusedIDAUp(_FusedIDA):
    """DLA-Up's IDAUp (dla_fast.models.dla_up.IDAUp), fused: x_i = node_i(cat([x_{i-1}, up_i(proj_i(l_i))]))."""

    def __init__(self, original: nn.Module, ops=ALL_OP_KINDS):
        super().__init__(original, ops)
        for i in range(1, len(self.in_channels)):
            self._add_fold(f"node_{i}", f"node_{i}.0", f"node_{i}.1")

    def _project(self, i: int, x: torch.Tensor) -> torch.Tensor:
        proj = getattr(self, f"proj_{i}")
        if isinstance(proj, nn.Identity) or not self._fuses("aggregate"):
            return proj(x)
        return conv1x1_bn_relu(proj[0], proj[1], x)

    def forward(self, layers: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        self._check(layers)
        fold = self._folds(layers)
        x = self._project(0, layers[0])  # up_0 is the identity (factor 1)
        nodes = []
        choice = self.__dict__["_conv"]
        for i in range(1, len(layers)):
            projected = self._project(i, layers[i])
            node = getattr(self, f"node_{i}")
            if not fold and chain_applies(choice, [node[0]], [node[1]], x):
                # concat-free: the 3x3 conv reads x and the upsampled level through their own pointers
                upsampled = getattr(self, f"up_{i}")(projected)
                x = run_chain([(node[0], node[1], True)], [(x, None, None, False), (upsampled, None, None, False)],
                              choice)
            else:
                merged = self._upsample_merge(i, projected, x, "concat")
                x = self._conv_bn_relu(f"node_{i}", node[0], node[1], merged, fold)
            nodes.append(x)
        return x, nodes


class FusedIDAUpAdd(_FusedIDA):
    """CenterNet's IDAUpAdd (dla_fast.models.centernet.IDAUpAdd), fused:
    x_i = node_i(up_i(proj_i(l_i)) + x_{i-1}) with proj/node = conv (deformable or plain) + BN + ReLU."""

    def __init__(self, original: nn.Module, ops=ALL_OP_KINDS):
        super().__init__(original, ops)
        for i in range(1, len(self.in_channels)):
            for name in (f"proj_{i}", f"node_{i}"):
                self._add_fold(name, f"{name}.conv", f"{name}.actf.0")

    def forward(self, layers: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        self._check(layers)
        fold = self._folds(layers)
        outputs = [layers[0]]
        for i in range(1, len(layers)):
            proj, node = getattr(self, f"proj_{i}"), getattr(self, f"node_{i}")
            projected = self._conv_bn_relu(f"proj_{i}", proj.conv, proj.actf[0], layers[i], fold)
            merged = self._upsample_merge(i, projected, outputs[-1], "add")
            outputs.append(self._conv_bn_relu(f"node_{i}", node.conv, node.actf[0], merged, fold))
        return outputs
