"""A cost model of one inference or training step on an H100, computed on the CPU without running a kernel.

The model is built on the meta device and its parameters become fake CUDA tensors
(torch._subclasses.FakeTensorMode: shapes, dtypes, strides and devices, no memory, no arithmetic). One step
runs on them exactly as the Python code would run it on a GPU — autocast, channels_last, the backend choices
`auto` makes for CUDA tensors — while

- a TorchDispatchMode records every aten (and torchvision) op that reaches the dispatcher, with the tensors it
  reads and writes, and turns it into the kernels an eager CUDA run launches (`aten_kernels`);
- Triton launches are intercepted (`JITFunction.__getitem__`, also under the interpreter): each becomes one
  kernel record, with the tensors passed to it as its traffic and the GEMM FLOPs from its size arguments
  (`triton_kernel`); nothing is compiled or run.

Byte rules (every byte read or written once per kernel, no cache reuse — the floor of each kernel):

- an aten op: its distinct input tensors read, its outputs written (an in-place op reads and writes `self`);
  views, `empty*` and metadata ops launch nothing;
- convolutions as cuDNN runs them: forward reads input + weight (+ bias), writes output; its backward is up to
  three kernels: dgrad (reads grad_out + weight, writes grad_in), wgrad (reads input + grad_out, writes
  grad_weight) and the bias gradient (reads grad_out). FLOPs 2 x multiply-adds of each. cuDNN's fused
  conv + bias (+ add) + ReLU call (the BatchNorm-folded inference convs) is one kernel reading input, weight,
  bias (and the residual);
- BatchNorm in training: two kernels forward (statistics: read x; normalize: read x, write y) and two backward
  (reduction: read grad, x; input gradient: read grad, x, write grad_in); in eval one pass each;
- `_foreach_*` (the SGD step): every tensor of its lists read (in place: also written), launches as PyTorch's
  multi_tensor_apply splits them (at most 110/64/48/36 tensors per launch for 1/2/3/4 lists, 320 chunks of 64 Ki
  elements);
- torchvision's deformable conv (eager CenterNet): per batch chunk of up to 32 images, im2col (reads input,
  offset, mask, writes the column buffer Cin*kh*kw x rows) + GEMM (reads columns + weight, writes output);
  backward: GEMM to columns, col2im (input gradient), col2im_coord (offset and mask gradients), im2col again and
  the weight-gradient GEMM;
- a Triton kernel: every distinct tensor argument once (pointer arguments a variant does not touch, per its
  constexpr flags, are left out; a one-element scratch buffer counts 4 bytes).

Time of a kernel = max(bytes / copy bandwidth, FLOPs / tensor-core rate) + a launch cost; the step's time is the
sum (kernels run one after another on one stream; host overhead is not modelled: at large batch the GPU is the
limit, at batch 1 the host is and the prediction is a floor).

torch.compile (Inductor) is estimated from the eager trace by rules (`inductor_estimate`), not traced: convs,
matmuls, the deformable conv and dla_fast's kernels stay extern calls; every maximal run of other ops between two
extern calls (in one phase) becomes one fused region, launching one kernel per reduction in it (a training
BatchNorm's statistics, its backward's reduction, sums) plus one pointwise kernel, and moving only the tensors
that cross the region's boundary: reads of tensors made outside it, writes of tensors used after it (saved for
backward included), of in-place updates of tensors made before it (running statistics, parameters), and of the
step's outputs. Inductor's recomputation of pointwise ops in the backward (instead of saving them) and its
fusion of a cat into its producers are not modelled. The SGD step stays eager (torch.compile(model) does not
compile the optimizer).
"""
from __future__ import annotations

import contextlib
import dataclasses
import heapq
import inspect
import math
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch._library import custom_ops
from torch.autograd.function import BackwardCFunction
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

PHASES = ("forward", "backward", "optimizer")


@dataclasses.dataclass(frozen=True)
class GPUModel:
    """The numbers a prediction uses: copy bandwidth counting bytes read plus written, the dense tensor-core
    rate per compute dtype, and the GPU-side cost of one launch."""
    name: str
    bytes_per_s: float
    flops_per_s: Dict[str, float]
    launch_s: float

    def kernel_time(self, kernel: "Kernel", dtype: str) -> float:
        memory = (kernel.read + kernel.written) / self.bytes_per_s
        compute = kernel.flops / self.flops_per_s[dtype]
        return max(memory, compute) + self.launch_s


# benchmarks/NOTES.md, "The two floors": ~3.0 TB/s device-to-device copy (read + written) and ~800 bf16 TFLOP/s
# measured on an H100; fp32 convs and GEMMs run as TF32 (cuDNN's default), at half the 16-bit rate. A launch:
# ~2.5 us of GPU time for the smallest kernel back to back (an assumption, not a measurement).
H100 = GPUModel("H100 (3.0 TB/s copy, 800 bf16 TFLOP/s, 2.5 us per launch)", 3.0e12,
                {"bf16": 800e12, "fp16": 800e12, "fp32": 400e12}, 2.5e-6)


