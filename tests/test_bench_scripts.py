"""The benchmark scripts run end to end on tiny shapes and write their records (a smoke test, not a timing).

Each script's `main(argv)` runs in this process with the arguments a user would pass on the command line
(a subprocess would spend ~6 s importing torch and Triton on the CI machine). Without a GPU the fused providers
run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which costs ~0.1-0.5 s per call, so
the Triton runs are limited to a few cases; the other providers cover every mode.
"""
import importlib
import os
import sys

import pytest
import torch

from dla_fast import backend
from dla_fast.cli.records import read_records

BENCHMARKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS_DIR)

TRITON_REASON = backend.unavailable_reason("triton")
CUDA_PROVIDER = [] if backend.unavailable_reason("cuda") else ["cuda"]  # the extension, when it is built

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton cannot run here: {TRITON_REASON}")]


def run_script(name, args, out):
    """main() of benchmarks/<name>.py with `args` and --out `out`; returns the records it wrote."""
    script = importlib.import_module(name)
    assert script.main([*args, "--out", str(out)]) == 0
    return read_records(str(out))


def check_records(records, op, expected):
    """Every record is a timed, positive measurement of `op`; (provider, mode) pairs are exactly `expected`."""
    assert sorted((r.provider, r.mode) for r in records) == sorted(expected)
    for r in records:
        assert r.op == op and 0 < r.ms_p20 <= r.ms_p50 <= r.ms_p80
        assert r.min_bytes > 0 and r.gbps > 0


def test_bench_aggregate_tiny_config(tmp_path):
    records = run_script("bench_aggregate", ["--batches", "1", "--extra", "", "--size", "32", "--dtypes", "fp32",
                                             "--providers", "eager,triton", "--roots", "level2.root",
                                             "--modes", "inference,training"], tmp_path / "aggregate.json")
    check_records(records, "aggregate", [(p, m) for p in ("eager", "triton") for m in ("inference", "training")])


def test_bench_upsample_merge_smoke(tmp_path):
    cases = ["centernet.ida_up.up_1", "dlaup.ida_3"]  # add with f=2, concat
    providers = ["eager", "eager_cl", *CUDA_PROVIDER]
    records = run_script("bench_upsample_merge", ["--smoke", "--dtypes", "fp32", "--cases", ",".join(cases),
                                                  "--providers", ",".join(providers)], tmp_path / "um.json")
    check_records(records, "upsample_merge",
                  [(p, m) for _ in cases for p in providers for m in ("inference", "training")])
    assert {r.extra["case"] for r in records} == set(cases)
    concat = next(r for r in records if r.extra["case"] == "dlaup.ida_3")
    assert concat.shape["merge"] == "concat" and concat.extra["merges"] == 4

    records = run_script("bench_upsample_merge", ["--smoke", "--dtypes", "fp32", "--cases", "centernet.ida_up.up_2",
                                                  "--providers", "triton", "--modes", "inference"],
                         tmp_path / "um_triton.json")
    check_records(records, "upsample_merge", [("triton", "inference")])
    assert records[0].shape["factor"] == 4


def test_bench_batchnorm_act_smoke(tmp_path):
    providers = ["eager", "triton", *CUDA_PROVIDER]
    modes = ["inference", "training_forward", "training"]
    records = run_script("bench_batchnorm_act", ["--smoke", "--dtypes", "fp32", "--providers", ",".join(providers)],
                         tmp_path / "bn.json")
    check_records(records, "batchnorm_act", [(p, m) for p in providers for m in modes])
    by_mode = {r.mode: r.min_bytes for r in records if r.provider == "eager"}
    assert by_mode["inference"] == by_mode["training_forward"] < by_mode["training"]


@pytest.mark.slow
def test_bench_ida_smoke(tmp_path):
    """The up-path benchmark on a DLA-Up neck at 1/16 of the image side: eager and accelerated (Triton kernels,
    interpreted), both modes."""
    records = run_script("bench_ida", ["--nets", "dlaup", "--batches", "1", "--dtypes", "fp32", "--scale", "16",
                                       "--providers", "eager,dla_fast", "--backend", "triton", "--cpu-iters", "1",
                                       "--cpu-warmup", "1"],
                         tmp_path / "ida.json")
    assert sorted((r.provider, r.mode) for r in records) == sorted(
        (p, m) for p in ("eager", "dla_fast") for m in ("inference", "training"))
    assert all(r.op == "ida_up_path" and 0 < r.ms_p50 for r in records)


def test_layer_costs_counts_the_flops_of_a_training_step():
    """The per-layer FLOPs of a training step (meta device, no arithmetic) add up to what PyTorch's own
    FlopCounterMode counts for the forward + backward of the same model; the table prints."""
    import io

    import layer_costs
    from torch.utils.flop_counter import FlopCounterMode

    rows = layer_costs.layer_costs("dla34", 2, 32)
    model = layer_costs.build("dla34")
    with torch.device("meta"):
        x = torch.empty(2, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    assert sum(r["fwd_flop"] + r["dgrad_flop"] + r["wgrad_flop"] for r in rows) == counter.get_total_flops()
    summary = layer_costs.summarize(rows)
    assert 0 < summary["fused_bytes"] < summary["eager_bytes"]
    assert {r["kind"] for r in rows} >= {"conv", "bn", "relu", "residual_add", "aggregation_cat"}
    out = io.StringIO()
    layer_costs.print_table("dla34", 2, 32, rows, out=out)
    assert "32x32" in out.getvalue() and "total:" in out.getvalue()


def test_profile_training_smoke(tmp_path):
    """One profiled training step of a tiny DLA on CPU (smoke: CPU op time), eager and accelerated."""
    import json

    import profile_training

    out = tmp_path / "profile.json"
    assert profile_training.main(["--smoke", "--models", "dla46_c:2:32", "--providers", "eager,dla_fast",
                                  "--backend", "torch", "--warmup", "0", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["provider"] for r in results] == ["eager", "dla_fast"]
    for r in results:
        assert r["step_ms"] > 0 and r["host_ms"] > 0
        assert r["by_class_ms"]["conv_fwd"] > 0 and r["by_class_ms"]["batchnorm"] > 0
        assert any(key.startswith("bwd 32x32") for key in r["conv_by_layer_ms"])
