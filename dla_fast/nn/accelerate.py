"""accelerate(model): swap dla_fast's fused modules into a dla_fast or timm DLA model, reversibly."""
from __future__ import annotations

import warnings
from typing import Callable, FrozenSet, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..models.centernet import IDAConv, IDAUpAdd, ModulatedDeformConv3x3
from ..models.dla_up import IDAUp
from ..ops.common import clear_derived
from .conv_chain import check_conv_choice
from .dcn import FusedDCNBlock, FusedDeformConv2d, is_torchvision_deform_conv
from .folded import folded_replacement
from .ida import FusedIDAUp, FusedIDAUpAdd
from . import memory
from .op_kinds import OP_KINDS
from .root import FusedRoot

_STATE_ATTR = "_dla_fast_acceleration"


Conversion = Tuple[Optional[Callable[[], nn.Module]], str]


def _root_conversion(module: nn.Module, ops: FrozenSet[str]) -> Conversion:
    """(builder of the fused replacement or None, reason) for a DLA aggregation node (op kind "aggregate")."""
    name = type(module).__name__
    if name not in ("Root", "DlaRoot") or not hasattr(module, "conv") or not hasattr(module, "bn"):
        return None, ""
    if "aggregate" not in ops:
        return None, ""
    residual = bool(getattr(module, "residual", getattr(module, "shortcut", False)))
    reason = FusedRoot.unsupported(module.conv, module.bn)
    if reason:
        return None, f"{reason} (runs eagerly)"
    return (lambda: FusedRoot(module.conv, module.bn, residual, module)), ""


def _ida_conversion(module: nn.Module, ops: FrozenSet[str]) -> Conversion:
    """DLA-Up's IDAUp (concat merge) and CenterNet's IDAUpAdd (add merge): replaced when any op kind they run
    (upsample_merge, and aggregate / fold_bn / batchnorm_act / deform_conv for their steps) is enabled."""
    if isinstance(module, IDAUp):
        cls = FusedIDAUp
    elif isinstance(module, IDAUpAdd):
        cls = FusedIDAUpAdd
    else:
        return None, ""
    return (lambda: cls(module, ops)), ""


def _deform_conversion(module: nn.Module, ops: FrozenSet[str]) -> Conversion:
    """CenterNet's deformable IDAConv (outside an IDAUpAdd) and torchvision's DeformConv2d (op kind
    "deform_conv")."""
    if isinstance(module, IDAConv) and isinstance(module.conv, ModulatedDeformConv3x3):
        cls = FusedDCNBlock
    elif is_torchvision_deform_conv(module):
        cls = FusedDeformConv2d
    else:
        return None, ""
    if "deform_conv" not in ops:
        return None, ""
    reason = cls.unsupported(module)
    if reason:
        return None, f"{reason} (runs eagerly)"
    return ((lambda: cls(module, ops)) if cls is FusedDCNBlock else (lambda: cls(module))), ""


def _folded_conversion(module: nn.Module, ops: FrozenSet[str]) -> Conversion:
    """Residual blocks and conv-BN-ReLU stacks (op kinds "fold_bn" in eval, "batchnorm_act" in training)."""
    if not ops & {"fold_bn", "batchnorm_act"}:
        return None, ""
    cls, reason = folded_replacement(module)
    if cls is None:
        return None, f"{reason} (runs eagerly)" if reason else ""
    return (lambda: cls(module, ops)), ""


# Each converter looks at one module and says how to fuse it (or why it stays eager).
CONVERTERS: List[Callable[[nn.Module, FrozenSet[str]], Conversion]] = [
    _root_conversion, _ida_conversion, _deform_conversion, _folded_conversion]

OpKinds = Optional[Union[str, Iterable[str]]]