@dataclasses.dataclass
class Kernel:
    """One GPU kernel of the step: what it is, which pass it belongs to, bytes read and written, FLOPs."""
    name: str
    kind: str
    phase: str
    read: int
    written: int
    flops: int = 0

    def as_dict(self, gpu: GPUModel, dtype: str) -> dict:
        return dict(dataclasses.asdict(self), ms=gpu.kernel_time(self, dtype) * 1e3)


# --------------------------------------------------------------------------------------------------------
# Tensors as seen by the recorder
# --------------------------------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _tensors(tree) -> List[torch.Tensor]:
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _distinct(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    """Each region of memory once (a view repeated in the arguments counts once)."""
    seen, out = set(), []
    for t in tensors:
        key = (_storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _sum_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(_nbytes(t) for t in _distinct(tensors))


@dataclasses.dataclass
class OpRecord:
    """One dispatched op or Triton launch: the kernels eager CUDA runs for it, and what the Inductor estimate
    needs (storages read and written with their bytes, whether it is an extern call, its reductions)."""
    name: str
    phase: str
    kernels: List[Kernel]
    inputs: List[Tuple[int, int]]   # (storage key, bytes)
    outputs: List[Tuple[int, int]]
    extern: bool
    reductions: int = 0


# --------------------------------------------------------------------------------------------------------
# Eager CUDA kernels of an aten op
# --------------------------------------------------------------------------------------------------------
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "lift_fresh_copy", "_to_copy_noop", "set_", "resize_", "_local_scalar_dense",
              "is_same_size", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride", "sym_numel",
              "sym_storage_offset", "device", "layout", "dim", "_unsafe_view", "_reshape_alias", "as_strided",
              "view", "t", "expand", "permute", "unsqueeze", "squeeze", "slice", "select", "split",
              "split_with_sizes", "unbind", "transpose", "_unsafe_split", "reshape", "unfold", "narrow",
              "_record_function_enter", "_record_function_enter_new", "_record_function_exit"}
_CONVS = {"convolution", "cudnn_convolution", "_convolution", "conv2d", "cudnn_convolution_relu",
          "cudnn_convolution_add_relu", "cudnn_convolution_transpose"}
_REDUCTIONS = {"sum", "mean", "var", "var_mean", "std", "amax", "amin", "max", "min", "norm", "_log_softmax",
               "log_softmax", "softmax", "_softmax", "nll_loss_forward", "prod", "argmax", "argmin"}
_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}
_FOREACH_TENSORS_PER_LAUNCH = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_FOREACH_CHUNK, _FOREACH_BLOCKS = 65536, 320
_TORCHVISION_PARALLEL_IMAGES = 32


def _base_name(func) -> str:
    """'aten::convolution_backward' -> 'convolution_backward'; 'torchvision::deform_conv2d' -> 'deform_conv2d'."""
    return func._schema.name.split("::", 1)[-1]


def _in_place_targets(func, args, kwargs) -> List[torch.Tensor]:
    """The tensors an op writes in place (schema alias annotations with is_write)."""
    out = []
    bound = list(args) + [kwargs.get(a.name) for a in func._schema.arguments[len(args):]]
    for arg, value in zip(func._schema.arguments, bound):
        if arg.alias_info is not None and arg.alias_info.is_write and value is not None:
            out.extend(_tensors(value))
    return out


def _conv_flops(x_shape, w_shape, out_shape, transposed: bool) -> int:
    """2 x multiply-adds of one convolution (forward, or either gradient: the same count)."""
    kernel = math.prod(w_shape[2:])
    if transposed:  # weight (Cin, Cout/g, kh, kw): every input element meets Cout/g * kh * kw weights
        return 2 * math.prod(x_shape) * w_shape[1] * kernel
    return 2 * math.prod(out_shape) * w_shape[1] * kernel


def _is_view(func) -> bool:
    return bool(getattr(func, "is_view", False)) or _base_name(func) in _NO_KERNEL


