"""Load local checkpoints from timm, the original ucbdrive code, CenterNet, CenterTrack or a training loop.

No downloads: a path (or an already loaded dict) goes in, a report of what was used comes out.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, List, Mapping, Union

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


@dataclasses.dataclass
class CheckpointReport:
    """What `load_checkpoint` did: keys loaded, keys of the file it ignored, model keys it did not fill."""

    loaded: List[str]
    ignored: List[str]
    missing: List[str]

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} keys the model does not use: {', '.join(self.ignored)}")
        if self.missing:
            lines.append(f"missing {len(self.missing)} keys (left as initialised): {', '.join(self.missing)}")
        return "\n".join(lines)


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model (another variant, another head size, ...)."""


def _read(path: Union[str, os.PathLike], weights_only: bool) -> Mapping:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # torch's unpickler refuses non-tensor objects in weights_only mode
        if weights_only:
            raise RuntimeError(f"could not read {path} with weights_only=True ({e}). If you trust the file, "
                               "pass weights_only=False.") from e
        raise


def extract_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """Unwrap {'state_dict': ...} / {'model': ...} containers and strip a DataParallel 'module.' prefix."""
    sd = checkpoint
    while isinstance(sd, Mapping):
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointMismatch("the checkpoint holds no state dict (looked inside 'state_dict' and 'model')")
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


def guess_variant(state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    """Registered models whose weights have exactly the keys and shapes of `state_dict` (head aside)."""
    want = _signature(state_dict)
    matches = []
    for name in _candidates(state_dict):
        try:
            with torch.device("meta"):
                candidate = create_model(name)
        except TypeError:  # a model that needs arguments to be built
            continue
        if _signature(candidate.state_dict()) == want:
            matches.append(name)
    return matches


def _mismatch_error(problems: List[str], state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> CheckpointMismatch:
    model_name = getattr(model, "variant", type(model).__name__)
    guesses = guess_variant(state_dict)
    hint = f" The checkpoint looks like {' or '.join(guesses)}." if guesses else ""
    shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
    return CheckpointMismatch(f"checkpoint does not fit model {model_name}:{hint}\n  " + "\n  ".join(shown))


def load_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping], strict: bool = True,
                    verbose: bool = True, weights_only: bool = True) -> CheckpointReport:
    """Load a checkpoint file (or a loaded dict) into `model` in place.

    Accepts timm and ucbdrive state dicts, CenterNet's {'epoch', 'state_dict'} files and training
    checkpoints wrapped in 'state_dict' or 'model', with or without a 'module.' prefix. Keys of modules
    the model does not build (ucbdrive's unused `project` layers, a classifier the model lacks) are
    ignored and reported. A checkpoint of another variant raises CheckpointMismatch naming the keys and
    shapes that differ. With strict=True (the default) every other key must match both ways.
    """
    raw = checkpoint if isinstance(checkpoint, Mapping) else _read(checkpoint, weights_only)
    sd = extract_state_dict(raw)
    own = model.state_dict()

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
    if problems:
        raise _mismatch_error(problems, sd, model)

    model.load_state_dict(usable, strict=False)
    report = CheckpointReport(loaded=sorted(usable), ignored=sorted(ignored), missing=missing)
    if verbose:
        print(report)
    return report
