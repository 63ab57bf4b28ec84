"""Host side of the Triton kernels: tile choices, weight packing, forward and backward launchers, and the
list of every kernel configuration the launchers can pick (for the ahead-of-time sm_90 compile check)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..aggregate import aggregate_stats_merge_kernel
from ..common import alert_not_deterministic, cdiv, empty_channels_last, fp32_vector, nhwc_rows, num_sms, rows_view
from .kernels import deform_conv_fwd_kernel, deform_conv_grad_sample_kernel, deform_conv_grad_weight_kernel

MASK_NONE, MASK_GIVEN, MASK_SIGMOID = 0, 1, 2
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATS_MERGE_BLOCK_C = 16
_STATS_MERGE_BLOCK_T = 256


# --------------------------------------------------------------------------------------------------------
# Tile and launch choices (the only place they are made: kernel_configurations() enumerates these)
# --------------------------------------------------------------------------------------------------------
def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs in IEEE fp32 unless torch.backends.cuda.matmul.allow_tf32 (as torchvision's matmuls)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# kernel name -> tiles, set by tests so that tiny interpreter shapes still span several tiles and chunks
TILE_OVERRIDES: dict = {}


def fwd_tiles(channels_per_group: int, cout: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of deform_conv_fwd_kernel. The gathered A tile (four corner loads per
    element) competes with the accumulator for registers: a 128-wide N tile takes 64 rows, 8 warps and K chunks
    of 16 (128 x 128 x 16 spills on sm_90 under Triton 3.6, even with 8 warps; launch_options)."""
    if "fwd" in TILE_OVERRIDES:
        return TILE_OVERRIDES["fwd"]
    if dtype == torch.float32:  # fp32 operands take twice the registers (IEEE dots: FMA tiles)
        return 128, 64, 16
    return (128, 64, 16) if cout <= 64 else (64, 128, 16)


