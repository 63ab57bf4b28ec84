"""What `torch.jit.script` compiles for the models whose submodules are reached by computed names.

DLA-Up's and CenterNet's IDA steps are `proj_i` / `up_i` / `node_i` and `ida_k`, and CenterNet's heads are
attributes named after the heads (the checkpoints' keys fix those names); TorchScript cannot look a submodule
up by a name it computes. `torch.jit.script(model)` calls `model.__prepare_scriptable__()` first (DLASeg,
CenterNet and CenterTrack define it): it returns one of the modules below, which hold the *same* submodules
(shared, not copied) in `nn.ModuleList`s / an `nn.ModuleDict` and compute exactly what the eager forward does.
The eager model is left as it was; the scripted module's state_dict names the shared submodules by those
containers (`dla_up.idas.0.projs.0.0.weight`, `heads.hm.0.weight`), so load checkpoints into the eager model
before scripting. The backbones script as they are (DLA.forward_levels has a TorchScript branch).
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .centernet import LAST_LEVEL, CenterNet, DLAUpAdd, IDAUpAdd
from .centertrack import CenterTrack
from .dla_up import DLASeg, DLAUp, IDAUp


def _steps(ida: nn.Module) -> Tuple[nn.ModuleList, nn.ModuleList, nn.ModuleList]:
    """(projs, ups, nodes) of an IDA module: its proj_i, up_i and node_i for i >= 1, in order."""
    steps = range(1, len(ida.in_channels))
    return tuple(nn.ModuleList([getattr(ida, f"{kind}_{i}") for i in steps]) for kind in ("proj", "up", "node"))


def _same_mode(module: nn.Module, original: nn.Module) -> nn.Module:
    module.training = original.training  # this module only: the shared children keep their own modes
    return module


class ScriptableIDAUp(nn.Module):
    """IDAUp (concatenation nodes): x_0 = up_0(proj_0(l_0)), x_i = node_i(cat([x_{i-1}, up_i(proj_i(l_i))]))."""

    def __init__(self, ida: IDAUp):
        super().__init__()
        self.inputs = len(ida.in_channels)
        self.proj0, self.up0 = ida.proj_0, ida.up_0
        self.projs, self.ups, self.nodes = _steps(ida)
        _same_mode(self, ida)

    def forward(self, layers: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if len(layers) != self.inputs:
            raise ValueError("IDAUp was built for {} inputs; got {}".format(self.inputs, len(layers)))
        x = self.up0(self.proj0(layers[0]))
        nodes: List[torch.Tensor] = []
        i = 1
        for proj, up, node in zip(self.projs, self.ups, self.nodes):
            x = node(torch.cat([x, up(proj(layers[i]))], 1))
            nodes.append(x)
            i += 1
        return x, nodes


class ScriptableDLAUp(nn.Module):
    """DLAUp: stage k merges level n-2-k with the previous stage's outputs; returns the last stage's output."""

    def __init__(self, dla_up: DLAUp):
        super().__init__()
        self.levels = len(dla_up.channels)
        self.idas = nn.ModuleList([ScriptableIDAUp(getattr(dla_up, f"ida_{k}")) for k in range(self.levels - 1)])
        _same_mode(self, dla_up)

    def forward(self, layers: List[torch.Tensor]) -> torch.Tensor:
        if len(layers) != self.levels:
            raise ValueError("DLAUp was built for {} levels; got {}".format(self.levels, len(layers)))
        x = layers[-1]
        k = 0
        for ida in self.idas:
            j = self.levels - 2 - k
            x, nodes = ida(layers[j:])
            layers = layers[:j + 1] + nodes
            k += 1
        return x


class ScriptableDLASeg(nn.Module):
    """DLASeg: (log_softmax(up(logits)), logits) with logits = fc(dla_up(levels first..5))."""

    def __init__(self, model: DLASeg):
        super().__init__()
        self.first_level = model.first_level
        self.base, self.fc, self.up = model.base, model.fc, model.up
        self.dla_up = ScriptableDLAUp(model.dla_up)
        _same_mode(self, model)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        levels = self.base.forward_levels(x)
        logits = self.fc(self.dla_up(levels[self.first_level:]))
        return torch.log_softmax(self.up(logits), dim=1), logits


class ScriptableIDAUpAdd(nn.Module):
    """IDAUpAdd (additive nodes): x_0 = l_0, x_i = node_i(up_i(proj_i(l_i)) + x_{i-1}); returns every x_i."""

    def __init__(self, ida: IDAUpAdd):
        super().__init__()
        self.inputs = len(ida.in_channels)
        self.projs, self.ups, self.nodes = _steps(ida)
        _same_mode(self, ida)

    def forward(self, layers: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(layers) != self.inputs:
            raise ValueError("IDAUpAdd was built for {} inputs; got {}".format(self.inputs, len(layers)))
        outputs = [layers[0]]
        i = 1
        for proj, up, node in zip(self.projs, self.ups, self.nodes):
            outputs.append(node(up(proj(layers[i])) + outputs[-1]))
            i += 1
        return outputs


class ScriptableDLAUpAdd(nn.Module):
    """DLAUpAdd: [last output of each stage, finest first, then the coarsest level]."""

    def __init__(self, dla_up: DLAUpAdd):
        super().__init__()
        self.levels = len(dla_up.channels)
        self.idas = nn.ModuleList([ScriptableIDAUpAdd(getattr(dla_up, f"ida_{k}"))
                                   for k in range(self.levels - 1)])
        _same_mode(self, dla_up)

    def forward(self, layers: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(layers) != self.levels:
            raise ValueError("DLAUpAdd was built for {} levels; got {}".format(self.levels, len(layers)))
        outputs = [layers[-1]]
        k = 0
        for ida in self.idas:
            j = self.levels - 2 - k
            layers = layers[:j] + ida(layers[j:])
            outputs.insert(0, layers[-1])
            k += 1
        return outputs


class ScriptableCenterNet(nn.Module):
    """CenterNet: the up path on levels first..5, then [{head: head(features)}] in the heads' order."""

    def __init__(self, model: CenterNet):
        super().__init__()
        self.first_level = model.first_level
        self.merged = LAST_LEVEL - model.first_level  # the levels ida_up merges
        self.base = model.base
        self.dla_up = ScriptableDLAUpAdd(model.dla_up)
        self.ida_up = ScriptableIDAUpAdd(model.ida_up)
        self.heads = nn.ModuleDict({name: getattr(model, name) for name in model.heads})
        _same_mode(self, model)

    def forward(self, x: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        return self.forward_from_levels(self.base.forward_levels(x))

    def forward_from_levels(self, levels: List[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        pyramid = self.dla_up(levels[self.first_level:])
        features = self.ida_up(pyramid[:self.merged])[-1]
        out: Dict[str, torch.Tensor] = {}
        for name, head in self.heads.items():
            out[name] = head(features)
        return [out]


class ScriptableCenterTrack(ScriptableCenterNet):
    """CenterTrack: CenterNet with the previous frame and heatmap added to the backbone's stem."""

    def forward(self, img: torch.Tensor, pre_img: Optional[torch.Tensor] = None,
                pre_hm: Optional[torch.Tensor] = None) -> List[Dict[str, torch.Tensor]]:
        return self.forward_from_levels(self.base.forward_levels(img, pre_img, pre_hm))


def scriptable(model: nn.Module) -> nn.Module:
    """The module torch.jit.script compiles for `model` (DLASeg, CenterNet or CenterTrack), sharing its
    submodules."""
    if isinstance(model, CenterTrack):
        return ScriptableCenterTrack(model)
    if isinstance(model, CenterNet):
        return ScriptableCenterNet(model)
    if isinstance(model, DLASeg):
        return ScriptableDLASeg(model)
    raise TypeError(f"no scriptable form for {type(model).__name__}")
