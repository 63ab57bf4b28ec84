"""The names of the fused op kinds accelerate() can swap in, for its `include=` / `exclude=` arguments.

- "aggregate":      DLA's aggregation nodes (Root / DlaRoot) and DLA-Up's 1x1 projections (dla_fast.ops.aggregate);
- "upsample_merge": the IDA up-path's bilinear upsample merged with the finer level (dla_fast.ops.upsample_merge);
- "fold_bn":        BatchNorm folded into the convs in eval mode without gradients (dla_fast.nn.folded);
- "batchnorm_act":  BatchNorm [+ residual] + ReLU as one fused op when training (dla_fast.ops.batchnorm_act);
- "deform_conv":    deformable convs: CenterNet's DCN blocks and torchvision's DeformConv2d (dla_fast.ops.deform_conv).

A fused module keeps every op kind that is not enabled on its eager path (the PyTorch modules it replaced).
"""
from __future__ import annotations

from typing import FrozenSet

OP_KINDS = ("aggregate", "upsample_merge", "fold_bn", "batchnorm_act", "deform_conv")
ALL_OP_KINDS: FrozenSet[str] = frozenset(OP_KINDS)
