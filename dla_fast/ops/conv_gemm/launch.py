"""Tile choices and Triton launchers of the implicit-GEMM convolution, and `kernel_configurations` (every
configuration they launch on CUDA tensors, for the ahead-of-time sm_90 check of dla_fast.ops.aot)."""
from __future__ import annotations

from itertools import product
from typing import List, Optional, Sequence, Tuple

import torch

from ... import backend
from ..common import cdiv, device_guard, empty_channels_last, next_power_of_2, rows_view
from .kernels import conv_gemm_dgrad_kernel, conv_gemm_fwd_kernel, conv_gemm_wgrad_kernel

TILE_OVERRIDES: dict = {}


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_power_of_2(max(int(n), 1))))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow PyTorch's cuDNN setting: TF32 when torch.backends.cudnn.allow_tf32 (the default)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32 else "tf32"


def tile_sizes(kernel: str, channels: int, dtype: torch.dtype, device_type: str,
               precision: str = "tf32") -> Tuple[int, int, int]:
    """'fwd': (BLOCK_M, BLOCK_N, BLOCK_K) with `channels` = Cout; 'dgrad': (BLOCK_M, BLOCK_C, BLOCK_CO) with
    `channels` = the input's C; 'wgrad': (BLOCK_C, BLOCK_CO, BLOCK_M). On CPU (the interpreter, whose cost is per
    program and per operation) large tiles. On GPU (chosen from the sm_90 register counts of both Tritons, not from
    timings): 64-row tiles (wgmma's M); the forward's K tile 32 for 16-bit operands, 16 for fp32 (N at most 64,
    16 with IEEE dots); the backward's K tiles 64 (16-bit) / 32 (fp32)."""
    if kernel in TILE_OVERRIDES:
        return TILE_OVERRIDES[kernel]
    if device_type != "cuda":
        return {"fwd": (128, 128, 64), "dgrad": (128, 64, 128), "wgrad": (64, 128, 128)}[kernel]
    k = 32 if dtype == torch.float32 else 64
    if kernel == "fwd":  # 64-row tiles, K 32: the gathered A tile's 2-D address tensor is what fills registers
        if dtype != torch.float32:
            return 64, _pow2_clamp(channels, 16, 128), 32
        return 64, _pow2_clamp(channels, 16, 16 if precision == "ieee" else 64), 16
    if kernel == "dgrad":  # 64 rows: 128 spilled up to 496 B per thread with the prologue epilogue (Triton 3.6)
        return 64, _pow2_clamp(channels, 16, 64), k
    return 64, 64, k


def _launch_options(block_elems: int, device_type: str, precision: str = "tf32", kernel: str = "") -> dict:
    """num_warps / num_stages (ignored by the interpreter): 8 warps for the large tiles; IEEE fp32 dots (FMA, not
    tensor cores): 8 warps, the forward unpipelined (1 stage) on tiles 16 wide, the backward 2 stages (the other
    choices tried left stack frames of 8-32 B per thread on sm_90 under Triton 3.6 or 3.8)."""
    if device_type != "cuda":
        return {}
    if precision == "ieee":
        return dict(num_warps=8, num_stages=1 if kernel == "fwd" else 2)
    return dict(num_warps=8 if block_elems >= 128 * 128 else 4, num_stages=3)


# the weight gradient's output pixels per program: enough programs to fill the GPU (fp32 partials summed once)
WGRAD_ROWS_PER_SPLIT = 8192


def _strides(x: torch.Tensor) -> Tuple[int, int, int, int]:
    sn, sc, sh, sw = x.stride()
    return sn, sh, sw, sc


def forward(inputs: Sequence[Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], bool]],
            w_rows: torch.Tensor, bias: Optional[torch.Tensor], kernel: Tuple[int, int], stride: int,
            padding: int, stats: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """y (channels_last) and, with stats, the per-tile (sum, centred sum of squares) partials [tiles, Cout].
    `inputs`: one or two (x, scale, shift, relu); w_rows: [KH*KW*Cin, Cout] in the compute dtype."""
    x1 = inputs[0][0]
    n, _, h, w = x1.shape
    kh, kw = kernel
    oh, ow = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    cout = w_rows.shape[1]
    y = empty_channels_last((n, cout, oh, ow), x1.dtype, x1.device)
    m = n * oh * ow
    block_m, block_n, block_k = tile_sizes("fwd", cout, x1.dtype, x1.device.type, dot_precision(x1.dtype))
    tiles = cdiv(m, block_m)
    part_sum = part_m2 = None
    if stats:
        part_sum = torch.empty((tiles, cout), dtype=torch.float32, device=x1.device)
        part_m2 = torch.empty_like(part_sum)
    if m == 0 or cout == 0:
        return y, part_sum, part_m2
    dummy = w_rows  # stands for the pointers a configuration does not read
    second = inputs[1] if len(inputs) > 1 else None
    args = []
    for x, scale, shift, _ in (inputs[0], second or (x1, None, None, False)):
        args += [x, dummy if scale is None else scale, dummy if shift is None else shift,
                 0 if second is None and len(args) else x.shape[1], *_strides(x)]
    grid = (tiles, cdiv(cout, block_n))
    with device_guard(x1):
        conv_gemm_fwd_kernel[grid](
            *args, w_rows, bias if bias is not None else dummy, rows_view(y),
            part_sum if stats else dummy, part_m2 if stats else dummy,
            m, h, w, oh, ow, cout,
            STRIDE=stride, PAD=padding, KH=kh, KW=kw, TWO_INPUTS=len(inputs) > 1,
            PROLOGUE1=inputs[0][1] is not None, RELU1=inputs[0][3],
            PROLOGUE2=second is not None and second[1] is not None, RELU2=second is not None and second[3],
            HAS_BIAS=bias is not None, STATS=stats,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=dot_precision(x1.dtype),
            **_launch_options(block_m * block_n, x1.device.type, dot_precision(x1.dtype), "fwd"))
    return y, part_sum, part_m2


