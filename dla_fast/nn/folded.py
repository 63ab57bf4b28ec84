"""Inference-folded conv + BatchNorm modules: drop-ins for DLA's residual blocks and conv-BN-ReLU stacks.

In eval mode, without gradients, each conv + BN [+ residual] [+ ReLU] of the block runs as one convolution
with the BatchNorm folded into its weight and bias (dla_fast.ops.conv_bn_act: one fused cuDNN call on CUDA).
In training mode, or when gradients are wanted, each conv runs as it is (cuDNN) and its BatchNorm [+ residual]
[+ ReLU] as one fused autograd op (dla_fast.ops.batchnorm_act: one statistics pass and one normalize pass forward,
one reduction pass and one input-gradient pass backward, running statistics as nn.BatchNorm2d) when the backend
for the op "batchnorm_act_training" is not 'torch' (`auto` keeps eager there until a GPU measurement shows the
fused path faster; backend 'triton' or 'cuda' forces it) and every BatchNorm is a plain nn.BatchNorm2d
(SyncBatchNorm: below). Otherwise, and with backend 'torch', the module runs the block it
replaced, unchanged. The folded weights are cached per dtype and device and recomputed whenever a parameter or a
running statistic changes (PyTorch's version counters and data pointers), or the module's mode is switched;
an in-place edit through `tensor.data` bypasses the version counters (call `.eval()` again after one), and
inference tensors (no version counter) are refolded at every call. Hooks registered on the blocks' conv and
BatchNorm submodules run only on the eager path (a folded call does not call those submodules).

Replaces DLA's BasicBlock / timm's DlaBasic, Bottleneck / DlaBottleneck (also the X variants) — only these
classes, from dla_fast.models.blocks and timm.models.dla, with exactly their children — and nn.Sequential
stacks of (Conv2d, BatchNorm2d[, ReLU]) (base layer, level0/level1, tree projections). Res2Net blocks
(Bottle2neck) stay eager.

SyncBatchNorm: a replaced module with an nn.SyncBatchNorm in training runs its convs eagerly and each BatchNorm
[+ residual] [+ ReLU] through dla_fast.ops.batchnorm_act with the SyncBatchNorm's synchronization (which,
unlike nn.SyncBatchNorm, also runs on CPU with gloo). Models may be converted with
nn.SyncBatchNorm.convert_sync_batchnorm before or after accelerate(): the replaced module and its folded pairs
follow its children as they are now, and hand them on to the module it replaced.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake

from .. import backend
from ..ops import recompute
from ..ops.batchnorm_act import batchnorm_act
from ..ops.batchnorm_act.op import OP_NAME as BATCHNORM_ACT_OP
from ..ops.conv_bn_act import OP_NAME, compute_dtype, conv_bias_act, fold_batchnorm, foldable
from .batchnorm import BATCHNORM_TYPES, batchnorm_unsupported, sync_args
from .conv_chain import chain_applies, check_conv_choice, run_chain
from .op_kinds import ALL_OP_KINDS

# The backend op name of the unfolded path (training, or gradients wanted): conv + fused BatchNorm-act.
TRAINING_OP_NAME = "batchnorm_act_training"


def unsupported(conv: nn.Module, bn: nn.Module) -> str:
    """Why this (conv, bn) pair cannot be folded ('' when it can)."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return f"conv padding {conv.padding!r} / padding_mode {conv.padding_mode!r} (folding takes zero padding)"
    reason = batchnorm_unsupported(bn)
    if reason:
        return reason
    if bn.running_mean is None or bn.running_var is None:
        return f"{type(bn).__name__} without running statistics"
    if conv.out_channels != bn.num_features:
        return f"conv has {conv.out_channels} output channels, BatchNorm {bn.num_features}"
    return ""