def aten_kernels(func, args, kwargs, out, phase: str) -> Tuple[List[Kernel], bool, int]:
    """(kernels an eager CUDA run launches for this op, extern call for Inductor?, reductions in it)."""
    name = _base_name(func)
    ins, outs = _tensors((args, kwargs)), _tensors(out)
    targets = _in_place_targets(func, args, kwargs)
    if _is_view(func) or name.startswith("empty"):
        return [], False, 0

    def kernel(kind, read, written, flops=0, label=name):
        return Kernel(label, kind, phase, int(read), int(written), int(flops))

    if name in _CONVS:
        x, w = args[0], args[1]
        transposed = bool(args[6]) if name in ("convolution", "_convolution") else name.endswith("transpose")
        flops = _conv_flops(x.shape, w.shape, outs[0].shape, transposed)
        return [kernel("conv", _sum_bytes(ins), _sum_bytes(outs), flops)], True, 0
    if name == "convolution_backward":
        grad_out, x, w = args[0], args[1], args[2]
        transposed, mask = bool(args[7]), args[10]
        flops = _conv_flops(x.shape, w.shape, grad_out.shape, transposed)
        kernels = []
        if mask[0]:
            kernels.append(kernel("conv_dgrad", _nbytes(grad_out) + _nbytes(w), _nbytes(x), flops,
                                  "convolution_backward.dgrad"))
        if mask[1]:
            kernels.append(kernel("conv_wgrad", _nbytes(grad_out) + _nbytes(x), _nbytes(w), flops,
                                  "convolution_backward.wgrad"))
        if len(mask) > 2 and mask[2]:
            kernels.append(kernel("reduction", _nbytes(grad_out), w.shape[0] * grad_out.element_size(), 0,
                                  "convolution_backward.bias"))
        return kernels, True, 0
    if "batch_norm" in name:
        return _batchnorm_kernels(name, func, args, ins, outs, kernel)
    if name.startswith("_foreach_"):
        return _foreach_kernels(name, args, targets, outs, kernel), False, 0
    if name == "deform_conv2d":
        return _torchvision_deform_conv(args, outs, kernel, backward=False), True, 0
    if name == "_deform_conv2d_backward":
        return _torchvision_deform_conv(args, outs, kernel, backward=True), True, 0
    if name in _GEMMS:
        a, b = [t for t in ins if t.dim() >= 2][-2:]
        flops = 2 * math.prod(a.shape) * b.shape[-1]
        return [kernel("gemm", _sum_bytes(ins), _sum_bytes(outs), flops)], True, 0
    if name in ("copy_", "_to_copy", "clone", "contiguous", "_copy_from"):
        src = args[1] if name == "copy_" else args[0]
        return [kernel("copy", _nbytes(src), _sum_bytes(outs) if name != "copy_" else _nbytes(args[0]))], False, 0
    if name == "cat":
        return [kernel("copy", _sum_bytes(ins), _sum_bytes(outs))], False, 0
    if name in ("zero_", "fill_", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros",
                "new_ones", "new_full", "scalar_tensor", "arange", "randn", "rand"):  # writes only
        return [kernel("pointwise", 0, _sum_bytes(outs or targets))], False, 0
    reductions = 1 if name in _REDUCTIONS else 0
    written = _sum_bytes(targets) if targets else _sum_bytes(outs)
    return ([kernel("reduction" if reductions else "pointwise", _sum_bytes(ins), written,
                    max((t.numel() for t in outs), default=0))], False, reductions)


def _batchnorm_kernels(name, func, args, ins, outs, kernel):
    """Eager BatchNorm on CUDA: forward = statistics + normalize in training, one normalize pass in eval;
    backward = reduction + input-gradient pass (training statistics), one pass otherwise."""
    x = args[0] if "backward" not in name else args[1]
    vectors = sum(_nbytes(t) for t in ins if t.dim() == 1)
    if "backward" in name:
        grad = args[0]
        training = _bn_training_flag(name, args, backward=True)
        passes = []
        if training:
            passes.append(kernel("batchnorm", _nbytes(grad) + _nbytes(x) + vectors, vectors, 0, name + ".reduce"))
        passes.append(kernel("batchnorm", _nbytes(grad) + _nbytes(x) + vectors, _nbytes(x), 0, name + ".grad_input"))
        return passes, False, 1 if training else 0
    training = _bn_training_flag(name, args, backward=False)
    y = outs[0]
    passes = []
    if training:
        passes.append(kernel("batchnorm", _nbytes(x) + vectors, vectors, 0, name + ".stats"))
    passes.append(kernel("batchnorm", _nbytes(x) + vectors, _nbytes(y), 0, name + ".normalize"))
    return passes, False, 1 if training else 0


def _bn_training_flag(name: str, args, backward: bool) -> bool:
    """The `training` argument of the batch-norm ops PyTorch dispatches on CUDA."""
    if name == "_native_batch_norm_legit_no_training":
        return False
    if not backward:
        if name in ("native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm", "batch_norm"):
            return bool(args[5])
        if name in ("_native_batch_norm_legit", "_native_batch_norm_legit_functional"):
            return bool(args[5])
        return True
    if name == "native_batch_norm_backward":
        return bool(args[7])
    if name == "batch_norm_backward":
        return bool(args[7])
    return True  # cudnn_batch_norm_backward: only dispatched in training


def _foreach_kernels(name, args, targets, outs, kernel):
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    tensors = [t for lst in lists for t in lst]
    count = len(lists[0]) if lists else 0
    if not count:
        return []
    chunks = sum(math.ceil(t.numel() / _FOREACH_CHUNK) for t in lists[0])
    per_launch = _FOREACH_TENSORS_PER_LAUNCH.get(len(lists), 30)
    launches = max(math.ceil(count / per_launch), math.ceil(chunks / _FOREACH_BLOCKS))
    read = _sum_bytes(tensors)
    written = _sum_bytes(targets) if targets else _sum_bytes(outs)
    return [kernel("optimizer", read / launches, written / launches, 0, f"{name}[{i}/{launches}]")
            for i in range(launches)]


