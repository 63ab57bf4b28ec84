"""Deep Layer Aggregation (Yu et al., CVPR 2018, arXiv 1707.06484) in plain eager PyTorch.

- `Root` is the aggregation node N(x_1..x_n) = ReLU(BN(W [x_1; ...; x_n]) [+ x_1]).
- `Tree` is hierarchical deep aggregation (HDA): a binary tree of blocks whose leaves and earlier
  aggregates meet at a Root.
- `DLA` stacks the stem, two conv levels and four trees (iterative deep aggregation across stages).

The model API is timm's: `pretrained_cfg` (timm's, per variant), `feature_info` (timm's FeatureInfo accessors),
`forward_features` / `forward_head(pre_logits=)`, `forward_intermediates`, `get_classifier` / `reset_classifier`,
`set_grad_checkpointing`, `group_matcher`.

Names and layouts equal timm's `timm/models/dla.py` (and the ucbdrive original), so their state dicts
load with `strict=True`. The fused kernels are swapped in by `dla_fast.accelerate`, never here.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence as SequenceABC
from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .arguments import check_bool, check_int
from .blocks import BasicBlock, Bottle2neck, Bottleneck
from .features import FeatureInfo
from .pretrained import pretrained_cfg
from .registry import register_model

STRIDES = (1, 2, 4, 8, 16, 32)


def check_out_indices(out_indices: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    """The levels `out_indices` selects, as increasing indices in 0..5; ValueError if it is not valid.

    As in timm: an int n selects the last n levels, and negative indices count from the last level (-1 is the
    stride-32 level). Unlike timm, repeated or unordered indices are refused (timm silently returns each level
    once, finest first, so (3, 1) would not give the order asked for).
    """
    n = len(STRIDES)
    allowed = (f"an int 1..{n} (the last n levels) or a sequence of level indices in {-n}..{n - 1} "
               f"(strides {', '.join(map(str, STRIDES))}), increasing, without repeats")
    if isinstance(out_indices, numbers.Integral) and not isinstance(out_indices, bool):
        if not 1 <= out_indices <= n:
            raise ValueError(f"out_indices must be {allowed}; got {out_indices}")
        return tuple(range(n - int(out_indices), n))
    if not isinstance(out_indices, SequenceABC) or isinstance(out_indices, str) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) and -n <= i < n for i in out_indices):
        raise ValueError(f"out_indices must be {allowed}; got {out_indices!r}")
    levels = [int(i) % n for i in out_indices]
    if not levels or any(a >= b for a, b in zip(levels, levels[1:])):
        raise ValueError(f"out_indices must be {allowed}; got {out_indices!r} (levels {levels})")
    return tuple(levels)


def checkpointed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) under activation checkpointing (torch.utils.checkpoint, non-reentrant): its activations are not
    kept but recomputed in the backward. Unlike a plain checkpoint, the recomputation leaves the module's buffers
    as the first forward left them, so BatchNorm running statistics (and num_batches_tracked) move once per step,
    as without checkpointing."""
    calls = []

    def run(x: torch.Tensor) -> torch.Tensor:
        if not calls:  # the forward
            calls.append(True)
            return module(x)
        buffers = list(module.buffers())  # the recomputation in the backward
        with torch.no_grad():
            saved = [b.clone() for b in buffers]
        try:
            return module(x)
        finally:  # also when the recomputation stops early (the default non-reentrant early stop)
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)

    return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)


