"""accelerate(model): swap dla_fast's fused modules into a dla_fast or timm DLA model, reversibly."""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..models.centernet import IDAConv, IDAUpAdd, ModulatedDeformConv3x3
from ..models.dla_up import IDAUp
from ..ops.common import clear_derived
from .dcn import FusedDCNBlock, FusedDeformConv2d, is_torchvision_deform_conv
from .folded import folded_replacement
from .ida import FusedIDAUp, FusedIDAUpAdd
from . import memory
from .root import FusedRoot

_STATE_ATTR = "_dla_fast_acceleration"


def _root_conversion(module: nn.Module) -> Tuple[Optional[Callable[[], nn.Module]], str]:
    """(builder of the fused replacement or None, reason) for a DLA aggregation node."""
    name = type(module).__name__
    if name not in ("Root", "DlaRoot") or not hasattr(module, "conv") or not hasattr(module, "bn"):
        return None, ""
    residual = bool(getattr(module, "residual", getattr(module, "shortcut", False)))
    reason = FusedRoot.unsupported(module.conv, module.bn)
    if reason:
        return None, f"{reason} (runs eagerly)"
    return (lambda: FusedRoot(module.conv, module.bn, residual, module)), ""


def _ida_conversion(module: nn.Module) -> Tuple[Optional[Callable[[], nn.Module]], str]:
    """DLA-Up's IDAUp (concat merge) and CenterNet's IDAUpAdd (add merge)."""
    if isinstance(module, IDAUp):
        return (lambda: FusedIDAUp(module)), ""
    if isinstance(module, IDAUpAdd):
        return (lambda: FusedIDAUpAdd(module)), ""
    return None, ""


def _deform_conversion(module: nn.Module) -> Tuple[Optional[Callable[[], nn.Module]], str]:
    """CenterNet's deformable IDAConv (outside an IDAUpAdd) and torchvision's DeformConv2d."""
    if isinstance(module, IDAConv) and isinstance(module.conv, ModulatedDeformConv3x3):
        cls = FusedDCNBlock
    elif is_torchvision_deform_conv(module):
        cls = FusedDeformConv2d
    else:
        return None, ""
    reason = cls.unsupported(module)
    if reason:
        return None, f"{reason} (runs eagerly)"
    return (lambda: cls(module)), ""


def _folded_conversion(module: nn.Module) -> Tuple[Optional[Callable[[], nn.Module]], str]:
    """Residual blocks and conv-BN-ReLU stacks: BatchNorm folded into the convs for inference."""
    cls, reason = folded_replacement(module)
    if cls is None:
        return None, f"{reason} (runs eagerly)" if reason else ""
    return (lambda: cls(module)), ""


# Each converter looks at one module and says how to fuse it (or why it stays eager).
CONVERTERS: List[Callable[[nn.Module], Tuple[Optional[Callable[[], nn.Module]], str]]] = [
    _root_conversion, _ida_conversion, _deform_conversion]
FOLD_CONVERTERS = [_folded_conversion]


def _is_channels_last(model: nn.Module) -> bool:
    """Whether the model's 4-D weights are already channels_last (restore() then leaves them so)."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def accelerate(model: nn.Module, channels_last: bool = True, fold_bn: bool = True, verbose: bool = False,
               memory_efficient: bool = False) -> nn.Module:
    """Replace DLA's aggregation nodes (and the other fusable pieces) of `model` by fused modules, in place.

    Works on dla_fast and timm DLA models, on any device, before or after `.to(device)`. Parameters,
    buffers and state_dict keys stay the same objects; `restore(model)` undoes it. With
    channels_last=True the model's weights go to channels_last memory format (the fused kernels' layout)
    and back on restore (unless they were channels_last already). Modules that cannot be fused are left eager
    and named in a warning. With fold_bn=True the residual blocks and conv-BN-ReLU stacks are replaced too:
    in eval mode without gradients they run with BatchNorm folded into the convs (one fused cuDNN call per
    conv on CUDA; dla_fast.nn.folded), otherwise exactly as before.
    Which kernels run is decided at call time by dla_fast.backend. With memory_efficient=True the fused ops save
    their inputs instead of their outputs and recompute those in the backward (dla_fast.nn.memory; off by default
    until a GPU measurement shows what it costs). Returns the model.
    """
    if getattr(model, _STATE_ATTR, None) is not None:
        raise RuntimeError("this model is already accelerated; call dla_fast.restore(model) first")
    converters = CONVERTERS + (FOLD_CONVERTERS if fold_bn else [])
    swapped, skipped = [], []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(done + ".") for done in swapped):
            continue  # the model itself, or inside a module already replaced (which handles its own children)
        for convert in converters:
            build, reason = convert(module)
            if build is not None:
                _replace(model, name, build())
                swapped.append(name)
                break
            if reason:
                skipped.append(f"{name}: {reason}")
                break
    if not swapped:
        raise ValueError(f"accelerate found nothing to fuse in {type(model).__name__}: it has no DLA "
                         "aggregation node (Root/DlaRoot), IDA up-merge step, deformable conv or foldable conv + "
                         "BatchNorm")
    if skipped:
        warnings.warn("dla_fast.accelerate left these modules eager:\n  " + "\n  ".join(skipped))
    was_channels_last = _is_channels_last(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if memory_efficient:
        memory.install(model)
    setattr(model, _STATE_ATTR, dict(swapped=swapped, restore_contiguous=channels_last and not was_channels_last))
    if verbose:
        print(f"dla_fast.accelerate: fused {len(swapped)} modules, left {len(skipped)} eager")
    return model


def accelerated_modules(model: nn.Module) -> List[str]:
    """Names of the modules accelerate() replaced (empty for a model not accelerated)."""
    state = getattr(model, _STATE_ATTR, None)
    return list(state["swapped"]) if state else []


def restore(model: nn.Module) -> nn.Module:
    """Undo accelerate(): put the original modules back (same parameters and buffers), with the children the
    fused modules hold now (e.g. the nn.SyncBatchNorm modules of a model converted after accelerate()).
    Returns the model."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError("this model was not accelerated by dla_fast.accelerate")
    for name in state["swapped"]:
        fused = model.get_submodule(name)
        original = fused.original
        for child_name, child in fused.named_children():  # replaced since accelerate() (convert_sync_batchnorm)
            if child_name in original._modules and original._modules[child_name] is not child:
                original._modules[child_name] = child
        shared = {id(m) for m in fused.modules()}  # these kept their own modes (e.g. a frozen BatchNorm)
        for m in original.modules():  # the rest take the mode the model was switched to meanwhile
            if id(m) not in shared:
                m.training = fused.training
        _replace(model, name, original)
    memory.uninstall(model)
    if state["restore_contiguous"]:
        model.to(memory_format=torch.contiguous_format)
    delattr(model, _STATE_ATTR)
    return model


def clear_weight_caches(model: Optional[nn.Module] = None) -> None:
    """Forget every weight dla_fast derived and cached: the ops' weight casts and kernel layouts, and the folded
    conv + BatchNorm weights of `model`'s accelerated modules; the next calls compute them again. These caches
    follow PyTorch's version counters, so this is needed only after a write the counters do not see: an edit
    through `tensor.data`, FSDP2's all-gather into the unsharded parameters, an optimizer step replayed from a
    CUDA graph."""
    clear_derived()
    for module in ([] if model is None else model.modules()):
        for pair in module.fold_pairs() if hasattr(module, "fold_pairs") else []:
            pair.clear()