def _torchvision_deform_conv(args, outs, kernel, backward: bool) -> List[Kernel]:
    """torchvision.ops.deform_conv2d's CUDA path, per chunk of up to 32 images (im2col + GEMM)."""
    if backward:
        grad_out, x, w, offset, mask = args[0], args[1], args[2], args[3], args[4]
    else:
        x, w, offset, mask = args[0], args[1], args[2], args[3]
        grad_out = outs[0]
    batch = x.shape[0]
    images = max(d for d in range(1, min(batch, _TORCHVISION_PARALLEL_IMAGES) + 1) if batch % d == 0)
    chunks = batch // images
    rows = math.prod(grad_out.shape[2:]) * images
    columns = x.shape[1] * math.prod(w.shape[2:]) * rows * x.element_size()
    per = lambda t: _nbytes(t) // chunks  # noqa: E731 - one chunk's share of a batched tensor
    flops = _conv_flops(x.shape, w.shape, grad_out.shape, False) // chunks
    kernels = []
    for _ in range(chunks):
        if not backward:
            kernels += [kernel("deform_conv", per(x) + per(offset) + per(mask), columns, 0, "deform_conv2d.im2col"),
                        kernel("deform_conv", columns + _nbytes(w), per(grad_out), flops, "deform_conv2d.gemm")]
            continue
        kernels += [
            kernel("deform_conv", per(grad_out) + _nbytes(w), columns, flops, "deform_conv2d_backward.gemm_columns"),
            kernel("deform_conv", columns + per(offset) + per(mask), per(x), 0, "deform_conv2d_backward.col2im"),
            kernel("deform_conv", columns + per(x) + per(offset) + per(mask), per(offset) + per(mask), 0,
                   "deform_conv2d_backward.col2im_coord"),
            kernel("deform_conv", per(x) + per(offset) + per(mask), columns, 0, "deform_conv2d_backward.im2col"),
            kernel("deform_conv", columns + per(grad_out), _nbytes(w), flops, "deform_conv2d_backward.gemm_weight")]
    if not backward and len(args) > 4 and isinstance(args[4], torch.Tensor):  # the bias, added after the GEMMs
        kernels.append(kernel("pointwise", _nbytes(grad_out), _nbytes(grad_out), 0, "deform_conv2d.bias"))
    return kernels


# --------------------------------------------------------------------------------------------------------
# Triton launches
# --------------------------------------------------------------------------------------------------------
# What each of dla_fast's Triton kernels writes (the other tensor arguments are read), the arguments a variant
# leaves alone (argument, flag, value of the flag that leaves it), and arguments read only in part.
_TRITON_WRITES = {
    "aggregate_fwd_kernel": ("out_ptr", "y_ptr", "part_sum_ptr", "part_m2_ptr", "num_batches_ptr"),
    "aggregate_stats_group_kernel": ("group_sum_ptr", "group_m2_ptr"),
    "aggregate_stats_merge_kernel": ("mean_ptr", "var_ptr", "running_mean_ptr", "running_var_ptr"),
    "aggregate_dy_kernel": ("dy_ptr",),
    "aggregate_grad_input_kernel": ("g0", "g1", "g2", "g3", "g4", "g5", "g6", "g7", "dy_ptr"),
    "aggregate_grad_weight_kernel": ("partial_ptr",),
    "channel_stats_partial_kernel": ("partial_mean_ptr", "partial_m2_ptr", "num_batches_ptr"),
    "channel_stats_merge_kernel": ("mean_ptr", "var_ptr", "running_mean_ptr", "running_var_ptr"),
    "running_stats_update_kernel": ("running_mean_ptr", "running_var_ptr", "num_batches_ptr"),
    "bn_apply_kernel": ("out_ptr",),
    "bn_backward_reduce_partial_kernel": ("partial_g_ptr", "partial_gc_ptr"),
    "bn_backward_reduce_merge_kernel": ("sum_g_ptr", "sum_g_xhat_ptr"),
    "bn_backward_apply_kernel": ("grad_y_ptr", "grad_residual_ptr"),
    "upsample_merge_fwd_kernel": ("out_ptr",),
    "upsample_merge_bwd_kernel": ("grad_low_ptr", "partial_ptr"),
    "grad_weight_reduce_kernel": ("grad_weight_ptr",),
    "deform_conv_fwd_kernel": ("out_ptr", "part_sum_ptr", "part_m2_ptr"),
    "deform_conv_grad_sample_kernel": ("grad_in_ptr", "grad_off_ptr", "grad_mask_ptr"),
    "deform_conv_grad_weight_kernel": ("partial_ptr",),
}
_TRITON_UNUSED = {
    "aggregate_fwd_kernel": [("out_ptr", "APPLY_BN", False), ("mean_ptr", "APPLY_BN", False),
                             ("var_ptr", "APPLY_BN", False), ("y_ptr", "STORE_PREACT", False),
                             ("part_sum_ptr", "COMPUTE_STATS", False), ("part_m2_ptr", "COMPUTE_STATS", False),
                             ("num_batches_ptr", "COUNT_BATCH", False)],
    "channel_stats_partial_kernel": [("num_batches_ptr", "COUNT_BATCH", False)],
    "aggregate_grad_input_kernel": [("grad_out_ptr", "DY_READY", True), ("out_ptr", "DY_READY", True),
                                    ("y_ptr", "DY_READY", True)],
    "bn_apply_kernel": [("residual_ptr", "HAS_RESIDUAL", False), ("weight_ptr", "HAS_WEIGHT", False),
                        ("bias_ptr", "HAS_BIAS", False)],
    "bn_backward_reduce_partial_kernel": [("out_ptr", "RELU", False)],
    "bn_backward_apply_kernel": [("out_ptr", "RELU", False), ("grad_residual_ptr", "WRITE_RESIDUAL_GRAD", False),
                                 ("weight_ptr", "HAS_WEIGHT", False)],
    "deform_conv_grad_sample_kernel": [("grad_in_ptr", "input_grad", 0), ("grad_off_ptr", "offset_grad", 0),
                                       ("grad_mask_ptr", "offset_grad", 0)],
}