class FoldedConvBN:
    """One conv + BN pair, folded on demand. Not a module: it refers to modules owned by its parent."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        reason = unsupported(conv, bn)
        if reason:
            raise ValueError(f"cannot fold this conv and BatchNorm: {reason}")
        self.conv, self.bn = conv, bn
        self._cache: Dict[torch.dtype, Tuple[tuple, torch.Tensor, torch.Tensor, bool]] = {}

    def tensors(self) -> List[Optional[torch.Tensor]]:
        conv, bn = self.conv, self.bn
        return [conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]

    def clear(self) -> None:
        self._cache.clear()

    def folded(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) with the BatchNorm folded in, in `dtype`: cached per dtype (one entry each), refolded
        when any source tensor changed in place, was replaced or moved."""
        return self._folded(dtype)[:2]

    def _folded(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """(weight, bias, finite): `finite` says whether every folded value is finite. Degenerate statistics
        (running_var + eps == 0, or a scale that overflows `dtype`) make the fold non-finite, and a folded
        scale of Inf turns the conv's sums into Inf - Inf = NaN where BatchNorm's (y - mean) / sqrt(var + eps)
        * weight + bias gives +-Inf: the callers then run the unfolded path (conv, then the BatchNorm's
        running-statistics normalization), which has that formula's NaN / Inf pattern. Checked on the host
        once per fold (not under torch.compile or CUDA-graph capture, which cannot read a value back)."""
        tensors, eps = self.tensors(), self.bn.eps
        if torch.compiler.is_compiling():  # traced: folded in the graph, no Python-side state
            return (*fold_batchnorm(*tensors, eps, dtype), True)
        if any(t is not None and t.is_inference() for t in tensors):  # no version counter: fold every call
            return _checked(*fold_batchnorm(*tensors, eps, dtype))
        stamp = tuple((t._version, t.data_ptr(), t.device) if t is not None else None for t in tensors) + (eps,)
        hit = self._cache.get(dtype)
        if hit is None or hit[0] != stamp:
            hit = self._cache[dtype] = (stamp, *_checked(*fold_batchnorm(*tensors, eps, dtype)))
        return hit[1], hit[2], hit[3]

    def cached(self) -> List[torch.Tensor]:
        """The folded weights and biases held now (CUDAGraphInference keeps them alive for its graphs)."""
        return [t for _, weight, bias, _ in self._cache.values() for t in (weight, bias)]

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, relu: bool = True) -> torch.Tensor:
        weight, bias, finite = self._folded(compute_dtype(x))
        if not finite:
            return self.unfolded(x, residual, relu)
        conv = self.conv
        return conv_bias_act(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, residual, relu)

    def unfolded(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, relu: bool = True) -> torch.Tensor:
        """The training path: the conv module as it is, then its BatchNorm [+ residual] [+ ReLU] as one fused
        op with nn.BatchNorm2d's semantics (batch statistics and running-statistics update in training; a
        SyncBatchNorm synchronized over its process group). A residual of another dtype than the conv's output
        (autocast) is cast to it first."""
        y = self.conv(x)
        bn = self.bn
        if residual is not None and residual.dtype != y.dtype:
            residual = residual.to(y.dtype)
        return batchnorm_act(y, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                             bn.training, bn.momentum, bn.eps, residual, relu, **sync_args(bn))


