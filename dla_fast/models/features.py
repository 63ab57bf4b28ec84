"""FeatureInfo: what each level of a backbone outputs, with timm's accessors (timm.models._features.FeatureInfo).

    model = dla_fast.create_model("dla34", features_only=True)     # out_indices (1, 2, 3, 4, 5)
    model.feature_info.channels()      # [32, 64, 128, 256, 512]: the levels the model returns
    model.feature_info.reduction()     # [2, 4, 8, 16, 32]
    model.feature_info.module_name()   # ['level1', ..., 'level5']
    model.feature_info[0]              # {'num_chs': 16, 'reduction': 1, 'module': 'level0', 'index': 0}

Indexing and len() cover every level (as the list timm's classifiers carry); the accessors, called without an
index, cover the levels in `out_indices` (as timm's features_only models).
"""
from __future__ import annotations

from copy import deepcopy
from typing import Dict, List, Optional, Sequence, Union

Index = Optional[Union[int, Sequence[int]]]


class FeatureInfo:
    """Per-level dicts {num_chs, reduction, module, index} and the levels a model returns (`out_indices`)."""

    def __init__(self, feature_info: List[Dict], out_indices: Sequence[int]):
        self.info = [dict(info, index=i) for i, info in enumerate(feature_info)]
        self.out_indices = tuple(out_indices)

    def from_other(self, out_indices: Sequence[int]) -> "FeatureInfo":
        return FeatureInfo(deepcopy(self.info), out_indices)

    def get(self, key: str, idx: Index = None):
        """`key` of each returned level (idx None), of level idx (an int), or of the levels idx (a sequence)."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Optional[Sequence[str]] = None, idx: Index = None):
        """The info dicts (only `keys`, if given) of the levels selected as in `get`."""
        def pick(i):
            return self.info[i] if keys is None else {k: self.info[i][k] for k in keys}
        if idx is None:
            return [pick(i) for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [pick(i) for i in idx]
        return pick(idx)

    def channels(self, idx: Index = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: Index = None):
        return self.get("reduction", idx)

    def module_name(self, idx: Index = None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __iter__(self):
        return iter(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo({self.info}, out_indices={self.out_indices})"
