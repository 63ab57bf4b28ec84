"""The DLA aggregation node, fused: N(x_1..x_n) = ReLU(BN(W [x_1; ...; x_n]) [+ x_1]).

Eager PyTorch writes the concatenation, then runs a 1x1 conv, a BatchNorm and a ReLU, each a pass over
memory. Here the 1x1 conv is a GEMM  y[M, Cout] = sum_i x_i[M, C_i] @ W[:, K_i]^T  (M = N*H*W, the K
dimension split across the children, each child read through its own pointer, the concatenation never
written), and BatchNorm, the residual and the ReLU are applied in the GEMM's epilogue.

Layouts: activations are NHWC (channels_last), seen as row-major [M, C]; NCHW inputs are converted once.
The 1x1 conv weight is [Cout, K] with K = sum C_i in the children's order.

Kernels (Triton, fp32 accumulation, int64 row offsets):
- `aggregate_fwd_kernel`: the GEMM; its epilogue either applies BN (+residual) + ReLU with given statistics
  (eval) and/or writes the pre-BN output y together with per-tile channel sums and centred sums of squares
  (training), merged by `aggregate_stats_merge_kernel` (Chan's parallel variance, deterministic), in two levels
  (`aggregate_stats_group_kernel` first) when there are many row tiles; in eager training its program 0 also
  counts the batch in num_batches_tracked, and the merge folds the statistics into the running ones.
- training forward then normalizes y with the batch statistics (`bn_apply` of dla_fast.ops.batchnorm_act).
- `aggregate_grad_input_kernel`: grad of every child = dy @ W_i, where dy (the gradient at y) comes from
  grad_out, the saved output (ReLU mask) and y: computed on the fly when the children fit one column tile (the
  programs of that column also store dy for the weight gradient), else materialised once by
  `aggregate_dy_kernel`; child 0 also gets the residual's gradient.
- `aggregate_grad_weight_kernel`: grad W = dy^T @ [x_1 ... x_n], split over M, partials summed once.

The public entry point is `aggregate(...)`, which picks the implementation with dla_fast.backend
(op name "aggregate"); the kernels are wrapped as the torch.library custom ops `dla_fast::aggregate_fwd`
and `dla_fast::aggregate_bwd`, with fake implementations and registered autograd.

Module layout: kernels.py (Triton), launch.py (tile sizes, launchers, `kernel_configurations` for the
ahead-of-time sm_90 check), op.py (eager reference, validation, autograd, custom ops, public entry point).
"""
from .launch import kernel_configurations
from .kernels import MAX_CHILDREN, aggregate_stats_merge_kernel
from .op import aggregate, aggregate_bwd, aggregate_fwd, aggregate_reference, check_inputs

__all__ = ["MAX_CHILDREN", "aggregate", "aggregate_bwd", "aggregate_fwd", "aggregate_reference",
           "aggregate_stats_merge_kernel", "check_inputs", "kernel_configurations"]