def _triton_bytes(name: str, arg: str, t: torch.Tensor, bound: Dict[str, object]) -> int:
    """Bytes a kernel moves of one tensor argument: all of it, except arguments read in part."""
    if name == "channel_stats_merge_kernel" and arg == "y_ptr":  # its first row (the shift of the statistics)
        return int(bound["C"]) * t.element_size()
    if name == "upsample_merge_bwd_kernel" and arg == "grad_ptr":  # its channels [offset, offset + C)
        return _nbytes(t) * int(bound["C"]) // max(int(bound["grad_row_stride"]), 1)
    return _nbytes(t)


def _gemm_flops(name: str, a: Dict[str, object]) -> int:
    """2 x multiply-adds of dla_fast's GEMM kernels, from their size arguments (0 for the memory-bound ones)."""
    if name in ("aggregate_fwd_kernel", "aggregate_grad_input_kernel", "aggregate_grad_weight_kernel"):
        k = sum(int(a.get(f"c{i}", 0) or 0) for i in range(8))
        return 2 * int(a["M"]) * int(a["Cout"]) * k
    if name.startswith("deform_conv_") and name.endswith("_kernel"):
        return 2 * int(a["M"]) * int(a["Cout"]) * int(a["Cg"]) * int(a["taps"]) * int(a["G"]) // max(int(a["G"]), 1)
    return 0


def triton_kernel(name: str, params: Sequence[str], args: tuple, kwargs: dict, phase: str
                  ) -> Tuple[Kernel, List[Tuple[int, int]], List[Tuple[int, int]]]:
    """One Triton launch as a Kernel, and the (storage, bytes) it reads and writes (for the Inductor estimate).
    A kernel not in _TRITON_WRITES counts every tensor argument as read."""
    bound = dict(zip(params, args))
    bound.update(kwargs)
    skip = {arg for arg, flag, value in _TRITON_UNUSED.get(name, []) if flag in bound and bound[flag] == value}
    writes = set(_TRITON_WRITES.get(name, ()))
    if name == "aggregate_grad_input_kernel" and bound.get("DY_READY"):
        writes.discard("dy_ptr")  # materialised by aggregate_dy_kernel: read here
    read, written, seen = [], [], set()
    for arg, value in bound.items():
        if not isinstance(value, torch.Tensor) or arg in skip:
            continue
        key = (_storage_key(value), value.storage_offset(), tuple(value.shape), value.dtype)
        if key in seen:  # unused child slots repeat child 0
            continue
        seen.add(key)
        (written if arg in writes else read).append((_storage_key(value), _triton_bytes(name, arg, value, bound)))
    flops = _gemm_flops(name, bound)
    kernel = Kernel(name, "gemm" if flops else "fused", phase, sum(b for _, b in read), sum(b for _, b in written),
                    flops)
    return kernel, read, written


