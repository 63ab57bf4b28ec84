"""Load local checkpoints from timm, the original ucbdrive code, CenterNet, CenterTrack or a training loop.

No downloads: a path (or an already loaded dict) goes in, a report of what was used comes out.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .registry import create_model, list_models

# Keys that published checkpoints carry for modules the models here do not build:
# - ucbdrive's `project` of trees with levels > 1 (never used in its forward, ucbdrive/dla issue #21);
# - the classifier `fc` of a backbone used without one (features_only, CenterNet's `base.fc`).
_KNOWN_UNUSED = (
    re.compile(r"(^|\.)level\d(\.tree\d)*\.project\.\d\.(weight|bias|running_mean|running_var|num_batches_tracked)$"),
    re.compile(r"(^|\.)fc\.(weight|bias)$"),
)
_WRAPPER_KEYS = ("state_dict", "model", "module")
# What torch.save writes first: a zip archive (since PyTorch 1.6), or the pickled magic number (legacy format).
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_HEADS = tuple(pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=p) for p in range(2, 6))
_HEAD_BYTES = 64
_SHOWN = 8  # keys listed in a message before "... and N more"


@dataclasses.dataclass
class CheckpointReport:
    """What `load_checkpoint` did: keys loaded, keys of the file it ignored, model keys it did not fill, and the
    loaded tensors holding NaN or Inf (a warning names them too)."""

    loaded: List[str]
    ignored: List[str]
    missing: List[str]
    non_finite: List[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} keys the model does not use: {', '.join(self.ignored)}")
        if self.missing:
            lines.append(f"missing {len(self.missing)} keys (left as initialised): {', '.join(self.missing)}")
        if self.non_finite:
            lines.append(f"{len(self.non_finite)} loaded tensors hold NaN or Inf: {', '.join(self.non_finite)}")
        return "\n".join(lines)


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model (another variant, another head size, ...)."""


class UnreadableCheckpoint(ValueError):
    """The file is not a checkpoint that can be read (not written by torch.save or safetensors, damaged, or
    holding objects that weights_only=True refuses)."""


def _describe(head: bytes, size: int) -> str:
    """What a file that is neither a torch.save archive nor a safetensors file seems to be, from its first bytes."""
    if size == 0:
        return "an empty file"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights themselves (fetch them with `git lfs pull`)"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a failed or redirected download?)"
    if head.startswith(b"PK"):
        return "a zip archive"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return ("a Python pickle that torch.save did not write (torch.load cannot read it, whatever weights_only; "
                "if you trust it and it holds a state dict, unpickle it yourself and pass the dict)")
    text = head.decode("utf-8", errors="ignore")  # the 64 bytes may end inside a character
    if len(text.encode()) >= len(head) - 3 and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"a text file starting with {text.strip().splitlines()[0][:40]!r}" if text.strip() else "blank text"
    return f"binary data starting with {head[:16]!r}"


def _is_safetensors(head: bytes) -> bool:
    """The safetensors layout: an 8-byte little-endian header length, then the JSON header."""
    return head[8:9] == b"{"


def _read_safetensors(path: str) -> Mapping:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ImportError(f"{path} is a safetensors file; reading it needs the safetensors package "
                          "(pip install safetensors)") from e
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError for short files)
        raise UnreadableCheckpoint(f"{path} is not a valid safetensors file: {e}") from e


def _check_torch_zip(path: str) -> None:
    """UnreadableCheckpoint unless `path` is a complete zip archive holding the data.pkl of torch.save."""
    if not zipfile.is_zipfile(path):
        raise UnreadableCheckpoint(f"{path} is a damaged or truncated zip archive (the torch.save format): its "
                                   "end is missing or corrupt; copy or download it again")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "") if names else "no files"
        raise UnreadableCheckpoint(f"{path} is a zip archive but not a torch.save checkpoint (it holds {shown}; "
                                   "no data.pkl)")


