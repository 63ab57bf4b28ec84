"""benchmarks/bench_deform_conv.py end to end on its --smoke case (a smoke test, not a timing).

The dla_fast provider runs with backend 'auto', i.e. the eager reference on the CPU: each interpreted call of
the deformable-conv kernels takes seconds, and the timer makes over twenty calls per record. The kernels
themselves are tested in tests/test_deform_conv.py and tests/test_dcn_block.py.
"""
import pytest

from test_bench_scripts import run_script

pytest.importorskip("torchvision")


def test_bench_deform_conv_smoke(tmp_path):
    records = run_script("bench_deform_conv", ["--smoke", "--dtypes", "fp32"], tmp_path / "deform_conv.json")
    expected = sorted((op, p, m) for op, providers in (("deform_conv2d", ("torchvision_fp32", "dla_fast")),
                                                        ("dcn_block", ("eager", "dla_fast")))
                      for p in providers for m in ("inference", "training"))
    assert sorted((r.op, r.provider, r.mode) for r in records) == expected
    for r in records:
        assert 0 < r.ms_p20 <= r.ms_p50 <= r.ms_p80 and r.min_flops > 0 and r.min_bytes > 0
        assert r.extra["floor_ms"] > 0 and r.extra["x_floor"] > 0 and r.extra["count"] >= 1
    training = next(r for r in records if r.mode == "training")
    inference = next(r for r in records if r.mode == "inference" and r.op == training.op)
    assert training.min_flops == 3 * inference.min_flops