# --------------------------------------------------------------------------------------------------------
# Recording one step
# --------------------------------------------------------------------------------------------------------
class _Recorder(TorchDispatchMode):
    """Turns every dispatched op into OpRecords while `active`; computes cuDNN's fused conv calls (whose fake
    kernels need a driver) as plain convolutions of the same shape; runs dla_fast's custom ops (which fake
    tensors would answer with their fake implementations) through their real implementations, so that their
    Triton launches and aten ops are recorded."""

    def __init__(self):
        super().__init__()
        self.records: List[OpRecord] = []
        self.phase = "forward"
        self.active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _base_name(func)
        if func.namespace == "dla_fast":  # a dla_fast custom op: its real implementation, recorded kernel by kernel
            opdef = custom_ops._maybe_get_opdef(func)
            with self:
                return opdef._init_fn(*args, **kwargs)
        if name in ("cudnn_convolution_relu", "cudnn_convolution_add_relu"):
            x, w = args[0], args[1]
            bias = args[4] if name == "cudnn_convolution_add_relu" else args[2]
            geometry = args[5:9] if name == "cudnn_convolution_add_relu" else args[3:7]
            out = torch.ops.aten.convolution.default(x, w, bias, *geometry[:3], False, [0, 0], geometry[3])
        else:
            out = func(*args, **kwargs)
        if name in _CONVS or name == "convolution_backward":
            out = _cudnn_layout(out, args[:3])
        if self.active and func is not torch.ops.prim.device.default:
            self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out):
        kernels, extern, reductions = aten_kernels(func, args, kwargs, out, self.phase)
        if not kernels:
            return
        targets = _in_place_targets(func, args, kwargs)
        outs = _distinct(_tensors(out) + targets)
        ins = _distinct(_tensors((args, kwargs)))
        self.records.append(OpRecord(_base_name(func), self.phase, kernels,
                                     [(_storage_key(t), _nbytes(t)) for t in ins],
                                     [(_storage_key(t), _nbytes(t)) for t in outs], extern, reductions))

    def launch(self, name: str, params: Sequence[str], args: tuple, kwargs: dict):
        if not self.active:
            return
        kernel, read, written = triton_kernel(name, params, args, kwargs, self.phase)
        self.records.append(OpRecord(name, self.phase, [kernel], read, written, True))


def _cudnn_layout(out, inputs):
    """Conv outputs (and gradients) in channels_last when an input or the weight is, as cuDNN chooses on CUDA
    (the fake kernels return them contiguous)."""
    if not any(isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] > 1
               and t.is_contiguous(memory_format=torch.channels_last) for t in inputs):
        return out
    def fix(t):
        return t.contiguous(memory_format=torch.channels_last) if isinstance(t, torch.Tensor) and t.dim() == 4 else t
    return tuple(fix(t) for t in out) if isinstance(out, (tuple, list)) else fix(out)


@contextlib.contextmanager
def _patched(target, attribute: str, value):
    old = getattr(target, attribute)
    setattr(target, attribute, value)
    try:
        yield
    finally:
        setattr(target, attribute, old)


def _kernel_classes():
    """Triton's kernel classes whose `fn[grid](...)` launches (compiled and interpreted)."""
    classes = []
    try:
        from triton.runtime.jit import JITFunction
        classes.append(JITFunction)
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes


@contextlib.contextmanager
def _as_on_a_gpu(recorder: _Recorder):
    """What lets dla_fast's CUDA code paths run on fake CUDA tensors without a driver, undone on exit: Triton
    launches recorded instead of run, an SM count (132, an H100 SXM), CUDA device guards as no-ops, no stream
    capture under way, cuDNN's
    fused conv call taken as available; dla_fast's per-device caches (scratch buffers) saved and restored so
    no fake tensor outlives the trace."""
    from dla_fast import backend
    from dla_fast.ops import common, conv_bn_act
    from dla_fast.ops.aggregate import launch as aggregate_launch
    from dla_fast.ops.deform_conv import launch as deform_launch

    def getitem(self, grid):
        fn = getattr(self, "fn", None)
        name = getattr(fn, "__name__", type(self).__name__)
        params = list(inspect.signature(fn).parameters) if fn is not None else []
        return lambda *args, **kwargs: recorder.launch(name, params, args, kwargs)

    saved = [(cache, dict(cache)) for cache in (aggregate_launch._SCRATCH, deform_launch._SCRATCH)]
    with contextlib.ExitStack() as stack:
        for cls in _kernel_classes():
            stack.enter_context(_patched(cls, "__getitem__", getitem))
        stack.enter_context(_patched(common, "_cuda_sm_count", lambda device: 132))
        stack.enter_context(_patched(torch.cuda.device, "__enter__", lambda self: None))
        stack.enter_context(_patched(torch.cuda.device, "__exit__", lambda self, *exc: False))
        stack.enter_context(_patched(torch.cuda, "is_current_stream_capturing", lambda: False))
        stack.enter_context(_patched(conv_bn_act, "uses_cudnn_fusion", lambda x, relu: relu and x.is_cuda))
        # the extension's kernels have no fake implementations: `auto` costs its ops as their Triton kernels
        stack.enter_context(_patched(backend, "_cuda_reason", lambda device: "costed as the Triton kernels"))
        try:
            yield
        finally:
            for cache, content in saved:
                cache.clear()
                cache.update(content)