def grad_sample_tiles(channels_per_group: int, cout: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, BLOCK_CO) of deform_conv_grad_sample_kernel (BLOCK_CO is the dot's K)."""
    if "grad_sample" in TILE_OVERRIDES:
        return TILE_OVERRIDES["grad_sample"]
    return 64, 16, 32 if dtype == torch.float32 else 64


def grad_weight_tiles(channels_per_group: int, cout: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_CO, BLOCK_M) of deform_conv_grad_weight_kernel (BLOCK_CO is the wgmma M dimension,
    BLOCK_M the dot's K)."""
    if "grad_weight" in TILE_OVERRIDES:
        return TILE_OVERRIDES["grad_weight"]
    block_co = 64 if cout <= 64 else 128
    if dtype == torch.float32:
        return 32, block_co, 16
    return 32, block_co, 64


def launch_options(kernel: str, tiles: Tuple[int, int, int], dtype: torch.dtype) -> dict:
    """num_warps / num_stages of a kernel's tile choice (ignored by the interpreter): ones that compile for sm_90
    without register spills under Triton 3.6 and 3.8 (tests/test_aot_sm90.py; benchmarks/NOTES.md). The fp32
    forward and input-gradient kernels are not pipelined: with num_stages=2 Triton 3.6 spills 536-1064 B per thread
    in the forward at any tile, and 8 B in the input gradient with IEEE dots (since its non-finite sampling rule)."""
    if dtype == torch.float32 and kernel in ("fwd", "grad_sample"):
        return dict(num_warps=4 if kernel == "fwd" else 8, num_stages=1)
    if kernel == "fwd":
        return dict(num_warps=8 if tiles[1] == 128 else 4, num_stages=2)
    return dict(num_warps=8, num_stages=2)


def _grid_options(device: torch.device, kernel: str, tiles: Tuple[int, int, int], dtype: torch.dtype) -> dict:
    return launch_options(kernel, tiles, dtype) if device.type == "cuda" else {}


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------
def pack_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [Cout, Cin, kh, kw] as tap-major rows [kh*kw*Cin, Cout] (row (i*kw + j)*Cin + c), in `dtype`."""
    cout, cin, kh, kw = weight.shape
    return weight.to(dtype).permute(2, 3, 1, 0).reshape(kh * kw * cin, cout).contiguous()


_SCRATCH: dict = {}


def _scratch(device: torch.device) -> torch.Tensor:
    """One fp32 element passed for pointer arguments a launch never reads."""
    if device not in _SCRATCH:
        _SCRATCH[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _SCRATCH[device]


class _Geometry:
    """Sizes of one deformable conv call, and the offset / mask tensors as the kernels address them."""

    def __init__(self, input, offset, mask, weight, stride, padding, dilation, mask_mode):
        self.batch, self.cin, self.h, self.w = input.shape
        self.cout, _, kh, self.kw = weight.shape
        self.taps = kh * self.kw
        self.ho, self.wo = offset.shape[-2:]
        self.m = self.batch * self.ho * self.wo
        per_group = 3 if mask_mode == MASK_SIGMOID else 2
        self.groups = offset.shape[1] // (per_group * self.taps)
        self.cg = self.cin // self.groups
        if mask_mode == MASK_SIGMOID:
            mask = offset[:, 2 * self.groups * self.taps:]
        self.offset, self.mask = offset, mask
        self.conv = (*stride, *padding, *dilation)

    def sizes(self):
        return (self.h, self.w, self.cin, self.ho, self.wo, self.cout, self.m, self.cg, self.groups, self.kw,
                self.taps)

    def offset_mask_strides(self):
        mask_strides = self.mask.stride() if self.mask is not None else (0, 0, 0, 0)
        return (*self.offset.stride(), *mask_strides)

    def mask_or_offset(self):
        return self.mask if self.mask is not None else self.offset


def forward_triton(input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor], weight: torch.Tensor,
                   bias: Optional[torch.Tensor], stride, padding, dilation, mask_mode: int,
                   scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], relu: bool, stats: bool
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out channels_last [B, Cout, Ho, Wo] in the input's dtype, mean, biased var) — the statistics fp32
    [Cout] of y = conv + bias when `stats`, else empty. mask_mode MASK_SIGMOID: `offset` is CenterNet's
    offset-mask tensor and `mask` is None."""
    geo = _Geometry(input, offset, mask, weight, stride, padding, dilation, mask_mode)
    dtype, device = input.dtype, input.device
    f32 = dict(dtype=torch.float32, device=device)
    out = empty_channels_last((geo.batch, geo.cout, geo.ho, geo.wo), dtype, device)
    if geo.m == 0:
        return out, torch.empty(0, **f32), torch.empty(0, **f32)
    scratch = _scratch(device)
    block_m, block_n, block_k = fwd_tiles(geo.cg, geo.cout, dtype)
    tiles_m = cdiv(geo.m, block_m)
    part_sum = torch.empty((tiles_m, geo.cout), **f32) if stats else scratch
    part_m2 = torch.empty((tiles_m, geo.cout), **f32) if stats else scratch
    bias, scale, shift = fp32_vector(bias), fp32_vector(scale), fp32_vector(shift)
    deform_conv_fwd_kernel[(tiles_m, cdiv(geo.cout, block_n))](
        nhwc_rows(input), geo.offset, geo.mask_or_offset(), pack_weight(weight, dtype),
        scratch if bias is None else bias, scratch if scale is None else scale, scratch if shift is None else shift,
        rows_view(out), part_sum, part_m2, *geo.sizes(), *geo.offset_mask_strides(), *geo.conv,
        mask_mode, int(bias is not None), int(scale is not None), int(relu), int(stats),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=dot_precision(dtype),
        **_grid_options(device, "fwd", (block_m, block_n, block_k), dtype))
    if not stats:
        return out, torch.empty(0, **f32), torch.empty(0, **f32)
    mean = torch.empty(geo.cout, **f32)
    var = torch.empty(geo.cout, **f32)
    aggregate_stats_merge_kernel[(cdiv(geo.cout, _STATS_MERGE_BLOCK_C),)](
        part_sum, part_m2, mean, var, scratch, scratch, scratch, 0.0, geo.m, geo.cout, tiles_m,
        TILE_ROWS=block_m, UPDATE_RUNNING=False, CUMULATIVE=False, BLOCK_T=_STATS_MERGE_BLOCK_T,
        BLOCK_C=_STATS_MERGE_BLOCK_C)
    return out, mean, var


def backward_triton(grad_out: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor],
                    weight: torch.Tensor, stride, padding, dilation, mask_mode: int, needs: Sequence[bool]
                    ) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients of y = conv + bias: (input, offset, mask, weight, bias), None where `needs` (input, offset
    and mask, weight, bias) is False. mask_mode MASK_SIGMOID: `offset` is the offset-mask tensor, its gradient
    comes back in the offset slot (sigmoid derivative folded in) and the mask slot is None."""
    geo = _Geometry(input, offset, mask, weight, stride, padding, dilation, mask_mode)
    need_input, need_offset, need_weight, need_bias = needs
    dtype, device = input.dtype, input.device
    grad_bias = (grad_out.sum((0, 2, 3), dtype=torch.float32).to(weight.dtype) if need_bias else None)
    grad_input = grad_offset = grad_mask = grad_weight = None
    if geo.m == 0:
        return (torch.zeros_like(input, memory_format=torch.channels_last) if need_input else None,
                torch.zeros(offset.shape, dtype=offset.dtype, device=device) if need_offset else None,
                torch.zeros(mask.shape, dtype=mask.dtype, device=device) if need_offset and mask is not None else None,
                torch.zeros(weight.shape, dtype=weight.dtype, device=device) if need_weight else None, grad_bias)
    x_rows = nhwc_rows(input)
    g_rows = nhwc_rows(grad_out.to(dtype))
    precision = dot_precision(dtype)
    scratch = _scratch(device)
    if need_input or need_offset:
        gmask = None
        if need_input:
            alert_not_deterministic("dla_fast deform_conv2d backward (the input gradient is summed by atomics)")
            grad_input32 = torch.zeros_like(input, dtype=torch.float32, memory_format=torch.channels_last)
        if need_offset:
            grad_offset = torch.empty(offset.shape, dtype=offset.dtype, device=device)
            if mask_mode == MASK_GIVEN:
                grad_mask = gmask = torch.empty(mask.shape, dtype=mask.dtype, device=device)
            elif mask_mode == MASK_SIGMOID:  # the mask logits' gradient goes into the offset-mask gradient
                gmask = grad_offset[:, 2 * geo.groups * geo.taps:]
        goff_strides = grad_offset.stride() if need_offset else (0, 0, 0, 0)
        gmask_strides = gmask.stride() if gmask is not None else (0, 0, 0, 0)
        block_m, block_c, block_co = grad_sample_tiles(geo.cg, geo.cout, dtype)
        # Pointers a launch never writes (flag off) get tensors of the dtype the kernel variant expects.
        deform_conv_grad_sample_kernel[(cdiv(geo.m, block_m), geo.taps * geo.groups)](
            x_rows, geo.offset, geo.mask_or_offset(), pack_weight(weight, dtype), g_rows,
            rows_view(grad_input32) if need_input else scratch,
            grad_offset if need_offset else geo.offset, gmask if gmask is not None else geo.mask_or_offset(),
            *geo.sizes(), *geo.offset_mask_strides(), *goff_strides, *gmask_strides, *geo.conv,
            mask_mode, int(need_input), int(need_offset),
            BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_CO=block_co, DOT_PRECISION=precision,
            **_grid_options(device, "grad_sample", (block_m, block_c, block_co), dtype))
        if need_input:
            grad_input = grad_input32.to(dtype)
    if need_weight:
        block_c, block_co, block_m = grad_weight_tiles(geo.cg, geo.cout, dtype)
        col_tiles = geo.taps * geo.groups * cdiv(geo.cg, block_c)
        tiles = col_tiles * cdiv(geo.cout, block_co)
        splits = max(1, min(cdiv(4 * num_sms(device), tiles), cdiv(geo.m, 8 * block_m)))
        rows_per_split = cdiv(cdiv(geo.m, splits), block_m) * block_m
        splits = cdiv(geo.m, rows_per_split)
        partial = torch.empty((splits, geo.taps * geo.cin, geo.cout), dtype=torch.float32, device=device)
        deform_conv_grad_weight_kernel[(col_tiles, cdiv(geo.cout, block_co), splits)](
            x_rows, geo.offset, geo.mask_or_offset(), g_rows, partial, *geo.sizes(), rows_per_split,
            *geo.offset_mask_strides(), *geo.conv, mask_mode,
            BLOCK_C=block_c, BLOCK_CO=block_co, BLOCK_M=block_m, DOT_PRECISION=precision,
            **_grid_options(device, "grad_weight", (block_c, block_co, block_m), dtype))
        packed = partial[0] if splits == 1 else partial.sum(0)
        kh = geo.taps // geo.kw
        grad_weight = packed.view(kh, geo.kw, geo.cin, geo.cout).permute(3, 2, 0, 1).to(weight.dtype).contiguous()
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias


# --------------------------------------------------------------------------------------------------------
# Every configuration the launchers can pick (INTERFACES §1)
# --------------------------------------------------------------------------------------------------------
_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_SIZE_ARGS = ("H", "W", "Cin", "Ho", "Wo", "Cout", "M", "Cg", "G", "KW", "taps")
_OFFSET_MASK_STRIDES = ("so_b", "so_c", "so_h", "so_w", "sm_b", "sm_c", "sm_h", "sm_w")
_CONV_ARGS = ("stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w")
# channels per offset group / output channels that reach every tile choice above (CenterNet: 16..256)
_CHANNEL_CASES = (32, 64, 256)


def _signature(pointers: dict, ints: Sequence[str], constexprs: dict) -> dict:
    signature = dict(pointers)
    signature.update({name: "i32" for name in ints})
    signature.update({name: "constexpr" for name in constexprs})
    return signature


def kernel_configurations() -> list:
    """Every (kernel, dtype, tiles, precision, num_warps, num_stages) the launchers can pick. Offsets and masks
    are listed in the activations' dtype (what a conv_offset_mask layer produces); other offset dtypes compile
    the same code with other load types."""
    from ..aot import KernelConfig

    configs = {}
    for dtype in KERNEL_DTYPES:
        t = _TRITON_TYPE[dtype]
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)
        for precision in precisions:
            for cg in _CHANNEL_CASES:
                for cout in _CHANNEL_CASES:
                    bm, bn, bk = fwd_tiles(cg, cout, dtype)
                    constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION=precision)
                    pointers = {"x_ptr": f"*{t}", "off_ptr": f"*{t}", "mask_ptr": f"*{t}", "w_ptr": f"*{t}",
                                "bias_ptr": "*fp32", "scale_ptr": "*fp32", "shift_ptr": "*fp32",
                                "out_ptr": f"*{t}", "part_sum_ptr": "*fp32", "part_m2_ptr": "*fp32"}
                    ints = (*_SIZE_ARGS, *_OFFSET_MASK_STRIDES, *_CONV_ARGS,
                            "mask_mode", "has_bias", "affine", "relu", "stats")
                    configs[("fwd", t, precision, bm, bn, bk)] = KernelConfig(
                        f"deform_conv_fwd_kernel[{t},BLOCK_M={bm},BLOCK_N={bn},BLOCK_K={bk},{precision}]",
                        deform_conv_fwd_kernel, _signature(pointers, ints, constexprs), constexprs,
                        needs_wgmma=dtype != torch.float32, **launch_options("fwd", (bm, bn, bk), dtype))

                    bm, bc, bco = grad_sample_tiles(cg, cout, dtype)
                    constexprs = dict(BLOCK_M=bm, BLOCK_C=bc, BLOCK_CO=bco, DOT_PRECISION=precision)
                    pointers = {"x_ptr": f"*{t}", "off_ptr": f"*{t}", "mask_ptr": f"*{t}", "w_ptr": f"*{t}",
                                "grad_out_ptr": f"*{t}", "grad_in_ptr": "*fp32", "grad_off_ptr": f"*{t}",
                                "grad_mask_ptr": f"*{t}"}
                    ints = (*_SIZE_ARGS, *_OFFSET_MASK_STRIDES, "go_b", "go_c", "go_h", "go_w",
                            "gm_b", "gm_c", "gm_h", "gm_w", *_CONV_ARGS, "mask_mode", "input_grad", "offset_grad")
                    configs[("grad_sample", t, precision, bm, bc, bco)] = KernelConfig(
                        f"deform_conv_grad_sample_kernel[{t},BLOCK_M={bm},BLOCK_C={bc},BLOCK_CO={bco},{precision}]",
                        deform_conv_grad_sample_kernel, _signature(pointers, ints, constexprs), constexprs,
                        needs_wgmma=dtype != torch.float32, **launch_options("grad_sample", (bm, bc, bco), dtype))

                    bc, bco, bm = grad_weight_tiles(cg, cout, dtype)
                    constexprs = dict(BLOCK_C=bc, BLOCK_CO=bco, BLOCK_M=bm, DOT_PRECISION=precision)
                    pointers = {"x_ptr": f"*{t}", "off_ptr": f"*{t}", "mask_ptr": f"*{t}", "grad_out_ptr": f"*{t}",
                                "partial_ptr": "*fp32"}
                    ints = (*_SIZE_ARGS, "rows_per_split", *_OFFSET_MASK_STRIDES, *_CONV_ARGS, "mask_mode")
                    configs[("grad_weight", t, precision, bc, bco, bm)] = KernelConfig(
                        f"deform_conv_grad_weight_kernel[{t},BLOCK_C={bc},BLOCK_CO={bco},BLOCK_M={bm},{precision}]",
                        deform_conv_grad_weight_kernel, _signature(pointers, ints, constexprs), constexprs,
                        needs_wgmma=dtype != torch.float32, **launch_options("grad_weight", (bc, bco, bm), dtype))
    for bm in sorted({key[3] for key in configs if key[0] == "fwd"}):  # the statistics merge after the forward
        constexprs = dict(TILE_ROWS=bm, UPDATE_RUNNING=False, CUMULATIVE=False, BLOCK_T=_STATS_MERGE_BLOCK_T,
                          BLOCK_C=_STATS_MERGE_BLOCK_C)
        signature = {**{name: "*fp32" for name in ("part_sum_ptr", "part_m2_ptr", "mean_ptr", "var_ptr",
                                                    "running_mean_ptr", "running_var_ptr", "num_batches_ptr")},
                     "momentum": "fp32", "M": "i32", "C": "i32", "num_tiles": "i32",
                     **{name: "constexpr" for name in constexprs}}
        configs[("stats_merge", bm)] = KernelConfig(
            f"aggregate_stats_merge_kernel[deform_conv,TILE_ROWS={bm},BLOCK_T={_STATS_MERGE_BLOCK_T}]",
            aggregate_stats_merge_kernel, signature, constexprs)
    return list(configs.values())
