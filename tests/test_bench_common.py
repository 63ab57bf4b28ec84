"""The benchmark utilities: timers, the record format, results folders, input rotation and report.py."""
import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dla_fast.cli.records import RECORD_FORMAT, make_record, markdown_table, read_records, slugify, write_records
from dla_fast.cli.timing import PeakMemory, Timing, time_cuda_kernel, time_iterations

BENCHMARKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS_DIR)
common = importlib.import_module("common")
report = importlib.import_module("report")

CPU = torch.device("cpu")


def test_timing_percentiles_interpolate_like_numpy():
    timing = Timing.from_samples([5.0, 1.0, 4.0, 2.0, 3.0], "test")
    assert (timing.ms_p20, timing.ms_p50, timing.ms_p80) == pytest.approx((1.8, 3.0, 4.2))
    with pytest.raises(ValueError):
        Timing.from_samples([], "test")


def test_time_iterations_counts_warmup_and_timed_calls():
    calls, phases = [], []
    timing = time_iterations(lambda: calls.append(1), CPU, warmup=2, iters=3, on_step=phases.append)
    assert len(calls) == 5 and phases == ["warm-up"] * 2 + ["timed"] * 3
    assert 0 <= timing.ms_p20 <= timing.ms_p50 <= timing.ms_p80 and "perf_counter" in timing.method
    with pytest.raises(ValueError):
        time_iterations(lambda: None, CPU, warmup=0, iters=0)


def test_make_record_derives_bandwidth_and_throughput():
    timing = Timing(1.5, 2.0, 2.5, "test")
    record = make_record("aggregate", "triton", "forward", "bf16", [8, 64, 56, 56], timing, CPU,
                         min_bytes=6 * 10**9, min_flops=4 * 10**12, baseline=False, extra={"note": 1})
    assert record.gbps == pytest.approx(3000.0) and record.tflops == pytest.approx(2000.0)
    assert record.device.startswith("CPU: ") and record.torch == torch.__version__
    assert record.date.endswith("+00:00") and record.extra == {"note": 1}
    plain = make_record("aggregate", "eager", "forward", "bf16", [1], timing, CPU)
    assert plain.gbps is None and plain.tflops is None


def test_records_round_trip_and_foreign_files_are_rejected(tmp_path):
    records = [make_record("op", p, "forward", "fp32", {"x": [2, 3]}, Timing(1.0, 2.0, 3.0, "t"), CPU,
                           baseline=p == "eager") for p in ("eager", "triton")]
    path = tmp_path / "sub" / "op.json"
    write_records(str(path), records)
    data = json.loads(path.read_text())
    assert data["format"] == RECORD_FORMAT and len(data["records"]) == 2
    for field in ("op", "provider", "mode", "dtype", "shape", "ms_p20", "ms_p50", "ms_p80", "min_bytes", "gbps",
                  "min_flops", "tflops", "device", "torch", "triton", "git_commit", "date"):
        assert field in data["records"][0], field
    assert read_records(str(path)) == records
    other = tmp_path / "other.json"
    other.write_text('{"a": 1}')
    with pytest.raises(ValueError, match="not a dla_fast benchmark file"):
        read_records(str(other))


def test_results_dir_is_named_after_the_device():
    assert slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    path = common.results_dir(CPU, create=False)
    assert os.path.dirname(path) == os.path.join(BENCHMARKS_DIR, "results")
    assert os.path.basename(path).startswith("cpu-")


def test_rotating_inputs_cover_the_requested_bytes_and_cycle():
    rotation = common.RotatingInputs(lambda: (torch.randn(1000), 3), CPU, min_total_bytes=10_000)
    assert len(rotation) == math.ceil(10_000 / 4000)
    seen = [rotation()[0] for _ in range(2 * len(rotation))]
    assert all(a is b for a, b in zip(seen[:len(rotation)], seen[len(rotation):]))
    assert len({id(t) for t in seen}) == len(rotation)
    assert len(common.RotatingInputs(lambda: (torch.randn(10),), CPU)) == 1  # nothing to rotate on the CPU


