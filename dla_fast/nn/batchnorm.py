"""Which BatchNorm modules the fused modules take, and how a SyncBatchNorm's synchronization reaches the ops."""
from __future__ import annotations

import torch.nn as nn

BATCHNORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)  # nn.SyncBatchNorm is not a BatchNorm2d subclass
_BATCHNORM_FORWARDS = (nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward)


def batchnorm_unsupported(bn: nn.Module) -> str:
    """Why `bn` is not a BatchNorm the fused ops can stand in for ('' when it is): nn.BatchNorm2d or
    nn.SyncBatchNorm (or a subclass that keeps their forward)."""
    if not isinstance(bn, BATCHNORM_TYPES):
        return f"its normalization is a {type(bn).__name__}, not nn.BatchNorm2d or nn.SyncBatchNorm"
    if type(bn).forward not in _BATCHNORM_FORWARDS:
        return f"{type(bn).__name__} is not a plain BatchNorm2d or SyncBatchNorm (a subclass with its own forward)"
    return ""


def sync_args(bn: nn.Module) -> dict:
    """The `sync` / `process_group` arguments of dla_fast.ops.aggregate and batchnorm_act for module `bn`:
    an nn.SyncBatchNorm synchronizes over its process_group (None: the whole world) as it would itself."""
    if isinstance(bn, nn.SyncBatchNorm):
        return dict(sync=True, process_group=bn.process_group)
    return dict(sync=False, process_group=None)