def run_backward(loss: torch.Tensor) -> None:
    """loss.backward(), without the autograd engine (its CUDA device threads need a driver): each node of the
    graph called in the engine's order (latest forward op first, once every gradient for it has arrived);
    gradients of a tensor used several times summed (one add, as the engine's accumulation), None gradients of a
    custom Function's outputs materialized as zeros (as the engine does), leaf gradients stored in `.grad`."""
    root = loss.grad_fn
    pending: Dict[object, int] = {}
    seen, stack = {root}, [root]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            pending[child] = pending.get(child, 0) + 1
            if child not in seen:
                seen.add(child)
                stack.append(child)
    buffers: Dict[object, list] = {root: [torch.ones_like(loss)]}
    ready = [(-root._sequence_nr(), 0, root)]
    order = 1
    while ready:
        _, _, node = heapq.heappop(ready)
        grads = buffers.pop(node, [])
        if hasattr(node, "variable"):  # AccumulateGrad
            leaf = node.variable
            if grads and grads[0] is not None:
                leaf.grad = grads[0] if leaf.grad is None else leaf.grad + grads[0]
            continue
        metadata = node._input_metadata
        grads = grads + [None] * (len(metadata) - len(grads))
        if isinstance(node, BackwardCFunction):
            if getattr(node, "materialize_grads", True):
                grads = [torch.zeros(m.shape, dtype=m.dtype, device=m.device) if g is None else g
                         for g, m in zip(grads, metadata)]
            results = node.apply(*grads)
            results = results if isinstance(results, tuple) else (results,)
            # one gradient per forward argument; the edges are the tensor arguments': pair those that need one
            results = [g for g, needed in zip(results, node.needs_input_grad) if needed]
            edges = [edge for edge in node.next_functions if edge[0] is not None]
        else:
            results = node(*grads)
            results = results if isinstance(results, tuple) else (results,)
            edges = node.next_functions
        for (child, slot), grad in zip(edges, results):
            if child is None:
                continue
            if grad is not None:
                buffer = buffers.setdefault(child, [None] * max(len(getattr(child, "_input_metadata", ())), 1))
                buffer[slot] = grad if buffer[slot] is None else buffer[slot] + grad
            pending[child] -= 1
            if pending[child] == 0:
                heapq.heappush(ready, (-child._sequence_nr(), order, child))
                order += 1


def _to_fake_cuda(model: nn.Module, mode) -> None:
    """Replace every parameter and buffer of a meta-device model by a fake CUDA tensor of the same layout."""
    device = torch.device("cuda", 0)
    convert = mode.fake_tensor_converter.from_meta_and_device
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[key] = nn.Parameter(convert(mode, p.data, device), p.requires_grad)
        for key, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[key] = convert(mode, b, device)


def training_loss(output) -> torch.Tensor:
    """The loss `python -m dla_fast bench --train` uses (dla_fast.cli.bench.training_loss)."""
    from dla_fast.cli.bench import training_loss as bench_loss
    return bench_loss(output)


def _cuda_autocast(dtype: torch.dtype) -> torch.autocast:
    """torch.autocast("cuda", dtype), which its constructor would disable (with a warning) without a driver."""
    with _patched(torch.cuda, "is_available", lambda: True), _patched(torch.cuda, "is_bf16_supported", lambda: True):
        return torch.autocast("cuda", dtype=dtype)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def record_step(build: Callable[[], nn.Module], input_shape: Sequence[int], train: bool, dtype: str = "bf16",
                accelerate: bool = False, backend: str = "auto") -> List[OpRecord]:
    """The OpRecords of one steady-state step of `build()`'s model on an (imagined) CUDA device, channels_last,
    AMP autocast in `dtype` (fp32: none): an inference forward (eval, no gradients), or a training step
    (forward, backward of `training_loss`, SGD momentum 0.9 step with foreach kernels). accelerate: through
    dla_fast.accelerate with `backend` in force. An inference step is recorded after one unrecorded call, so
    caches (the folded weights) are warm as in a timed run."""
    import dla_fast
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        model = build()
    model = model.to(memory_format=torch.channels_last).train(train)
    if accelerate:
        dla_fast.accelerate(model)
    mode = FakeTensorMode()
    _to_fake_cuda(model, mode)
    recorder = _Recorder()
    amp = AMP_DTYPES[dtype]
    autocast = (lambda: _cuda_autocast(amp)) if amp is not None else contextlib.nullcontext
    with warnings.catch_warnings(), mode, dla_fast.use_backend(backend), _as_on_a_gpu(recorder), recorder:
        # the folded weights' cache key reads data pointers, which fake tensors answer with a deprecation warning
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        x = torch.empty(tuple(input_shape), device="cuda").contiguous(memory_format=torch.channels_last)
        if not train:
            with torch.no_grad():
                with autocast():  # warm-up (folded weights cached); autocast's cast cache ends with its context
                    model(x)
                recorder.active = True
                with autocast():
                    model(x)
            return recorder.records
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
        for p in model.parameters():  # steady state: momentum buffers exist
            optimizer.state[p]["momentum_buffer"] = torch.empty_like(p)
        recorder.active = True
        with autocast():
            loss = training_loss(model(x))
        recorder.phase = "backward"
        run_backward(loss)
        recorder.phase = "optimizer"
        optimizer.step()
    return recorder.records


def eager_kernels(records: Sequence[OpRecord]) -> List[Kernel]:
    """The kernels as the recorded code launches them (eager PyTorch, dla_fast's eager paths)."""
    return [k for r in records for k in r.kernels]