def _read(path: Union[str, os.PathLike], weights_only: bool) -> Mapping:
    """The object stored in a torch.save or safetensors file, recognised by its content (not its extension)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint path is a directory, not a file: {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
    if head.startswith(_ZIP_MAGIC):
        _check_torch_zip(path)
    elif _is_safetensors(head):
        return _read_safetensors(path)
    elif not head.startswith(_LEGACY_TORCH_HEADS):
        kind = "a safetensors file" if path.endswith(".safetensors") else "a checkpoint"
        raise UnreadableCheckpoint(f"{path} is not {kind}: it is {_describe(head, size)}. load_checkpoint reads files "
                                   "written by torch.save (.pth, .pt, .bin, .ckpt) and safetensors files.")
    try:
        with open(path, "rb") as f:  # a file object: torch.load would pick safetensors by a .safetensors name
            return torch.load(f, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if not (weights_only and "weights only load failed" in str(e).lower()):
            raise UnreadableCheckpoint(f"{path} is a torch.save checkpoint that torch.load could not unpickle "
                                       f"({_first_line(e)}); the file may be damaged") from e
        if _damaged_pickle(path, str(e)):
            raise UnreadableCheckpoint(f"{path} is a damaged torch.save checkpoint: its pickled data is corrupt (not "
                                       "a pickle that torch.save writes); copy or download it again") from None
        refused = re.findall(r"Unsupported (?:global: GLOBAL [\w.]+|[^\n.]*)", str(e))
        what = f" ({refused[0]})" if refused else ""
        raise UnreadableCheckpoint(
            f"{path} is a torch.save checkpoint that holds Python objects besides tensors{what}, which "
            "weights_only=True refuses to unpickle. If you trust the file, pass weights_only=False (unpickling can "
            "run code), or allow those classes with torch.serialization.add_safe_globals.") from e
    except (ImportError, AttributeError) as e:  # weights_only=False: a pickled class that is not importable here
        raise UnreadableCheckpoint(f"{path} pickles Python objects whose classes cannot be imported here "
                                   f"({_first_line(e)}): it was saved from another code base (torch.save(model), "
                                   "say); save model.state_dict() there and load that file") from e
    except Exception as e:  # torch reports a damaged archive as RuntimeError, a truncated pickle as EOFError, ...
        raise UnreadableCheckpoint(f"{path} looks like a torch.save checkpoint, but torch.load could not read it "
                                   f"({type(e).__name__}: {_first_line(e)}); the file may be damaged or "
                                   "truncated") from e


def _damaged_pickle(path: str, weights_only_error: str) -> bool:
    """Whether a refusal of the weights-only unpickler comes from corrupt bytes rather than from objects the file
    really holds: an opcode torch.save never writes ('Unsupported operand'), or a data.pkl that is no valid pickle
    stream (read with pickletools, which parses the opcodes and runs nothing)."""
    if "unsupported operand" in weights_only_error.lower():
        return True
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
            data = archive.read(name)  # checks the entry's CRC-32
        for _ in pickletools.genops(data):
            pass
    except Exception:  # a bad CRC (zipfile.BadZipFile), an unknown opcode or truncated argument (ValueError), ...
        return True
    return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def extract_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """Unwrap {'state_dict': ...} / {'model': ...} containers and whole pickled modules (torch.save(model), read
    with weights_only=False), and strip a DataParallel 'module.' prefix."""
    sd = checkpoint
    while True:
        if isinstance(sd, nn.Module):
            sd = sd.state_dict()
        if not isinstance(sd, Mapping):
            break
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), (Mapping, nn.Module))), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, Mapping) or not sd:
        held = "an empty dict" if isinstance(sd, Mapping) else f"a {type(sd).__name__}"
        raise CheckpointMismatch(f"the checkpoint holds no state dict (it holds {held}; looked inside "
                                 "'state_dict', 'model' and 'module')")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _signature(sd: Mapping[str, torch.Tensor]) -> Dict[str, tuple]:
    """Key -> shape, without the classifier and the ucbdrive-only keys, for comparing variants."""
    out = {}
    for k, v in sd.items():
        if any(p.search(k) for p in _KNOWN_UNUSED):
            continue
        out[k] = tuple(v.shape)
    return out


def _candidates(state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Registered models of the same family (backbone, DLA-Up, CenterNet, CenterTrack) as a state dict's keys."""
    keys = list(state_dict)
    if any(k.startswith(("base.pre_img_layer.", "base.pre_hm_layer.", "tracking.")) for k in keys):
        return list_models("centertrack_*")
    if any(k.startswith("ida_up.") for k in keys):
        return list_models("centernet_*")
    if any(k.startswith("dla_up.") for k in keys):
        return [n for n in list_models("*up") if not n.startswith("centernet_")]
    return [n for n in list_models("dla*") if not n.endswith("up")]