def _op_kinds(argument: str, value: OpKinds) -> Optional[FrozenSet[str]]:
    """The op kinds named by accelerate()'s `include` / `exclude` (None stays None); ValueError / TypeError
    naming the argument and listing the known kinds otherwise."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else value
    try:
        names = list(names)
    except TypeError:
        raise TypeError(f"accelerate: {argument} must be an op kind name or a list of them ({', '.join(OP_KINDS)}); "
                        f"got {value!r}") from None
    unknown = [n for n in names if not isinstance(n, str) or n not in OP_KINDS]
    if unknown:
        raise ValueError(f"accelerate: unknown op kind{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))} in {argument}; the op kinds are {', '.join(OP_KINDS)}")
    return frozenset(names)


def enabled_op_kinds(include: OpKinds = None, exclude: OpKinds = None, fold_bn: bool = True) -> FrozenSet[str]:
    """The op kinds accelerate() fuses: `include` (None: all of OP_KINDS) less `exclude`; fold_bn=False excludes
    "fold_bn" and "batchnorm_act" (the residual blocks and conv-BN-ReLU stacks stay as they are)."""
    if not isinstance(fold_bn, bool):
        raise TypeError(f"accelerate: fold_bn must be True or False; got {fold_bn!r}")
    included, excluded = _op_kinds("include", include), _op_kinds("exclude", exclude)
    ops = frozenset(OP_KINDS) if included is None else included
    ops -= excluded or frozenset()
    return ops if fold_bn else ops - {"fold_bn", "batchnorm_act"}


def _is_channels_last(model: nn.Module) -> bool:
    """Whether the model's 4-D weights are already channels_last (restore() then leaves them so)."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def accelerate(model: nn.Module, channels_last: bool = True, fold_bn: bool = True, verbose: bool = False,
               include: OpKinds = None, exclude: OpKinds = None, memory_efficient: bool = False,
               conv: str = "cudnn") -> nn.Module:
    """Replace DLA's aggregation nodes (and the other fusable pieces) of `model` by fused modules, in place.

    Works on dla_fast and timm DLA models, on any device, before or after `.to(device)`. Parameters,
    buffers and state_dict keys stay the same objects; `restore(model)` undoes it. With
    channels_last=True the model's weights go to channels_last memory format (the fused kernels' layout)
    and back on restore (unless they were channels_last already). Modules that cannot be fused are left eager
    and named in a warning. With fold_bn=True the residual blocks and conv-BN-ReLU stacks are replaced too:
    in eval mode without gradients they run with BatchNorm folded into the convs (one fused cuDNN call per
    conv on CUDA; dla_fast.nn.folded), otherwise exactly as before.
    Which kernels run is decided at call time by dla_fast.backend.

    include / exclude: op kind names (dla_fast.nn.op_kinds.OP_KINDS: "aggregate", "upsample_merge", "fold_bn",
    "batchnorm_act", "deform_conv"), a name or a list; the op kinds fused are `include` (default all) less
    `exclude`, and fold_bn=False excludes "fold_bn" and "batchnorm_act". The others keep their eager PyTorch path
    (a module whose op kinds are all kept eager is not replaced). Unknown names raise ValueError with the list.
    With memory_efficient=True the fused ops save their inputs instead of their outputs and recompute those in
    the backward (dla_fast.nn.memory; off by default until a GPU measurement shows what it costs).
    conv: which convs of the replaced blocks, conv-BN-ReLU stacks and DLA-Up nodes run, when not folded, through
    dla_fast's implicit-GEMM Triton conv with the BatchNorm + ReLU in its prologue and the batch statistics in its
    epilogue (dla_fast.nn.conv_chain): "cudnn" (default) none, "triton" every conv it takes, "auto" the shapes
    measured faster than cuDNN (none yet).
    Returns the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate: model must be an nn.Module; got {type(model).__name__}")
    ops = enabled_op_kinds(include, exclude, fold_bn)
    if not isinstance(memory_efficient, bool):
        raise TypeError(f"accelerate: memory_efficient must be True or False; got {memory_efficient!r}")
    check_conv_choice(conv)
    if getattr(model, _STATE_ATTR, None) is not None:
        raise RuntimeError("this model is already accelerated; call dla_fast.restore(model) first")
    swapped, skipped = [], []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(done + ".") for done in swapped):
            continue  # the model itself, or inside a module already replaced (which handles its own children)
        for convert in CONVERTERS:
            build, reason = convert(module, ops)
            if build is not None:
                new = build()
                if hasattr(new, "use_conv"):
                    new.use_conv(conv)
                _replace(model, name, new)
                swapped.append(name)
                break
            if reason:
                skipped.append(f"{name}: {reason}")
                break
    if not swapped:
        _refuse_a_bare_module(model, ops)
        raise ValueError(f"accelerate found nothing to fuse in {type(model).__name__}: it has no DLA "
                         "aggregation node (Root/DlaRoot), IDA up-merge step, deformable conv or foldable conv + "
                         f"BatchNorm whose op kind is enabled (enabled: {', '.join(sorted(ops)) or 'none'})")
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


def _refuse_a_bare_module(model: nn.Module, ops: FrozenSet[str]) -> None:
    """ValueError when `model` is itself a module accelerate() would replace (a bare torchvision DeformConv2d,
    Root, ...): accelerate() swaps submodules in place and cannot replace the object it was given."""
    for convert in CONVERTERS:
        build, _ = convert(model, ops)
        if build is not None:
            raise ValueError(f"accelerate replaces the fusable submodules of a model in place, but `model` is itself a "
                             f"fusable {type(model).__name__} (it would become a dla_fast.nn.{type(build()).__name__}): "
                             "wrap it, accelerate(nn.Sequential(model)), and use the wrapper")


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
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"clear_weight_caches: model must be an nn.Module or None; got {model!r} "
                        f"({type(model).__name__})")
    clear_derived()
    for module in ([] if model is None else model.modules()):
        for pair in module.fold_pairs() if hasattr(module, "fold_pairs") else []:
            pair.clear()
