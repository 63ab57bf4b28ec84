"""Implicit-GEMM convolution with a BatchNorm + ReLU prologue and a batch-statistics epilogue (issue 21).

A conv -> BN -> ReLU -> conv chain in training keeps two activations per conv in eager PyTorch (the conv output
for BatchNorm's backward, the ReLU output for the next conv's weight gradient) and passes over each twice more
(normalize, ReLU). Here the conv is a Triton implicit GEMM over channels_last inputs that
- applies the previous BatchNorm's scale / shift and the ReLU while it loads its input (the prologue; the
  normalized activation is never written, and the backward recomputes it the same way),
- writes the per-tile batch statistics of its own output in its epilogue (merged with Chan's formula), so the
  next BatchNorm's mean and variance need no pass of their own,
- reads up to two inputs through their own pointers: the channel concatenation of DLA-Up's 3x3 IDA node is never
  written.
The op returns y and, optionally, the fp32 mean and biased variance of y, all differentiable: BatchNorm then is
scale = gamma / sqrt(var + eps), shift = beta - mean * scale (tiny per-channel tensors, autograd's chain rule),
applied by the next conv's prologue. Saved for backward: the pre-BatchNorm tensors and the weights only.

Kernels in kernels.py, launchers and tile sizes (and the ahead-of-time configurations) in launch.py, validation,
eager reference and autograd in op.py. The backend op name is "conv_gemm"; dla_fast.nn.conv_chain uses it for
DLA's blocks, conv-BN-ReLU stacks and DLA-Up's node when accelerate(model, conv="triton").
"""
from .launch import kernel_configurations
from .op import (OP_NAME, ConvGemmFunction, affine_act, check_inputs, conv_gemm, conv_gemm_reference, fits_int32,
                 merge_stats)

__all__ = ["OP_NAME", "ConvGemmFunction", "affine_act", "check_inputs", "conv_gemm", "conv_gemm_reference",
           "fits_int32", "kernel_configurations", "merge_stats"]
