"""`python -m dla_fast info | bench`: output, JSON records, and clear errors (exit status 2) for bad options."""
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn as nn

import dla_fast
from dla_fast.cli import bench, build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "dla46_c", "--batch", "1", "--size", "64", "--iters", "2", "--warmup", "1", "--device", "cpu"]
RECORD_FIELDS = ("op", "provider", "mode", "dtype", "shape", "ms_p20", "ms_p50", "ms_p80", "timing", "min_bytes",
                 "gbps", "min_flops", "tflops", "baseline", "device", "torch", "triton", "git_commit", "date")
EXTRA_FIELDS = ("batch", "image_size", "images_per_s", "peak_mem_mb", "peak_mem_kind", "layout", "weights")


def run_module(*args):
    """`python -m dla_fast ARGS` on this checkout, in a fresh process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "dla_fast", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def bench_in_process(tmp_path, *args):
    """Run `bench` with --json (in a folder it creates) in this process; returns (stdout, the records)."""
    path = tmp_path / "results" / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["bench", *TINY, "--no-progress", "--json", str(path), *args]) == 0
    return stdout.getvalue(), json.loads(path.read_text())["records"]


@pytest.fixture(scope="module")
def inference_run(tmp_path_factory):
    """(stdout, eager record) of the tiny inference benchmark with the default providers, run once for the tests
    that read it."""
    out, records = bench_in_process(tmp_path_factory.mktemp("inference"))
    assert [r["provider"] for r in records] == ["eager", "dla_fast"]  # the CPU defaults show what dla_fast does
    return out, records[0]


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
    """(finished process, record) of `python -m dla_fast bench --train`, with its progress bar, run once."""
    path = tmp_path_factory.mktemp("train") / "train.json"
    done = run_module("bench", *TINY, "--train", "--providers", "eager", "--json", str(path))
    assert done.returncode == 0, done.stderr
    (record,) = json.loads(path.read_text())["records"]
    return done, record


def test_info_lists_versions_and_backends():
    done = run_module("info")
    assert done.returncode == 0, done.stderr
    for name in ["python", "torch", "triton", "timm", "numpy", "CUDA available", "extension dla_fast._C",
                 "backend in force", "TRITON_INTERPRET"] + [f"backend {b}" for b in dla_fast.available_backends()]:
        assert any(line.startswith(name) for line in done.stdout.splitlines()), (name, done.stdout)
    assert "backend torch" in done.stdout and " OK" in done.stdout


def test_bench_training_step_in_a_fresh_process(training_run):
    done, record = training_run
    assert "train step" in done.stdout and "dla46_c" in done.stdout
    assert "timed" in done.stderr  # the progress bar
    assert record["mode"] == "train_step" and record["provider"] == "eager" and record["baseline"]


def test_bench_inference_prints_a_table_and_writes_records(inference_run):
    out, record = inference_run
    for field in RECORD_FIELDS:
        assert field in record, field
    for field in EXTRA_FIELDS:
        assert field in record["extra"], field
    assert (record["op"], record["mode"], record["dtype"], record["shape"]) == ("dla46_c", "inference", "fp32",
                                                                               [1, 3, 64, 64])
    assert record["ms_p20"] <= record["ms_p50"] <= record["ms_p80"]
    assert record["extra"]["images_per_s"] == pytest.approx(1e3 / record["ms_p50"])
    assert record["device"].startswith("CPU: ") and record["min_flops"] > 0
    header = next(line for line in out.splitlines() if line.startswith("| model"))
    for column in ("ms p50", "ms p20-p80", "images/s", "peak MB", "device", "dtype", "mode"):
        assert column in header
    assert "| inference |" in out and f"peak MB: {record['extra']['peak_mem_kind']}" in out


def test_flop_count_matches_the_convolutions(inference_run, training_run):
    """Inference FLOPs equal 2 * MACs of every conv; a training step adds grad-input and grad-weight."""
    model = dla_fast.create_model("dla46_c")
    macs = []

    def count(module, inputs, output):
        macs.append(output.numel() * module.in_channels // module.groups * module.kernel_size[0]
                    * module.kernel_size[1])

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(count)
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 64, 64))
    inference, training = inference_run[1]["min_flops"], training_run[1]["min_flops"]
    assert inference == 2 * sum(macs)
    first_conv = 2 * macs[0]  # the image needs no gradient
    assert training == 3 * inference - first_conv


def test_bench_bf16_channels_last_from_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(dla_fast.create_model("dla46_c").state_dict(), path)
    out, (record,) = bench_in_process(tmp_path, "--dtype", "bf16", "--channels-last", "--checkpoint", str(path),
                                      "--providers", "eager")
    assert record["dtype"] == "bf16" and record["provider"] == "eager_channels_last"
    assert record["extra"]["layout"] == "channels_last" and "AMP autocast" in out
    assert record["extra"]["weights"] == str(path) and "loaded" in out


def test_several_providers_give_one_row_each():
    config = bench.resolve_config(build_parser().parse_args(["bench", *TINY, "--no-progress"]))
    again = bench.Provider("eager_again", lambda model, config: model, baseline=False,
                           description=lambda config: "test")
    records = bench.run_benchmarks(config, [bench.PROVIDERS["eager"], again])
    assert [r.provider for r in records] == ["eager", "eager_again"]
    assert [r.baseline for r in records] == [True, False]
    table = bench.format_table(records).splitlines()
    assert len(table) == 4 and "eager_again" in table[3]
    assert cells(table[0])[-1] == "vs eager" and cells(table[2])[-1] == "reference"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the defaults used without a GPU")
def test_cpu_defaults_are_small_and_announced():
    config = bench.resolve_config(build_parser().parse_args(["bench"]))
    assert (config.device.type, config.batch, config.size) == ("cpu", 2, 224)
    assert config.providers == ("eager", "dla_fast")
    assert "no CUDA GPU found" in config.defaults_note and "batch 2" in config.defaults_note
    explicit = bench.resolve_config(build_parser().parse_args(["bench", *TINY]))
    assert explicit.defaults_note is None


@pytest.mark.parametrize("args, message", [
    (["--model", "dla35"], "unknown model 'dla35'"),
    (["--size", "100"], "divisible by 32"),
    (["--size", "0"], "--size must be at least 32"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--checkpoint", "/nonexistent/weights.pth"], "checkpoint file not found"),
    (["--providers", "eager,dla_fast_graph", "--train"], "CUDA-graph replay needs a CUDA GPU (the device is cpu)"),
    (["--providers", "eager_graph"], "needs a CUDA GPU (the device is cpu)"),
    (["--train", "--size", "32"], "--train with --batch 1 --size 32: BatchNorm in training needs more than one value "
                                  "per channel, and the last level (stride 32) is 1x1 at this size"),
    (["--json", "."], "--json .: is a folder; give a file name"),
    (["--json", os.path.join(ROOT, "README.md", "bench.json")], "README.md is a file, not a folder"),
    (["--checkpoint", ROOT], "checkpoint path is a directory"),
    (["--checkpoint", os.path.join(ROOT, "README.md")], "is not a checkpoint: it is a text file starting with"),
])
def test_bad_options_exit_2_with_a_clear_message(args, message, capsys):
    assert main(["bench", *TINY, *args]) == 2
    out, err = capsys.readouterr()
    assert message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith(build_parser().prog + " bench: error: "), err
    assert "| model" not in out  # refused before running anything
    if "unknown model" in message:
        assert "Known models" in err and "dla34" in err


def test_bad_dtype_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *TINY, "--dtype", "fp8"])
    assert exit_info.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def test_fp16_is_refused_where_cpu_autocast_lacks_it(monkeypatch, capsys):
    monkeypatch.setattr(bench, "_cpu_autocast_works", lambda dtype: dtype is not torch.float16)
    assert main(["bench", *TINY, "--dtype", "fp16"]) == 2
    assert "no CPU autocast for torch.float16" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given without a GPU")
def test_cuda_device_without_a_gpu_exits_2(capsys):
    assert main(["bench", *TINY[:-2], "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.cuda
def test_bench_on_the_gpu(tmp_path, capsys):
    path = tmp_path / "gpu.json"
    for extra in ([], ["--train"]):
        assert main(["bench", "--model", "dla46_c", "--batch", "2", "--size", "64", "--iters", "3", "--warmup", "2",
                     "--dtype", "bf16", "--no-progress", "--json", str(path), *extra]) == 0
        records = json.loads(path.read_text())["records"]
        expected = ["eager", "dla_fast"] + ([] if extra else ["eager_graph", "dla_fast_graph"])
        assert [r["provider"] for r in records] == expected  # the GPU defaults
        for record in records:
            assert record["device"] == torch.cuda.get_device_name() and "cuda events" in record["timing"]
            assert record["extra"]["peak_mem_kind"] == "torch.cuda.max_memory_allocated"
            assert record["extra"]["peak_mem_mb"] > 0
    assert "train step" in capsys.readouterr().out


def _can_create_files_in(folder):
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not os.path.isdir("/sys") or _can_create_files_in("/sys"),
                    reason="needs a folder where files cannot be created, even by root (/sys)")
def test_json_in_a_folder_without_write_access_exits_2_before_running(capsys):
    assert main(["bench", *TINY, "--json", "/sys/bench.json"]) == 2
    out, err = capsys.readouterr()
    assert "--json /sys/bench.json: cannot create files in /sys" in err and "| model" not in out


def test_checkpoint_that_does_not_fit_is_one_error_line_with_the_fix(tmp_path, capsys):
    path = tmp_path / "ten_classes.pth"
    torch.save(dla_fast.create_model("dla46_c", num_classes=10).state_dict(), path)
    assert main(["bench", *TINY, "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "create_model('dla46_c', num_classes=10)" in err
    assert "Differences: fc.weight: checkpoint (10, 256, 1, 1) vs model (1000, 256, 1, 1); fc.bias" in err


@pytest.fixture
def canned_run(inference_run, monkeypatch):
    """Replace the timed run by the records of `inference_run` (or by `fail`, an exception to raise)."""
    record = bench.BenchRecord.from_dict(inference_run[1])
    state = {"fail": None}

    def run_benchmarks(config, providers):
        if state["fail"] is not None:
            raise state["fail"]
        return [record]

    monkeypatch.setattr(bench, "run_benchmarks", run_benchmarks)
    return state


def test_records_that_cannot_be_written_at_the_end_keep_the_table(canned_run, tmp_path, monkeypatch, capsys):
    def disk_full(path, records):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench, "write_records", disk_full)
    assert main(["bench", *TINY, "--no-progress", "--json", str(tmp_path / "out.json")]) == 2
    out, err = capsys.readouterr()
    assert "| dla46_c |" in out and "No space left on device" in err and "table above holds the results" in err


@pytest.mark.parametrize("failure, status, message", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 2,
     "error: out of memory at --batch 1 --size 64: an allocation of 2.00 GiB failed (the fp32 input batch alone is "
     "48.0 KiB); try a smaller --batch or --size"),
    (KeyboardInterrupt(), 130, "bench: interrupted"),
])
def test_out_of_memory_and_interrupt_end_without_traceback(canned_run, failure, status, message, capsys):
    canned_run["fail"] = failure
    assert main(["bench", *TINY, "--no-progress"]) == status
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1


def test_compile_providers_compile_the_right_model_with_their_mode(monkeypatch):
    """dla_fast_compile(_graph) compile the accelerated model, compile(_graph) the eager one, *_graph with
    mode="reduce-overhead" (torch.compile is recorded, not run: tests/test_compile.py compiles the accelerated
    models; the training rows run the same prepared module through bench's training step)."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: calls.append(kwargs.get("mode")) or model)
    config = bench.resolve_config(build_parser().parse_args(["bench", *TINY, "--train"]))
    for name, mode, accelerated in (("compile", None, False), ("compile_graph", "reduce-overhead", False),
                                    ("dla_fast_compile", None, True),
                                    ("dla_fast_compile_graph", "reduce-overhead", True)):
        prepared = bench.PROVIDERS[name].prepare(dla_fast.create_model("dla46_c"), config)
        assert calls.pop() == mode and bool(dla_fast.accelerated_modules(prepared)) == accelerated, name


def test_conv_gemm_provider_accelerates_with_the_implicit_gemm_convs():
    """Provider dla_fast_conv_gemm: accelerate(model, conv="triton") (its convs' choice recorded on the modules)."""
    config = bench.resolve_config(build_parser().parse_args(["bench", *TINY, "--train"]))
    prepared = bench.PROVIDERS["dla_fast_conv_gemm"].prepare(dla_fast.create_model("dla46_c"), config)
    chosen = {m.__dict__.get("_conv") for m in prepared.modules() if hasattr(m, "use_conv")}
    assert dla_fast.accelerated_modules(prepared) and chosen == {"triton"}


def test_allocation_failure_is_one_line_naming_the_memory_needed():
    """The CPU allocator's failure is a plain RuntimeError with a C++ trace: one error line naming the size (more
    than a 47-bit address space, so that no overcommit setting lets the allocation through)."""
    done = run_module("bench", "--model", "dla46_c", "--device", "cpu", "--batch", "1000000000", "--no-progress")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "python -m dla_fast bench: error: out of memory at --batch 1000000000 --size 224: an allocation of 547.6 TiB "
        "failed (the fp32 input batch alone is 547.6 TiB); try a smaller --batch or --size"]