def test_bench_op_on_cpu_returns_a_record():
    a = torch.randn(64, 64)
    record = common.bench_op("matmul", "eager", "forward", "fp32", [64, 64], lambda: a @ a, CPU,
                             min_bytes=common.tensor_bytes(a, a, a), min_flops=2 * 64**3, baseline=True)
    assert record.ms_p50 > 0 and record.gbps > 0 and record.tflops > 0 and record.baseline


def test_peak_memory_on_cpu_sees_a_large_allocation():
    """In a fresh process (peak RSS growth depends on what the process touched before)."""
    code = ("import torch; from dla_fast.cli.timing import PeakMemory\n"
            "with PeakMemory(torch.device('cpu')) as memory:\n"
            "    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written\n"
            "    del block\n"
            "print(memory.kind, '|', memory.mb)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kind, mb = result.stdout.strip().rsplit("|", 1)
    if mb.strip() == "None":
        pytest.skip(f"peak RSS cannot be reset here: {kind.strip()}")
    assert kind.strip() == "peak RSS growth" and float(mb) >= 48


def test_markdown_table_aligns_columns():
    text = markdown_table(["name", "ms"], [["a", "1.00"], ["long name", "10.00"]], right_align=[False, True])
    lines = text.splitlines()
    assert lines[0] == "| name      |    ms |" and lines[1] == "|-----------|------:|"
    assert lines[3] == "| long name | 10.00 |"


def _write_fixture(folder):
    """Two cases, each measured by two baselines and one fused provider, with known times."""
    records = []
    for shape in ([8, 64, 56, 56], [8, 128, 28, 28]):
        for provider, baseline, ms in (("eager", True, 2.0), ("compile", True, 1.0), ("triton", False, 0.5)):
            records.append(make_record("aggregate", provider, "forward", "bf16", shape,
                                       Timing(0.9 * ms, ms, 1.1 * ms, "fixture"), CPU,
                                       min_bytes=3 * 10**9, baseline=baseline))
    write_records(os.path.join(folder, "aggregate.json"), records)
    (folder / "notes.json").write_text("[]")


def test_report_writes_speedups_bandwidth_and_roofline(tmp_path, capsys):
    _write_fixture(tmp_path)
    assert report.main([str(tmp_path), "--peak-gbps", "3000"]) == 0
    text = (tmp_path / "report.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| aggregate")]
    assert len(table) == 6
    triton_row = [cell.strip() for cell in table[2].strip("|").split("|")]
    header = [cell.strip() for cell in text.splitlines()[text.splitlines().index(
        next(line for line in text.splitlines() if line.startswith("| op")))].strip("|").split("|")]
    row = dict(zip(header, triton_row))
    assert row["provider"] == "triton" and row["ms p50"] == "0.500"
    assert row["GB/s"] == "6000" and row["% peak BW"] == "200.0%"
    assert row["vs eager"] == "4.00x" and row["vs compile"] == "2.00x"
    assert "skipped" in capsys.readouterr().err  # notes.json is not a benchmark file
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "report.png").exists()
    else:
        assert (tmp_path / "report.png").stat().st_size > 0 and "![speedups](report.png)" in text


def test_report_without_matplotlib_still_writes_the_table(tmp_path, capsys, monkeypatch):
    _write_fixture(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert report.main([str(tmp_path)]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "report.png").exists()
    assert "4.00x" in (tmp_path / "report.md").read_text()


def test_report_on_an_empty_folder_fails_clearly(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "no benchmark JSON files" in capsys.readouterr().err


@pytest.mark.cuda
def test_cuda_timers_and_peak_memory():
    device = torch.device("cuda")
    a = torch.randn(1024, 1024, device=device)
    for cuda_graph in (False, True):
        timing = time_cuda_kernel(lambda: a @ a, cuda_graph=cuda_graph)
        assert 0 < timing.ms_p20 <= timing.ms_p50 <= timing.ms_p80
    assert time_iterations(lambda: a @ a, device, warmup=2, iters=5).ms_p50 > 0
    with PeakMemory(device) as memory:
        torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    assert memory.mb >= 256 and memory.kind == "torch.cuda.max_memory_allocated"
    rotation = common.RotatingInputs(lambda: (torch.randn(2**20, device=device),), device)
    assert len(rotation) * 4 * 2**20 >= 2 * common.l2_cache_bytes(device)