def inductor_estimate(records: Sequence[OpRecord]) -> List[Kernel]:
    """The kernels torch.compile (Inductor) would launch for the recorded step, by the fusion rules of the module
    docstring: extern calls as recorded; each maximal run of other ops within one phase (the optimizer stays
    eager) becomes one region with one kernel per reduction plus one pointwise kernel."""
    consumers: Dict[int, List[int]] = {}
    for i, r in enumerate(records):
        for key, _ in r.inputs:
            consumers.setdefault(key, []).append(i)
    produced_at: Dict[int, int] = {}
    for i, r in enumerate(records):
        for key, _ in r.outputs:
            produced_at.setdefault(key, i)
    last = len(records) - 1
    kernels: List[Kernel] = []
    i = 0
    while i < len(records):
        r = records[i]
        if r.extern or r.phase == "optimizer":
            kernels.extend(r.kernels)
            i += 1
            continue
        j = i
        while j + 1 < len(records) and not records[j + 1].extern and records[j + 1].phase == r.phase:
            j += 1
        kernels.extend(_region_kernels(records, i, j, consumers, produced_at, last))
        i = j + 1
    return kernels


def _region_kernels(records, start, end, consumers, produced_at, last) -> List[Kernel]:
    region = records[start:end + 1]
    phase = region[0].phase
    made_inside = {key for r in region for key, _ in r.outputs if produced_at.get(key, -1) >= start}
    reads: Dict[int, int] = {}
    for r in region:
        for key, size in r.inputs:
            if key not in made_inside:
                reads[key] = max(reads.get(key, 0), size)
    writes: Dict[int, int] = {}
    model_outputs = phase == "forward" and not any(rec.phase != "forward" for rec in records)
    for r in region:
        for key, size in r.outputs:
            used_later = any(c > end for c in consumers.get(key, []))
            mutated_before = produced_at.get(key, start) < start
            output = model_outputs and not consumers.get(key) and r is region[-1]
            if used_later or mutated_before or output:
                writes[key] = max(writes.get(key, 0), size)
    reductions = sum(r.reductions for r in region)
    reduction_read = sum(size for r in region if r.reductions for key, size in r.inputs[:1])
    names = "+".join(dict.fromkeys(r.name for r in region))
    out = [Kernel(f"inductor_reduction[{names}]", "reduction", phase, reduction_read // max(reductions, 1), 0)
           for _ in range(reductions)]
    out.append(Kernel(f"inductor_pointwise[{names}]", "pointwise", phase, sum(reads.values()), sum(writes.values())))
    return out


# --------------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------------
def summarize(kernels: Sequence[Kernel], gpu: GPUModel, dtype: str) -> dict:
    """Totals (launches, bytes, FLOPs, predicted ms) overall, per phase and per kernel kind."""
    def totals(ks):
        return dict(launches=len(ks), read=sum(k.read for k in ks), written=sum(k.written for k in ks),
                    flops=sum(k.flops for k in ks), ms=sum(gpu.kernel_time(k, dtype) for k in ks) * 1e3,
                    launch_ms=len(ks) * gpu.launch_s * 1e3)
    kinds = sorted({k.kind for k in kernels})
    return dict(total=totals(kernels),
                phases={p: totals([k for k in kernels if k.phase == p]) for p in PHASES
                        if any(k.phase == p for k in kernels)},
                kinds={kind: totals([k for k in kernels if k.kind == kind]) for kind in kinds})


def model_builder(name: str, **kwargs) -> Callable[[], nn.Module]:
    import dla_fast
    return lambda: dla_fast.create_model(name, **kwargs)


def providers_for(train: bool) -> List[str]:
    """The rows of a cost table: eager, torch.compile (estimate), dla_fast (backend auto as on a GPU), and in
    training dla_fast with the fused training BatchNorm (backend triton) too; dla_fast_compile for both."""
    rows = ["eager", "compile", "dla_fast", "dla_fast_compile"]
    return rows + (["dla_fast_fused_bn", "dla_fast_fused_bn_compile"] if train else [])


def cost_step(build: Callable[[], nn.Module], input_shape: Sequence[int], train: bool, dtype: str = "bf16",
              providers: Optional[Sequence[str]] = None) -> Dict[str, List[Kernel]]:
    """Kernels of one step per provider (see providers_for)."""
    providers = list(providers or providers_for(train))
    traces: Dict[Tuple[bool, str], List[OpRecord]] = {}

    def trace(accelerated: bool, backend: str) -> List[OpRecord]:
        if (accelerated, backend) not in traces:
            traces[accelerated, backend] = record_step(build, input_shape, train, dtype, accelerated, backend)
        return traces[accelerated, backend]

    source = {"eager": (False, "torch"), "compile": (False, "torch"), "dla_fast": (True, "auto"),
              "dla_fast_compile": (True, "auto"), "dla_fast_fused_bn": (True, "triton"),
              "dla_fast_fused_bn_compile": (True, "triton")}
    result = {}
    for provider in providers:
        if provider not in source:
            raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(source)}")
        records = trace(*source[provider])
        result[provider] = inductor_estimate(records) if provider.endswith("compile") else eager_kernels(records)
    return result
