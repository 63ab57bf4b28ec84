"""Drop-in fused modules and accelerate(), the one bridge from the models to the kernels."""
from .accelerate import accelerate, accelerated_modules, clear_weight_caches, restore
from .cuda_graph import CUDAGraphInference, CUDAGraphTraining
from .dcn import FusedDCNBlock, FusedDeformConv2d
from .folded import FoldedBasicBlock, FoldedBottleneck, FoldedConvBNStack
from .ida import FusedIDAUp, FusedIDAUpAdd
from .op_kinds import OP_KINDS
from .root import FusedRoot

__all__ = ["CUDAGraphInference", "CUDAGraphTraining", "FoldedBasicBlock", "FoldedBottleneck", "FoldedConvBNStack",
           "FusedDCNBlock", "FusedDeformConv2d", "FusedIDAUp", "FusedIDAUpAdd", "FusedRoot", "OP_KINDS", "accelerate",
           "accelerated_modules", "clear_weight_caches", "restore"]
