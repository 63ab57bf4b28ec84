"""Every Triton kernel configuration the package launches compiles for Hopper (sm_90), its 16-bit GEMM tiles use
wgmma (HGMMA), and nothing spills registers: triton.compile with GPUTarget("cuda", 90, 32), no GPU needed,
with the argument specialization the JIT gives the models' shapes (KernelConfig.aligned: 16-byte aligned
pointers, channel counts and row strides that are multiples of 16).

The configurations come from each ops module's kernel_configurations() (derived from its launchers' own tile
and launch choices); CI compiles dla_fast.ops.aot.ci_selection of them (every tile shape of the GEMM kernels,
the largest tiles of the others, every flag / dtype / tile value at least once), in one subprocess without
TRITON_INTERPRET (under the interpreter `triton.jit` gives functions that do not compile) and a fresh Triton
cache. Every configuration: `python -m dla_fast.ops.aot --all`.
"""
import json
import os
import subprocess
import sys

import pytest

import dla_fast

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(dla_fast.__file__)))

@pytest.fixture(scope="module")
def aot_records(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    results = tmp / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton_cache")  # compile for real, not from an earlier cache
    proc = subprocess.run([sys.executable, "-m", "dla_fast.ops.aot", "--jobs", str(min(os.cpu_count() or 1, 2)),
                           "--json", str(results)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert results.exists(), f"dla_fast.ops.aot did not finish:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(results.read_text())["records"]


def _kernel(record) -> str:
    return record["name"].split("[")[0]


def test_every_kernel_configuration_compiles_for_sm90_with_wgmma(aot_records):
    kernels = {_kernel(r) for r in aot_records}
    for expected in ("aggregate_fwd_kernel", "aggregate_grad_input_kernel", "aggregate_grad_weight_kernel",
                     "aggregate_stats_merge_kernel", "bn_apply_kernel", "bn_backward_apply_kernel",
                     "channel_stats_partial_kernel", "channel_stats_merge_kernel", "upsample_merge_fwd_kernel",
                     "upsample_merge_bwd_kernel", "grad_weight_reduce_kernel", "aggregate_dy_kernel",
                     "aggregate_stats_group_kernel", "deform_conv_fwd_kernel", "deform_conv_grad_sample_kernel",
                     "deform_conv_grad_weight_kernel", "conv_gemm_fwd_kernel", "conv_gemm_dgrad_kernel",
                     "conv_gemm_wgrad_kernel"):
        assert expected in kernels, f"{expected} has no configuration in the AOT selection"
    assert any(r["needs_wgmma"] for r in aot_records), "no 16-bit GEMM configuration was checked for wgmma"
    bad = [f"{r['name']}: {p}" for r in aot_records for p in r["problems"] if not p.startswith("spills")]
    assert not bad, f"{len(bad)} of {len(aot_records)} configurations fail on sm_90:\n" + "\n".join(bad)


def test_no_kernel_configuration_spills_registers_on_sm90(aot_records):
    """No stack or local memory, compiled with the specialization the JIT gives the models' shapes (each
    KernelConfig's `aligned` arguments divisible by 16): without it, Triton 3.8 spills up to 1.4 kB per thread in
    the aggregation GEMMs (the generic variant, which only odd channel counts run)."""
    spilling = [f"{r['name']}: {'; '.join(p for p in r['problems'] if p.startswith('spills'))}"
                for r in aot_records if any(p.startswith("spills") for p in r["problems"])]
    assert not spilling, f"{len(spilling)} configurations spill on sm_90:\n" + "\n".join(spilling)
