"""The detection kernels compiled for sm_90 without a GPU (`python -m dla_fast.detection.aot`): one
configuration per kernel, covering every flag at least once (fp32 and bf16 heatmaps), with registers and spills (the same
check dla_fast.ops.aot runs for the ops' kernels; tests/test_detection_decode.py runs it in a subprocess)."""
from __future__ import annotations

import sys
from typing import List

from ..ops.aot import KernelConfig, compile_sm90
from . import kernels
from .decode import PEAK_BLOCK
from .preprocess import PIXEL_BLOCK


def configurations() -> List[KernelConfig]:
    configs = [
        KernelConfig("warp_affine_normalize_kernel", kernels.warp_affine_normalize_kernel,
                     {"src_ptr": "*u8", "image_ptr": "*i64", "matrix_ptr": "*fp64", "lut_ptr": "*fp32",
                      "out_ptr": "*fp32", "out_h": "i32", "out_w": "i32", "BLOCK": "constexpr"},
                     {"BLOCK": PIXEL_BLOCK}),
        KernelConfig("letterbox_area_normalize_kernel", kernels.letterbox_area_normalize_kernel,
                     {"src_ptr": "*u8", "image_ptr": "*i64", "xtab_idx_ptr": "*i32", "xtab_w_ptr": "*fp32",
                      "ytab_idx_ptr": "*i32", "ytab_w_ptr": "*fp32", "lut_ptr": "*fp32", "out_ptr": "*fp32",
                      "out_h": "i32", "out_w": "i32", "pad_value": "fp32", "TAPS_X": "constexpr",
                      "TAPS_Y": "constexpr", "SWAP_RB": "constexpr", "BLOCK": "constexpr"},
                     {"TAPS_X": 4, "TAPS_Y": 4, "SWAP_RB": True, "BLOCK": PIXEL_BLOCK}),
    ]
    for dtype, sigmoid in (("fp32", False), ("bf16", True)):
        configs.append(KernelConfig(
            f"heat_peaks_kernel[{dtype},sigmoid={sigmoid}]", kernels.heat_peaks_kernel,
            {"heat_ptr": f"*{dtype}", "out_ptr": "*fp32", "total": "i32", "height": "i32", "width": "i32",
             "APPLY_SIGMOID": "constexpr", "BLOCK": "constexpr"},
            {"APPLY_SIGMOID": sigmoid, "BLOCK": PEAK_BLOCK}))
    names = ["score_ptr", "order_ptr", "class_index_ptr", "wh_ptr", "reg_ptr", "tracking_ptr", "to_image_ptr",
             "det_ptr", "ind_ptr", "image_box_ptr", "image_tracking_ptr"]
    types = ["*fp32", "*i64", "*i64", "*bf16", "*bf16", "*bf16", "*fp64", "*fp32", "*i64", "*fp32", "*fp32"]
    ints = ["K", "num_classes", "height", "width"] + [f"s_{h}_{d}" for h in ("wh", "reg", "tr")
                                                       for d in ("b", "c", "y", "x")]
    flags = ["HAS_REG", "CAT_SPEC_WH", "LTRB", "CLAMP_WH", "HAS_TRACKING", "TO_IMAGE", "BLOCK_K"]
    signature = dict(zip(names, types)) | {n: "i32" for n in ints} | {f: "constexpr" for f in flags}
    for label, values in (("ctdet_cat_spec", (True, True, False, False, False, True, 128)),
                          ("mot_ltrb", (True, False, True, False, False, True, 512)),
                          ("centertrack", (True, False, False, True, True, True, 128))):
        configs.append(KernelConfig(f"assemble_detections_kernel[{label}]", kernels.assemble_detections_kernel,
                                    signature, dict(zip(flags, values))))
    configs.append(KernelConfig(
        "gather_normalize_kernel", kernels.gather_normalize_kernel,
        {"feature_ptr": "*bf16", "ind_ptr": "*i64", "out_ptr": "*fp32", "K": "i32", "dim": "i32", "s_b": "i32",
         "s_c": "i32", "s_y": "i32", "s_x": "i32", "width": "i32", "eps": "fp32", "NORMALIZE": "constexpr",
         "BLOCK_D": "constexpr"}, {"NORMALIZE": True, "BLOCK_D": 128}))
    return configs


def main() -> int:
    failed = 0
    for config in configurations():
        try:
            info = compile_sm90(config)
            spills = info.spill_bytes > 0 or info.stack_bytes > 0
            failed += spills
            print(f"{config.name}: {info.registers} registers, local {info.spill_bytes}, stack {info.stack_bytes}"
                  + (" SPILLS" if spills else ""))
        except Exception as e:  # report every configuration
            failed += 1
            print(f"{config.name}: FAILED {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
