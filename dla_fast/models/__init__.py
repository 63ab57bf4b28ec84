"""Reference DLA networks in plain eager PyTorch, with weights and outputs equal to timm's."""
from .blocks import BasicBlock, Bottle2neck, Bottleneck
from .checkpoint import CheckpointMismatch, CheckpointReport, UnreadableCheckpoint, guess_variant, load_checkpoint
from .dla import DLA, PARAM_COUNTS, VARIANTS, Root, Tree, build_dla
from .registry import create_model, list_models, register_model
from .upsample import bilinear_upsample, bilinear_weights_
from .dla_up import DLASeg, DLAUp, IDAUp
from .centernet import CenterNet, DLAUpAdd, IDAConv, IDAUpAdd, ModulatedDeformConv3x3
from .centertrack import CenterTrack, CenterTrackDLA
from .head_tuple import HeadTuple

__all__ = [
    "BasicBlock", "Bottle2neck", "Bottleneck", "CheckpointMismatch", "CheckpointReport", "DLA", "PARAM_COUNTS",
    "Root", "Tree", "VARIANTS", "build_dla", "create_model", "guess_variant", "list_models", "load_checkpoint",
    "register_model", "UnreadableCheckpoint",
    "bilinear_upsample", "bilinear_weights_", "DLASeg", "DLAUp", "IDAUp",
    "CenterNet", "DLAUpAdd", "IDAConv", "IDAUpAdd", "ModulatedDeformConv3x3",
    "CenterTrack", "CenterTrackDLA", "HeadTuple",
]