def _checked(weight: torch.Tensor, bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """(weight, bias, whether both are finite) of a fold; finite is assumed where no value can be read back: while a
    CUDA graph is captured, and for meta and fake tensors (dla_fast.cost's tracing of a step)."""
    if weight.device.type == "meta" or is_fake(weight):
        return weight, bias, True
    if weight.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return weight, bias, True
    return weight, bias, bool(torch.isfinite(weight).all() and torch.isfinite(bias).all())


def synchronized(pairs: List[FoldedConvBN]) -> bool:
    """Whether a call runs with a SyncBatchNorm in training (then unfolded through batchnorm_act: nn.SyncBatchNorm
    itself refuses CPU tensors in a process group)."""
    return any(isinstance(p.bn, nn.SyncBatchNorm) and p.bn.training for p in pairs)


def fold_applies(module: nn.Module, pairs: List[FoldedConvBN], x: torch.Tensor, *inputs) -> bool:
    """Whether `module` runs this call folded: eval mode, no gradient wanted (of the parameters, of x, of the
    other `inputs` — a residual, IDA levels), a backend other than 'torch' for x's device and dtype ('auto'
    runs fp64 eagerly)."""
    if any(p.bn.training for p in pairs) or not foldable(x, *inputs):
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
        return False
    return backend.resolve(x.device, OP_NAME, x.dtype) != "torch"


def fused_training_applies(pairs: List[FoldedConvBN], x: torch.Tensor) -> bool:
    """Whether a call that is not folded runs conv + fused BatchNorm-act: every BatchNorm a plain
    nn.BatchNorm2d, and the backend for TRAINING_OP_NAME not 'torch' — or, inside the memory-efficient mode
    (dla_fast.ops.recompute, where only the fused op saves less than eager), the backend for the op itself."""
    if any(type(p.bn).forward is not nn.BatchNorm2d.forward for p in pairs):
        return False
    op = BATCHNORM_ACT_OP if recompute.active() else TRAINING_OP_NAME
    return backend.resolve(x.device, op, x.dtype) != "torch"


class _Folded(nn.Module):
    """Shares the replaced module's children (same parameters and state_dict keys); `original` gives it back.
    Subclasses name their (conv, bn) pairs in `pair_names`. `ops`: the op kinds it may run fused ("fold_bn" in
    eval, "batchnorm_act" in training; dla_fast.nn.op_kinds), the others run eagerly."""

    def __init__(self, original: nn.Module, ops=ALL_OP_KINDS):
        super().__init__()
        reason = self.unsupported(original)
        if reason:
            raise ValueError(f"{type(self).__name__} cannot replace this {type(original).__name__}: {reason}")
        for name, child in original.named_children():
            self.add_module(name, child)
        self.training = original.training
        self.__dict__["_original"] = original  # not a submodule: no duplicate state_dict keys
        self.__dict__["_ops"] = frozenset(ops)
        self.__dict__["_conv"] = "cudnn"
        self.__dict__["_pair_names"] = self.pair_names(original)
        self.__dict__["_pairs"] = [FoldedConvBN(getattr(self, c), getattr(self, b))
                                   for c, b in self.__dict__["_pair_names"]]

    @staticmethod
    def pair_names(module: nn.Module) -> List[Tuple[str, str]]:
        raise NotImplementedError

    @classmethod
    def unsupported(cls, module: nn.Module) -> str:
        """Why `module` cannot be replaced ('' when it can)."""
        pairs = cls.pair_names(module)
        if not pairs:
            return "no conv + BatchNorm pair"
        for c, b in pairs:
            reason = unsupported(getattr(module, c, None), getattr(module, b, None))
            if reason:
                return f"{c} + {b}: {reason}"
        return ""

    @property
    def original(self) -> nn.Module:
        """The replaced module, given this module's children as they are now."""
        original = self.__dict__["_original"]
        for name, child in self._modules.items():
            if original._modules.get(name) is not child:
                original._modules[name] = child
        return original

    @property
    def pairs(self) -> List[FoldedConvBN]:
        """The folded pairs, rebuilt when a child was replaced (e.g. by convert_sync_batchnorm)."""
        pairs = self.__dict__["_pairs"]
        live = [(getattr(self, c), getattr(self, b)) for c, b in self.__dict__["_pair_names"]]
        if any(p.conv is not conv or p.bn is not bn for p, (conv, bn) in zip(pairs, live)):
            pairs = self.__dict__["_pairs"] = [FoldedConvBN(conv, bn) for conv, bn in live]
        return pairs

    def fold_pairs(self) -> List[FoldedConvBN]:
        return self.pairs

    def use_conv(self, choice: str) -> None:
        """Which convs a call that is not folded runs through the implicit GEMM (dla_fast.nn.conv_chain): "cudnn",
        "triton" or "auto" (accelerate's `conv`)."""
        self.__dict__["_conv"] = check_conv_choice(choice)

    def runs_chain(self, x: torch.Tensor) -> bool:
        """Whether a call that is not folded runs as an implicit-GEMM conv chain (dla_fast.nn.conv_chain)."""
        pairs = self.pairs
        return chain_applies(self.__dict__["_conv"], [p.conv for p in pairs], [p.bn for p in pairs], x)

    def chain(self, x: torch.Tensor, relus: List[bool], residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return run_chain([(p.conv, p.bn, relu) for p, relu in zip(self.pairs, relus)], [(x, None, None, False)],
                         self.__dict__["_conv"], residual)

    def folds(self, x: torch.Tensor, *inputs) -> bool:
        return "fold_bn" in self.__dict__["_ops"] and fold_applies(self, self.pairs, x, *inputs)

    def runs_unfolded(self, x: torch.Tensor) -> bool:
        """Whether a call that is not folded runs conv + fused BatchNorm-act (a SyncBatchNorm in training, or
        fused_training_applies), when the op kind "batchnorm_act" is enabled."""
        return "batchnorm_act" in self.__dict__["_ops"] and (
            synchronized(self.pairs) or fused_training_applies(self.pairs, x))

    def train(self, mode: bool = True):
        for pair in self.pairs:
            pair.clear()
        self.original.training = mode
        return super().train(mode)


_BLOCK_MODULES = ("dla_fast.models.blocks", "timm.models.dla")


class _FoldedBlock(_Folded):
    """A DLA residual block: its children must be exactly the named convs, BatchNorms and one nn.ReLU."""

    CLASS_NAMES: Tuple[str, ...] = ()

    @classmethod
    def unsupported(cls, module: nn.Module) -> str:
        if type(module).__name__ not in cls.CLASS_NAMES or type(module).__module__ not in _BLOCK_MODULES:
            return f"{type(module).__module__}.{type(module).__name__} is not a DLA block"
        expected = {name for pair in cls.pair_names(module) for name in pair} | {"relu"}
        children = dict(module.named_children())
        if set(children) != expected or not isinstance(children["relu"], nn.ReLU):
            return f"children {sorted(children)} differ from a DLA block's {sorted(expected)}"
        return super().unsupported(module)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, children=None,
                shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
        residual = shortcut if residual is None else residual  # timm names it `shortcut`
        if self.folds(x, residual):
            run = [pair.__call__ for pair in self.pairs]
        elif self.runs_chain(x):
            return self.chain(x, [True] * len(self.pairs), x if residual is None else residual)
        elif self.runs_unfolded(x):
            run = [pair.unfolded for pair in self.pairs]
        else:
            return self.original(x, residual)
        out = x
        for step in run[:-1]:
            out = step(out)
        return run[-1](out, x if residual is None else residual)


class FoldedBasicBlock(_FoldedBlock):
    """DLA's BasicBlock / timm's DlaBasic: relu(bn2(conv2(relu(bn1(conv1(x))))) + residual), two folded convs."""

    CLASS_NAMES = ("BasicBlock", "DlaBasic")

    @staticmethod
    def pair_names(module: nn.Module) -> List[Tuple[str, str]]:
        return [("conv1", "bn1"), ("conv2", "bn2")]


class FoldedBottleneck(_FoldedBlock):
    """DLA's Bottleneck (and BottleneckX) / timm's DlaBottleneck: 1x1, 3x3 (grouped), 1x1 folded convs."""

    CLASS_NAMES = ("Bottleneck", "DlaBottleneck")

    @staticmethod
    def pair_names(module: nn.Module) -> List[Tuple[str, str]]:
        return [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]


def _stack_layout(module: nn.Module) -> Optional[List[Tuple[str, str, bool]]]:
    """(conv name, bn name, followed by ReLU) for an nn.Sequential of (Conv2d, BatchNorm2d[, ReLU])+, else None."""
    if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
        return None
    items = list(module.named_children())
    layout, i = [], 0
    while i < len(items):
        if i + 1 >= len(items) or not isinstance(items[i][1], nn.Conv2d) or not isinstance(items[i + 1][1],
                                                                                          BATCHNORM_TYPES):
            return None
        relu = i + 2 < len(items) and isinstance(items[i + 2][1], nn.ReLU)
        layout.append((items[i][0], items[i + 1][0], relu))
        i += 3 if relu else 2
    return layout or None


class FoldedConvBNStack(_Folded):
    """An nn.Sequential of (Conv2d, BatchNorm2d[, ReLU])+: DLA's base layer, level0/level1 and tree projections."""

    @staticmethod
    def pair_names(module: nn.Module) -> List[Tuple[str, str]]:
        return [(c, b) for c, b, _ in _stack_layout(module) or ()]

    def __init__(self, original: nn.Module, ops=ALL_OP_KINDS):
        super().__init__(original, ops)
        self.relus = [relu for _, _, relu in _stack_layout(original)]

    def __getitem__(self, index):
        return self.original[index]

    def __len__(self) -> int:
        return len(self.original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folds(x):
            run = [pair.__call__ for pair in self.pairs]
        elif self.runs_chain(x):
            return self.chain(x, self.relus)
        elif self.runs_unfolded(x):
            run = [pair.unfolded for pair in self.pairs]
        else:
            return self.original(x)
        for step, relu in zip(run, self.relus):
            x = step(x, relu=relu)
        return x


def folded_replacement(module: nn.Module) -> Tuple[Optional[type], str]:
    """(the Folded class that replaces `module`, or None; why not, for a DLA block that cannot be folded)."""
    for cls in (FoldedBasicBlock, FoldedBottleneck):
        if type(module).__name__ in cls.CLASS_NAMES and type(module).__module__ in _BLOCK_MODULES:
            reason = cls.unsupported(module)
            return (None, reason) if reason else (cls, "")
    if _stack_layout(module) is None:
        return None, ""
    reason = FoldedConvBNStack.unsupported(module)
    return (None, reason) if reason else (FoldedConvBNStack, "")