class Root(nn.Module):
    """Aggregation node: concatenation -> conv (k x k, k=1 in every DLA) -> BN -> [+ children[0]] -> ReLU.

    `forward` takes the children as a list `[x2, x1, *earlier]`; with `residual=True` the first child
    (which has `out_channels` channels) is added before the ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, residual: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, bias=False,
                              padding=(kernel_size - 1) // 2)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual

    def forward(self, children: List[torch.Tensor]) -> torch.Tensor:
        x = self.bn(self.conv(torch.cat(children, 1)))
        if self.residual:
            x = x + children[0]
        return self.relu(x)


class Tree(nn.Module):
    """Hierarchical deep aggregation of depth `levels`.

    levels == 1: two blocks (tree1 strided, tree2) aggregated by a Root together with `children`.
    levels > 1:  two subtrees; tree1's output joins `children`, and tree2 (whose root receives them)
                 aggregates all. `level_root` adds the downsampled input itself as a child.
    """

    def __init__(self, levels: int, block: Type[nn.Module], in_channels: int, out_channels: int,
                 stride: int = 1, level_root: bool = False, root_dim: int = 0, root_kernel_size: int = 1,
                 dilation: int = 1, root_residual: bool = False, cardinality: int = 1, base_width: int = 64):
        super().__init__()
        if root_dim == 0:
            root_dim = 2 * out_channels
        if level_root:
            root_dim += in_channels
        block_args = dict(dilation=dilation, cardinality=cardinality, base_width=base_width)
        self.downsample = nn.MaxPool2d(stride, stride=stride) if stride > 1 else nn.Identity()
        # Only levels == 1 trees use their projection; ucbdrive also built (unused) ones for deeper
        # trees, which load_checkpoint reports as ignored.
        self.project = nn.Identity()
        if levels == 1:
            self.tree1 = block(in_channels, out_channels, stride, **block_args)
            self.tree2 = block(out_channels, out_channels, 1, **block_args)
            if in_channels != out_channels:
                self.project = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
            self.root = Root(root_dim, out_channels, root_kernel_size, root_residual)
        else:
            subtree_args = dict(root_kernel_size=root_kernel_size, root_residual=root_residual, **block_args)
            self.tree1 = Tree(levels - 1, block, in_channels, out_channels, stride, root_dim=0, **subtree_args)
            self.tree2 = Tree(levels - 1, block, out_channels, out_channels, root_dim=root_dim + out_channels,
                              **subtree_args)
            self.root = None
        self.level_root = level_root
        self.root_dim = root_dim
        self.levels = levels

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                children: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        children = [] if children is None else children
        bottom = self.downsample(x)
        residual = self.project(bottom)
        if self.level_root:
            children.append(bottom)
        x1 = self.tree1(x, residual)
        if self.root is not None:
            x2 = self.tree2(x1)
            return self.root([x2, x1] + children)
        children.append(x1)
        return self.tree2(x1, None, children)


def conv_level(in_channels: int, out_channels: int, convs: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """`convs` times conv3x3 + BN + ReLU; the first conv carries the stride."""
    layers = []
    for i in range(convs):
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, stride=stride if i == 0 else 1, padding=dilation,
                      dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers)


class DLA(nn.Module):
    """DLA backbone and classifier.

    Args:
        levels: depth of each of the six levels (levels 0, 1 are conv levels, 2..5 are trees).
        channels: width of each level.
        block: BasicBlock, Bottleneck or Bottle2neck.
        num_classes: classes of the 1x1-conv classifier `fc` (an int >= 0); 0 for no classifier.
        in_chans: input channels (an int >= 1).
        residual_root: whether the Roots add their first child (DLA-102 and deeper).
        features_only: forward returns the outputs of the levels in `out_indices` (strides 1..32).
        out_indices: as timm, an int n (the last n levels) or increasing level indices in -6..5.
    Input: (N, in_chans, H, W) with H and W divisible by 32. Bad arguments raise ValueError naming them.

    `feature_info` describes the six levels (timm's FeatureInfo accessors; channels() etc. cover out_indices);
    `pretrained_cfg` (set by build_dla) is timm's configuration of the variant.
    """

    __constants__ = ["features_only"]  # TorchScript then compiles one of forward's branches

    def __init__(self, levels: Sequence[int], channels: Sequence[int], block: Type[nn.Module],
                 num_classes: int = 1000, in_chans: int = 3, cardinality: int = 1, base_width: int = 64,
                 residual_root: bool = False, features_only: bool = False,
                 out_indices: Union[int, Sequence[int]] = (1, 2, 3, 4, 5)):
        super().__init__()
        if len(levels) != 6 or len(channels) != 6:
            raise ValueError(f"DLA needs 6 levels and 6 channel widths, got {list(levels)} and {list(channels)}")
        levels = [check_int(f"levels[{i}]", n, 1) for i, n in enumerate(levels)]
        channels = [check_int(f"channels[{i}]", c, 1) for i, c in enumerate(channels)]
        num_classes = check_int("num_classes", num_classes, 0)
        in_chans = check_int("in_chans", in_chans, 1)
        cardinality = check_int("cardinality", cardinality, 1)
        base_width = check_int("base_width", base_width, 1)
        residual_root = check_bool("residual_root", residual_root)
        self.channels = tuple(channels)
        self.in_chans = in_chans
        self.features_only = check_bool("features_only", features_only)
        self.out_indices = check_out_indices(out_indices)
        self.num_classes = 0 if features_only else num_classes
        tree_args = dict(cardinality=cardinality, base_width=base_width, root_residual=residual_root)

        self.base_layer = nn.Sequential(
            nn.Conv2d(in_chans, channels[0], 7, stride=1, padding=3, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        self.level0 = conv_level(channels[0], channels[0], levels[0])
        self.level1 = conv_level(channels[0], channels[1], levels[1], stride=2)
        self.level2 = Tree(levels[2], block, channels[1], channels[2], 2, level_root=False, **tree_args)
        self.level3 = Tree(levels[3], block, channels[2], channels[3], 2, level_root=True, **tree_args)
        self.level4 = Tree(levels[4], block, channels[3], channels[4], 2, level_root=True, **tree_args)
        self.level5 = Tree(levels[5], block, channels[4], channels[5], 2, level_root=True, **tree_args)
        self.feature_info = FeatureInfo([dict(num_chs=c, reduction=s, module=f"level{i}")
                                         for i, (c, s) in enumerate(zip(channels, STRIDES))], self.out_indices)
        self.num_features = self.head_hidden_size = channels[-1]
        self.grad_checkpointing = False
        if not features_only:
            self.global_pool = nn.AdaptiveAvgPool2d(1)
            self.flatten = nn.Flatten(1)
            self.fc = nn.Conv2d(channels[-1], num_classes, 1, bias=True) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / n) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError for an input this network cannot take (rank, channels, sides)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DLA expects a 4-D image batch (N, {self.in_chans}, H, W); got {shape}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"DLA expects {self.in_chans} input channels; got {x.shape[1]} (input shape {tuple(x.shape)})")
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"DLA needs image sides divisible by 32 (its stride); got {h}x{w}. "
                             f"Resize or pad to {-(-h // 32) * 32}x{-(-w // 32) * 32}.")

    def run_level(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Level i on x, checkpointed when set_grad_checkpointing() is on and gradients are recorded."""
        level = getattr(self, f"level{i}")
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpointed(level, x)
        return level(x)

    def forward_levels(self, x: torch.Tensor, stop: int = 5) -> List[torch.Tensor]:
        """Outputs of levels 0..stop (strides 1, 2, 4, 8, 16, 32)."""
        if not torch.jit.is_scripting():  # TorchScript compiles the levels, not the Python-typed checks
            self.check_input(x)
        return self.forward_levels_from_stem(self.base_layer(x), stop)

    def forward_levels_from_stem(self, x: torch.Tensor, stop: int = 5) -> List[torch.Tensor]:
        """Outputs of levels 0..stop for the base layer's output x."""
        if torch.jit.is_scripting():  # the six levels by name (TorchScript has no getattr by string)
            level0 = self.level0(x)
            level1 = self.level1(level0)
            level2 = self.level2(level1)
            level3 = self.level3(level2)
            level4 = self.level4(level3)
            return [level0, level1, level2, level3, level4, self.level5(level4)][: stop + 1]
        outs = []
        for i in range(stop + 1):
            x = self.run_level(i, x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> the stride-32 features (N, channels[5], H / 32, W / 32)."""
        return self.forward_levels(x)[-1]

    def _check_head(self, method: str) -> None:
        if self.features_only:
            raise RuntimeError(f"{method}: this model was built with features_only=True and has no classifier head")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, then the 1x1-conv classifier (none when num_classes == 0): (N, C, h, w) ->
        (N, num_classes); pre_logits=True stops before the classifier: (N, C)."""
        self._check_head("forward_head")
        x = self.global_pool(x)
        return self.flatten(x) if pre_logits else self.flatten(self.fc(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's forward_intermediates: the outputs of levels `indices` (None: all six; an int n: the last n;
        a sequence: those levels, negative counting from the last), as a list, finest first; with the final
        (stride-32) features before it unless intermediates_only. norm is accepted and unused (DLA has no final
        norm); only output_fmt 'NCHW'. stop_early stops after the last level asked for (then, as in timm, that
        level's output stands for the final features)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' (DLA's only layout); got {output_fmt!r}")
        take = check_out_indices(6 if indices is None else indices)
        levels = self.forward_levels(x, stop=take[-1] if stop_early else 5)
        intermediates = [levels[i] for i in take]
        return intermediates if intermediates_only else (levels[-1], intermediates)

    def get_classifier(self) -> nn.Module:
        """The classifier (the 1x1 conv `fc`, nn.Identity without classes)."""
        self._check_head("get_classifier")
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for `num_classes` classes (0: none, forward returns the pooled features), on the old
        one's device and dtype, freshly initialized as nn.Conv2d is; global_pool 'avg' (or None: keep) or ''
        (no pooling: forward returns the unpooled features, or the fc output per position)."""
        self._check_head("reset_classifier")
        num_classes = check_int("num_classes", num_classes, 0)
        if global_pool not in (None, "avg", ""):
            raise ValueError(f"global_pool must be 'avg', '' (no pooling) or None (keep); got {global_pool!r}")
        if global_pool is not None:
            self.global_pool = nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()
            self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        reference = self.base_layer[0].weight
        factory = dict(device=reference.device, dtype=reference.dtype)
        self.fc = nn.Conv2d(self.num_features, num_classes, 1, bias=True, **factory) if num_classes else nn.Identity()
        self.num_classes = num_classes
        for module in (self.global_pool, self.flatten, self.fc):
            module.train(self.training)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each level's activations in the backward instead of keeping them (torch.utils.checkpoint):
        less memory for one more forward per step. Results, gradients and BatchNorm running statistics equal the
        unchecked run's; works with and without dla_fast.accelerate()."""
        self.grad_checkpointing = check_bool("enable", enable)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (layer-wise learning-rate decay): the stem, then the levels."""
        return dict(stem=r"^base_layer", blocks=r"^level(\d+)" if coarse else [
            (r"^level(\d+)\.tree(\d+)", None), (r"^level(\d+)\.root", (2,)), (r"^level(\d+)", (1,))])

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        if self.features_only:
            levels = self.forward_levels(x)
            return [levels[i] for i in self.out_indices]
        return self.forward_head(self.forward_features(x))


# name: (levels, channels, block, extra DLA arguments). Parameter counts are timm's (1000 classes).
VARIANTS = {
    "dla34": ((1, 1, 1, 2, 2, 1), (16, 32, 64, 128, 256, 512), BasicBlock, {}),
    "dla46_c": ((1, 1, 1, 2, 2, 1), (16, 32, 64, 64, 128, 256), Bottleneck, {}),
    "dla46x_c": ((1, 1, 1, 2, 2, 1), (16, 32, 64, 64, 128, 256), Bottleneck, dict(cardinality=32, base_width=4)),
    "dla60x_c": ((1, 1, 1, 2, 3, 1), (16, 32, 64, 64, 128, 256), Bottleneck, dict(cardinality=32, base_width=4)),
    "dla60": ((1, 1, 1, 2, 3, 1), (16, 32, 128, 256, 512, 1024), Bottleneck, {}),
    "dla60x": ((1, 1, 1, 2, 3, 1), (16, 32, 128, 256, 512, 1024), Bottleneck, dict(cardinality=32, base_width=4)),
    "dla102": ((1, 1, 1, 3, 4, 1), (16, 32, 128, 256, 512, 1024), Bottleneck, dict(residual_root=True)),
    "dla102x": ((1, 1, 1, 3, 4, 1), (16, 32, 128, 256, 512, 1024), Bottleneck,
                dict(cardinality=32, base_width=4, residual_root=True)),
    "dla102x2": ((1, 1, 1, 3, 4, 1), (16, 32, 128, 256, 512, 1024), Bottleneck,
                 dict(cardinality=64, base_width=4, residual_root=True)),
    "dla169": ((1, 1, 2, 3, 5, 1), (16, 32, 128, 256, 512, 1024), Bottleneck, dict(residual_root=True)),
    "dla60_res2net": ((1, 1, 1, 2, 3, 1), (16, 32, 128, 256, 512, 1024), Bottle2neck,
                      dict(cardinality=1, base_width=28)),
    "dla60_res2next": ((1, 1, 1, 2, 3, 1), (16, 32, 128, 256, 512, 1024), Bottle2neck,
                       dict(cardinality=8, base_width=4)),
}

PARAM_COUNTS = {
    "dla34": 15_742_104, "dla46_c": 1_301_400, "dla46x_c": 1_068_440, "dla60x_c": 1_319_832,
    "dla60": 22_036_632, "dla60x": 17_352_344, "dla102": 33_268_888, "dla102x": 26_309_272,
    "dla102x2": 41_282_200, "dla169": 53_389_720, "dla60_res2net": 20_848_072, "dla60_res2next": 17_032_984,
}


def build_dla(variant: str, **kwargs) -> DLA:
    """The DLA `variant` (a key of VARIANTS) with random weights; kwargs go to DLA."""
    levels, channels, block, extra = VARIANTS[variant]
    model = DLA(levels, channels, block, **{**extra, **kwargs})
    model.variant = variant
    model.pretrained_cfg = model.default_cfg = pretrained_cfg(variant)
    return model


@register_model
def dla34(**kwargs) -> DLA:
    """DLA-34 (BasicBlock)."""
    return build_dla("dla34", **kwargs)


@register_model
def dla46_c(**kwargs) -> DLA:
    """DLA-46-C (compact, Bottleneck)."""
    return build_dla("dla46_c", **kwargs)


@register_model
def dla46x_c(**kwargs) -> DLA:
    """DLA-X-46-C (compact, BottleneckX, cardinality 32)."""
    return build_dla("dla46x_c", **kwargs)


@register_model
def dla60x_c(**kwargs) -> DLA:
    """DLA-X-60-C (compact, BottleneckX, cardinality 32)."""
    return build_dla("dla60x_c", **kwargs)


@register_model
def dla60(**kwargs) -> DLA:
    """DLA-60 (Bottleneck)."""
    return build_dla("dla60", **kwargs)


@register_model
def dla60x(**kwargs) -> DLA:
    """DLA-X-60 (BottleneckX, cardinality 32)."""
    return build_dla("dla60x", **kwargs)


@register_model
def dla102(**kwargs) -> DLA:
    """DLA-102 (Bottleneck, residual roots)."""
    return build_dla("dla102", **kwargs)


@register_model
def dla102x(**kwargs) -> DLA:
    """DLA-X-102 (BottleneckX, cardinality 32, residual roots)."""
    return build_dla("dla102x", **kwargs)


@register_model
def dla102x2(**kwargs) -> DLA:
    """DLA-X-102 64 (BottleneckX, cardinality 64, residual roots)."""
    return build_dla("dla102x2", **kwargs)


@register_model
def dla169(**kwargs) -> DLA:
    """DLA-169 (Bottleneck, residual roots)."""
    return build_dla("dla169", **kwargs)


@register_model
def dla60_res2net(**kwargs) -> DLA:
    """DLA-60 with Res2Net blocks (cardinality 1, width 28, scale 4)."""
    return build_dla("dla60_res2net", **kwargs)


@register_model
def dla60_res2next(**kwargs) -> DLA:
    """DLA-60 with Res2NeXt blocks (cardinality 8, width 4, scale 4)."""
    return build_dla("dla60_res2next", **kwargs)