def grad_input(g_rows: torch.Tensor, w_rows: torch.Tensor, x: torch.Tensor, scale: Optional[torch.Tensor],
               shift: Optional[torch.Tensor], relu: bool, k_offset: int, cin: int, out_hw: Tuple[int, int],
               kernel: Tuple[int, int], stride: int, padding: int
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad of x (channels_last), and with a prologue the per-tile partials of the shift's and the scale's
    gradients [tiles, C])."""
    n, c, h, w = x.shape
    oh, ow = out_hw
    cout = w_rows.shape[1]
    gx = empty_channels_last((n, c, h, w), x.dtype, x.device)
    block_m, block_c, block_co = tile_sizes("dgrad", c, x.dtype, x.device.type, dot_precision(x.dtype))
    m_in = n * h * w
    tiles = cdiv(m_in, block_m)
    prologue = scale is not None
    part_gshift = part_gscale = None
    if prologue:
        part_gshift = torch.zeros((tiles, c), dtype=torch.float32, device=x.device)
        part_gscale = torch.zeros_like(part_gshift)
    if m_in == 0 or c == 0:
        return gx, part_gshift, part_gscale
    if cout == 0 or g_rows.shape[0] == 0:
        gx.zero_()
        return gx, part_gshift, part_gscale
    kh, kw = kernel
    with device_guard(x):
        conv_gemm_dgrad_kernel[(tiles, cdiv(c, block_c))](
            g_rows, w_rows, x, scale if prologue else w_rows, shift if prologue else w_rows, rows_view(gx),
            part_gshift if prologue else w_rows, part_gscale if prologue else w_rows,
            m_in, c, k_offset, cin, cout, h, w, oh, ow, *_strides(x),
            STRIDE=stride, PAD=padding, KH=kh, KW=kw, PROLOGUE=prologue, RELU=relu,
            BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_CO=block_co, DOT_PRECISION=dot_precision(x.dtype),
            **_launch_options(block_m * block_c, x.device.type, dot_precision(x.dtype)))
    return gx, part_gshift, part_gscale


def grad_weight(g_rows: torch.Tensor, inputs, cin: int, out_hw: Tuple[int, int], kernel: Tuple[int, int],
                stride: int, padding: int) -> torch.Tensor:
    """The weight gradient as fp32 [KH*KW*Cin, Cout] rows (tap-major), summed over the row splits."""
    m, cout = g_rows.shape
    kh, kw = kernel
    x1 = inputs[0][0]
    splits = max(1, cdiv(m, WGRAD_ROWS_PER_SPLIT))
    rows_per_split = cdiv(m, splits) if m else 1
    dw = torch.zeros((splits, kh * kw * cin, cout), dtype=torch.float32, device=x1.device)
    if m == 0 or cout == 0:
        return dw.sum(0)
    oh, ow = out_hw
    k_offset = 0
    for x, scale, shift, relu in inputs:
        n, c, h, w = x.shape
        block_c, block_co, block_m = tile_sizes("wgrad", c, x.dtype, x.device.type)
        if c:
            with device_guard(x):
                conv_gemm_wgrad_kernel[(cdiv(c, block_c), cdiv(cout, block_co), kh * kw * splits)](
                    g_rows, x, scale if scale is not None else dw, shift if shift is not None else dw, dw,
                    m, c, k_offset, cin, cout, h, w, oh, ow, *_strides(x), rows_per_split,
                    STRIDE=stride, PAD=padding, KH=kh, KW=kw, PROLOGUE=scale is not None, RELU=relu,
                    BLOCK_C=block_c, BLOCK_CO=block_co, BLOCK_M=block_m, DOT_PRECISION=dot_precision(x.dtype),
                    **_launch_options(block_c * block_co, x.device.type, dot_precision(x.dtype)))
        k_offset += c
    return dw.sum(0) if splits > 1 else dw[0]


def kernel_configurations() -> list:
    """The three kernels in every configuration the launchers use on CUDA tensors: 1x1 and 3x3, stride 1 and 2
    (the DLA / DLA-Up / CenterNet convs), one and two inputs, with and without prologue and ReLU, statistics on
    and off, every dtype and fp32 dot precision, the tile widths of Cout / C in {16, 32, 64, 128}. 16-bit tiles
    (all have >= 64 rows) must use wgmma."""
    from ..aot import make_config, triton_type
    configs: List = []
    precisions = {torch.float32: ("tf32", "ieee"), torch.float16: ("tf32",), torch.bfloat16: ("tf32",)}
    aligned_ints = ("C1", "C2", "C", "Cin", "Cout", "k_offset", "s1n", "s1h", "s1w", "s2n", "s2h", "s2w", "sxn",
                    "sxh", "sxw")
    for dtype in backend.FUSED_DTYPES:
        act = "*" + triton_type(dtype)
        wgmma = dtype != torch.float32
        for precision, (kh, stride), channels in product(precisions[dtype], ((1, 1), (3, 1), (3, 2)),
                                                         (16, 32, 64, 128)):
            block_m, block_n, block_k = tile_sizes("fwd", channels, dtype, "cuda", precision)
            for two, prologue, stats in product((False, True), (False, True), (False, True)):
                args = dict(x1_ptr=act, scale1_ptr="*fp32", shift1_ptr="*fp32", C1="i32", s1n="i32", s1h="i32",
                            s1w="i32", s1c="i32", x2_ptr=act, scale2_ptr="*fp32", shift2_ptr="*fp32", C2="i32",
                            s2n="i32", s2h="i32", s2w="i32", s2c="i32", w_ptr=act, bias_ptr="*fp32", y_ptr=act,
                            part_sum_ptr="*fp32", part_m2_ptr="*fp32", M="i32", H="i32", W="i32", OH="i32",
                            OW="i32", Cout="i32")
                configs.append(make_config(
                    conv_gemm_fwd_kernel, args,
                    dict(STRIDE=stride, PAD=kh // 2, KH=kh, KW=kh, TWO_INPUTS=two, PROLOGUE1=prologue,
                         RELU1=prologue, PROLOGUE2=two and prologue, RELU2=two and prologue, HAS_BIAS=not stats,
                         STATS=stats, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=precision),
                    needs_wgmma=wgmma, label=triton_type(dtype),
                    aligned=[a for a in args if args[a].startswith("*") or a in aligned_ints],
                    **_launch_options(block_m * block_n, "cuda", precision, "fwd")))
            block_m, block_c, block_co = tile_sizes("dgrad", channels, dtype, "cuda", precision)
            for prologue in (False, True):
                args = dict(g_ptr=act, w_ptr=act, x_ptr=act, scale_ptr="*fp32", shift_ptr="*fp32", gx_ptr=act,
                            part_gshift_ptr="*fp32", part_gscale_ptr="*fp32", M_in="i32", C="i32", k_offset="i32",
                            Cin="i32", Cout="i32", H="i32", W="i32", OH="i32", OW="i32", sxn="i32", sxh="i32",
                            sxw="i32", sxc="i32")
                configs.append(make_config(
                    conv_gemm_dgrad_kernel, args,
                    dict(STRIDE=stride, PAD=kh // 2, KH=kh, KW=kh, PROLOGUE=prologue, RELU=prologue,
                         BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_CO=block_co, DOT_PRECISION=precision),
                    needs_wgmma=wgmma, label=triton_type(dtype),
                    aligned=[a for a in args if args[a].startswith("*") or a in aligned_ints],
                    **_launch_options(block_m * block_c, "cuda", precision)))
            block_c, block_co, block_m = tile_sizes("wgrad", channels, dtype, "cuda")
            for prologue in (False, True):
                args = dict(g_ptr=act, x_ptr=act, scale_ptr="*fp32", shift_ptr="*fp32", dw_ptr="*fp32", M="i32",
                            C="i32", k_offset="i32", Cin="i32", Cout="i32", H="i32", W="i32", OH="i32", OW="i32",
                            sxn="i32", sxh="i32", sxw="i32", sxc="i32", rows_per_split="i32")
                configs.append(make_config(
                    conv_gemm_wgrad_kernel, args,
                    dict(STRIDE=stride, PAD=kh // 2, KH=kh, KW=kh, PROLOGUE=prologue, RELU=prologue,
                         BLOCK_C=block_c, BLOCK_CO=block_co, BLOCK_M=block_m, DOT_PRECISION=precision),
                    needs_wgmma=wgmma, label=triton_type(dtype),
                    aligned=[a for a in args if args[a].startswith("*") or a in aligned_ints],
                    **_launch_options(block_c * block_co, "cuda", precision)))
    return configs