@functools.lru_cache(maxsize=None)
def _default_signature(name: str) -> Optional[Dict[str, tuple]]:
    """_signature of the registered model `name` with its default arguments (None if it cannot be built here)."""
    model = _build_on_meta(name, {})
    return None if model is None else _signature(model.state_dict())


def guess_variant(state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Registered models whose weights have exactly the keys and shapes of `state_dict` (head aside)."""
    want = _signature(state_dict)
    return [name for name in _candidates(state_dict) if _default_signature(name) == want]


def _heads(sd: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, int]]:
    """CenterNet heads of a state dict: name -> (output channels, head_conv), head_conv 0 for a lone 1x1 conv."""
    heads = {}
    for key, value in sd.items():
        name, _, rest = key.partition(".")
        if name in ("base", "dla_up", "ida_up") or value.dim() != 4:
            continue
        if rest == "2.weight" and f"{name}.0.weight" in sd:
            heads[name] = (value.shape[0], sd[f"{name}.0.weight"].shape[0])
        elif rest == "weight":
            heads[name] = (value.shape[0], 0)
    return heads


def _stem_key(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    return next((k for k in ("base_layer.0.weight", "base.base_layer.0.weight") if k in sd), None)


def _arguments(sd: Mapping[str, torch.Tensor]) -> Dict[str, object]:
    """The create_model arguments a state dict was built with, as far as its keys and shapes tell: in_chans,
    num_classes (DLA, DLA-Up), and for CenterNet dcn, heads, head_conv; down_ratio of DLA-Up and CenterNet."""
    arguments = {}
    stem = _stem_key(sd)
    if stem is not None and sd[stem].dim() == 4:
        arguments["in_chans"] = sd[stem].shape[1]
    if any(k.startswith("ida_up.") for k in sd):  # CenterNet
        arguments["dcn"] = any(".conv_offset_mask." in k for k in sd)
        heads = _heads(sd)
        arguments["heads"] = {name: channels for name, (channels, _) in heads.items()}
        convs = {conv for _, conv in heads.values()}
        if len(convs) == 1:
            arguments["head_conv"] = convs.pop()
    elif "fc.0.weight" in sd:  # DLA-Up segmentation
        arguments["num_classes"] = sd["fc.0.weight"].shape[0]
    elif stem == "base_layer.0.weight":  # a DLA backbone, with or without its classifier
        arguments["num_classes"] = sd["fc.weight"].shape[0] if "fc.weight" in sd else 0
    stages = {k.split(".")[1] for k in sd if k.startswith("dla_up.ida_")}
    if stages:  # DLA-Up merges levels log2(down_ratio)..5 in len(stages) steps
        arguments["down_ratio"] = 2 ** (5 - len(stages))
    return arguments


def _reasons(theirs: Mapping[str, object], ours: Mapping[str, object]) -> List[str]:
    """Why a checkpoint with create_model arguments `theirs` does not fit a model built with `ours`."""
    differ = [k for k in theirs if k in ours and theirs[k] != ours[k]]
    reasons = []
    if "dcn" in differ:
        reasons.append("the checkpoint's IDA convs are deformable (CenterNet's DCN, conv_offset_mask keys) and the "
                       "model's are plain 3x3 convs" if theirs["dcn"] else
                       "the checkpoint's IDA convs are plain 3x3 convs (FairMOT's pose_dla_conv, no conv_offset_mask "
                       "keys) and the model's are deformable")
    if "heads" in differ or "head_conv" in differ:
        reasons.append(f"the checkpoint's heads are {theirs['heads']} (head_conv {theirs.get('head_conv', 'mixed')}) "
                       f"and the model's {ours['heads']} (head_conv {ours.get('head_conv', 'mixed')})")
    if "num_classes" in differ and ours["num_classes"] != 0:
        reasons.append("the checkpoint has no classifier (no fc.weight) and the model has one" if theirs["num_classes"]
                       == 0 else f"the checkpoint's classifier has {theirs['num_classes']} classes and the model's "
                       f"{ours['num_classes']}")
    if "in_chans" in differ:
        reasons.append(f"the checkpoint takes {theirs['in_chans']} input channels and the model {ours['in_chans']}")
    if "down_ratio" in differ:
        reasons.append(f"the checkpoint's outputs have stride {theirs['down_ratio']} (down_ratio) and the model's "
                       f"{ours['down_ratio']}")
    return reasons


def _compare(sd: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], strict: bool
             ) -> Tuple[List[str], List[str], Dict[str, torch.Tensor], List[str]]:
    """(problems, ignored keys, usable tensors, model keys left missing) of loading `sd` into a model whose state
    dict is `own`. Keys of modules the model does not build (_KNOWN_UNUSED) are ignored; with strict=True every
    other key must be in both, and shapes must always agree."""
    problems, ignored, usable = [], [], {}
    for key, value in sd.items():
        if key not in own:
            if any(p.search(key) for p in _KNOWN_UNUSED):
                ignored.append(key)
            elif strict:
                problems.append(f"unexpected key {key} {tuple(value.shape)}")
            else:
                ignored.append(key)
        elif own[key].shape != value.shape:
            problems.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            usable[key] = value
    # BatchNorm counters are absent from checkpoints saved before PyTorch 0.4; they start at 0.
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if strict:
        problems += [f"missing key {k} {tuple(own[k].shape)}" for k in missing if k not in sd]
    return problems, ignored, usable, missing


def _build_on_meta(name: str, kwargs: Mapping[str, object]) -> Optional[nn.Module]:
    """create_model(name, **kwargs) without memory, or None when those arguments do not build a model."""
    try:
        with torch.device("meta"):
            return create_model(name, **kwargs)
    except (TypeError, ValueError, ImportError):
        return None


def _call(name: str, kwargs: Mapping[str, object]) -> str:
    arguments = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return f"dla_fast.create_model({name!r}{arguments})"


def _mismatch_error(problems: List[str], state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> CheckpointMismatch:
    """The error for a checkpoint that does not fit: why (another variant, other classes or heads, dcn, input
    channels, down ratio), the create_model call of a model it fits (when one is found, checked on the meta
    device), then the keys and shapes that differ."""
    model_name = getattr(model, "variant", type(model).__name__)
    own = model.state_dict()
    reasons, build = [], None
    if not any(k in own for k in state_dict):
        first = ", ".join(list(state_dict)[:3])
        reasons.append(f"none of its {len(state_dict)} tensors has a key of the model (its first keys: {first})")
    guesses = [g for g in guess_variant(state_dict) if g != model_name]
    if guesses:
        reasons.append(f"the checkpoint looks like {' or '.join(guesses)}")
    name = guesses[0] if len(guesses) == 1 else model_name
    default = _build_on_meta(name, {}) if name in list_models() else None
    if default is not None:
        theirs, defaults = _arguments(state_dict), _arguments(default.state_dict())
        ours = _arguments(own) if name == model_name else defaults
        # the arguments that differ from the defaults, and those the user set otherwise (dcn=False -> dcn=True)
        changes = {k: v for k, v in theirs.items() if k in defaults and v != defaults[k] or k in ours and v != ours[k]}
        if name == model_name and ours.get("num_classes") == 0:  # a model without classifier ignores the file's
            changes.pop("num_classes", None)
            if getattr(model, "features_only", False):
                changes["features_only"] = True
            else:
                changes["num_classes"] = 0
        candidate = _build_on_meta(name, changes)
        if candidate is not None and not _compare(state_dict, candidate.state_dict(), strict=True)[0]:
            reasons += _reasons(theirs, ours) if name == model_name else []
            build = f"Build the model as {_call(name, changes)} to load it."
            if changes.get("num_classes") and "fc.weight" in default.state_dict():
                build += " (num_classes=0 loads the backbone alone.)"
    hint = "".join([f" {'; '.join(reasons)}." if reasons else "", f" {build}" if build else ""])
    shown = problems[:_SHOWN] + ([f"... and {len(problems) - _SHOWN} more"] if len(problems) > _SHOWN else [])
    return CheckpointMismatch(f"checkpoint does not fit model {model_name}:{hint} Differences:\n  "
                              + "\n  ".join(shown))


def _non_finite(tensors: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    """Key -> number of NaN/Inf values, for the floating-point tensors that hold any."""
    counts = {}
    for key, value in tensors.items():
        if value.is_floating_point() and value.device.type != "meta":
            bad = value.numel() - int(torch.isfinite(value).sum())
            if bad:
                counts[key] = bad
    return counts


def load_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping], strict: bool = True,
                    verbose: bool = True, weights_only: bool = True) -> CheckpointReport:
    """Load a checkpoint file (or a loaded dict) into `model` in place.

    Accepts timm and ucbdrive state dicts, CenterNet's {'epoch', 'state_dict'} files and training
    checkpoints wrapped in 'state_dict' or 'model', with or without a 'module.' prefix, as torch.save or
    safetensors files (recognised by their content). Keys of modules the model does not build (ucbdrive's
    unused `project` layers, a classifier the model lacks) are ignored and reported. A checkpoint that does
    not fit raises CheckpointMismatch saying why (another variant, other classes or heads, dcn) and how to build
    a model it fits, then the keys and shapes that differ. With strict=True (the default) every other key must
    match both ways. A file that is no checkpoint raises UnreadableCheckpoint saying what it is. Tensors holding
    NaN or Inf are loaded as they are, with a RuntimeWarning naming them.
    """
    raw = checkpoint if isinstance(checkpoint, Mapping) else _read(checkpoint, weights_only)
    sd = extract_state_dict(raw)
    problems, ignored, usable, missing = _compare(sd, model.state_dict(), strict)
    if problems:
        raise _mismatch_error(problems, sd, model)

    non_finite = _non_finite(usable)
    if non_finite:
        source = os.fspath(checkpoint) if not isinstance(checkpoint, Mapping) else "the given state dict"
        listed = [f"{k} ({n} of {usable[k].numel()} values)" for k, n in non_finite.items()]
        listed = listed[:_SHOWN] + ([f"... and {len(listed) - _SHOWN} more"] if len(listed) > _SHOWN else [])
        warnings.warn(f"{len(non_finite)} tensor(s) of {source} hold NaN or Inf and were loaded as they are "
                      f"(a diverged training run?): {', '.join(listed)}", RuntimeWarning, stacklevel=2)
    model.load_state_dict(usable, strict=False)
    report = CheckpointReport(loaded=sorted(usable), ignored=sorted(ignored), missing=missing,
                              non_finite=sorted(non_finite))
    if verbose:
        print(report)
    return report