@pytest.mark.parametrize("environment, message", [
    (dict(WORLD_SIZE="2", RANK="0"), "error: WORLD_SIZE=2 asks for a data-parallel run, but MASTER_ADDR, MASTER_PORT "
                                     "are not set: start it with torchrun --nproc-per-node N"),
    (dict(WORLD_SIZE="two"), "error: environment variable WORLD_SIZE='two': not a number of processes"),
])
def test_data_parallel_environment_without_a_launcher_is_one_line(environment, message, monkeypatch, capsys):
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert main(["bench", *TINY, "--train", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1


def test_unreachable_master_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "not-a-port")
    assert main(["bench", *TINY, "--train", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: could not join the gloo process group at localhost:not-a-port as rank 0 of 2" in err
    assert len(err.splitlines()) == 1


def cells(line):
    """The stripped cells of a markdown table row."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _record(provider, p20, p50, p80, baseline=False):
    timing = bench.Timing(p20, p50, p80, "perf_counter, test")
    extra = dict(batch=1, image_size=64, images_per_s=1e3 / p50, peak_mem_mb=None, peak_mem_kind="n/a")
    return bench.make_record("dla46_c", provider, "inference", "fp32", [1, 3, 64, 64], timing, torch.device("cpu"),
                             baseline=baseline, extra=extra)


def test_ratio_against_eager_with_its_spread_and_a_noise_verdict():
    eager = _record("eager", 9.0, 10.0, 11.0, baseline=True)
    faster = _record("dla_fast", 4.0, 5.0, 6.0)
    overlapping = _record("dla_fast[triton]", 8.0, 8.5, 9.5)
    slower = _record("compile", 12.0, 20.0, 25.0, baseline=True)
    ratio = bench.Ratio.of(faster, eager)
    assert (ratio.median, ratio.low, ratio.high) == pytest.approx((2.0, 9.0 / 6.0, 11.0 / 4.0))
    assert str(ratio) == "2.00x (1.50-2.75) faster"
    assert str(bench.Ratio.of(overlapping, eager)) == "1.18x (0.95-1.38) within noise"
    assert str(bench.Ratio.of(slower, eager)) == "0.50x (0.36-0.92) slower"
    # eager is the reference wherever it sits in the run; without eager, the first baseline
    assert bench.reference_record([faster, slower, eager]) is eager
    assert bench.reference_record([faster, slower]) is slower
    table = bench.format_table([slower, faster, eager, overlapping]).splitlines()
    assert cells(table[0])[-1] == "vs eager"
    assert [cells(line)[-1] for line in table[2:]] == ["0.50x (0.36-0.92) slower", "2.00x (1.50-2.75) faster",
                                                       "reference", "1.18x (0.95-1.38) within noise"]


@pytest.mark.parametrize("value, text", [(3265.3, "3265"), (12.34, "12.3"), (0.01234, "0.0123"), (0.0, "0"),
                                         (None, "n/a"), (1.0, "1.00")])
def test_numbers_keep_significant_digits(value, text):
    assert bench.significant(value) == text


def test_slow_steps_print_images_per_second_with_significant_digits():
    slow = _record("eager", 60_000.0, 80_000.0, 90_000.0, baseline=True)
    row = cells(bench.format_table([slow]).splitlines()[2])
    assert row[7] == "80000" and row[9] == "0.0125"


def test_inference_footnotes_say_what_runs_on_the_cpu(inference_run):
    out = inference_run[0]
    notes = [line for line in out.splitlines() if line.startswith(("provider dla_fast", "backend"))]
    assert notes[0].startswith("provider dla_fast: dla_fast.accelerate(model): dla_fast's modules")
    assert "BatchNorm folded into the convs" in notes[0] and "fused" not in notes[0]
    assert notes[1].startswith("backend auto: on the CPU, auto runs the eager reference of dla_fast's modules")
    assert "within noise" in out or "faster" in out or "slower" in out
    assert "vs eager: eager's median time / the row's" in out


def test_training_footnotes_describe_the_training_step(tmp_path):
    out, records = bench_in_process(tmp_path, "--train", "--iters", "1", "--warmup", "0")
    assert [r["provider"] for r in records] == ["eager", "dla_fast"]
    assert "folded" not in out and "in training: dla_fast's modules for the aggregation nodes" in out
    assert "train step" in out and "vs eager: eager's median time" in out


def test_several_backends_time_each_dla_fast_provider_once_per_backend(tmp_path):
    out, records = bench_in_process(tmp_path, "--providers", "eager,dla_fast", "--backend", "auto,torch",
                                    "--iters", "1", "--warmup", "0")
    assert [r["provider"] for r in records] == ["eager", "dla_fast", "dla_fast[torch]"]
    assert [r["extra"].get("backend") for r in records] == [None, "auto", "torch"]
    assert "backend auto: on the CPU, auto runs the eager reference" in out
    assert "backend torch: runs the eager reference" in out


@pytest.mark.parametrize("value, message", [
    ("auto,fast", "--backend: unknown fast; choose from auto, torch, triton, cuda"),
    (",", "--backend: unknown (none given)"),
])
def test_unknown_backend_is_refused_naming_it(value, message, capsys):
    assert main(["bench", *TINY, "--backend", value]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1


def test_data_parallel_table_keeps_significant_digits():
    from dla_fast.cli import distributed

    slow = _record("eager_ddp2", 60_000.0, 80_000.0, 90_000.0, baseline=True)
    slow.extra.update(world_size=2, images_per_s=2 / 80.0, images_per_s_per_rank=[1 / 80.0, 1 / 81.0],
                      single_process_images_per_s=1 / 70.0, scaling_efficiency=0.875)
    row = cells(distributed.format_table([slow]).splitlines()[2])
    assert row[7:] == ["80000", "0.0125 / 0.0123", "0.0250", "0.0143", "88%"]
