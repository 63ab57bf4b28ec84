"""benchmarks/gpu_session.sh (the one GPU verification command) and benchmarks/summary.py (its final table).

The dry run is the script on a CPU: the stages that need a GPU say so, the bench stages run one tiny CPU
run each, and the records files and the final table are written as on the GPU.
"""
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from dla_fast.cli.records import make_record, read_records, write_records
from dla_fast.cli.timing import Timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.sh")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import summary  # noqa: E402

STAGES = ["info", "build", "test", "training", "centernet", "deform", "inference", "summary"]


def run_script(*args, out=None, timeout=60):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               PYTHON=sys.executable)
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_the_records_and_the_table(tmp_path):
    done = run_script("--dry-run", out=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (tmp_path / "session.log").read_text()
    for stage in STAGES:
        assert re.search(rf"^=== {stage}: rc 0, \d+ s$", log, re.M), (stage, log[-3000:])
    assert "=== build (limit" in log and "skipped: needs a GPU; would run: " in log

    # the test stage would run every file with a GPU test, the never-run ones first
    command = next(line for line in log.splitlines() if "-m pytest -m cuda" in line)
    files = command.split("-m pytest -m cuda ")[1].split()
    with_gpu_tests = {os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))
                      if "mark.cuda" in open(path).read()}
    assert with_gpu_tests <= set(files) and len(files) == len(set(files))
    assert files[:2] == ["tests/test_batchnorm_act.py", "tests/test_sync_batchnorm.py"]

    # at most 8 files come back from a device call: these
    assert sorted(os.listdir(tmp_path)) == ["centernet.json", "deform.json", "inference.json", "session.log",
                                            "summary.md", "training.json"]
    cases = {name: read_records(str(tmp_path / f"{name}.json")) for name in ("training", "centernet", "inference")}
    assert [(r.op, r.mode, r.provider) for r in cases["training"]] == [
        ("dla34", "train_step", "eager"), ("dla34", "train_step", "dla_fast")]
    assert [(r.op, r.provider) for r in cases["centernet"]] == [("centernet_dla34", "eager"),
                                                                ("centernet_dla34", "dla_fast")]
    assert {r.op for r in read_records(str(tmp_path / "deform.json"))} == {"deform_conv2d"}
    # the GPU runs the stages would make are named in full
    for path in ("triton", "cuda"):  # each fused training path in a run of its own
        assert f"--model dla34 --batch 256 --train --providers dla_fast --backend {path}" in log
        assert f"--model centernet_dla34 --size 512 --batch 16 --train --providers dla_fast --backend {path}" in log
    assert "--model dla34 --batch 256 --train --providers compile" in log
    assert "--model dla34 --batch 256 --train --providers dla_fast_conv_gemm" in log
    assert "--model dla34 --batch 1 --providers eager_graph,dla_fast_graph" in log

    table = (tmp_path / "summary.md").read_text()
    assert table in log.replace("\r", "")  # printed too
    rows = [summary_cells(line) for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    header, rows = rows[0], rows[1:]
    assert header[:8] == ["file", "op", "mode", "dtype", "case", "provider", "vs", "ratio"]
    pairs = {(row[0], row[2], row[5], row[6]) for row in rows}
    assert pairs == {("training", "train step", "dla_fast", "eager"), ("centernet", "inference", "dla_fast", "eager"),
                     ("inference", "inference", "dla_fast", "eager"),
                     ("deform", "inference", "dla_fast", "torchvision_fp32")}
    assert all(re.fullmatch(r"\d+\.\d\dx", row[7]) for row in rows)


def summary_cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_plans_fit_eight_and_four_minutes():
    for args, budget in ((["--plan"], 480), (["--quick", "--plan"], 240)):
        done = run_script(*args)
        assert done.returncode == 0, done.stderr
        lines = dict(line.rsplit(" ", 1) for line in done.stdout.splitlines() if not line.startswith("total"))
        assert list(lines)[:len(STAGES)] == STAGES
        assert sum(int(v) for v in lines.values()) <= budget
        assert done.stdout.splitlines()[-1] == f"total {sum(int(v) for v in lines.values())} of budget {budget}"
    quick = dict(line.rsplit(" ", 1) for line in run_script("--quick", "--plan").stdout.splitlines()[:-1])
    assert int(quick["build"]) > 0 and int(quick["test"]) > 0 and int(quick["training"]) > 0


@pytest.mark.parametrize("args, message", [
    (["--fast"], "unknown option --fast"),
    (["tests"], "unknown stage tests; stages: info build test"),
])
def test_bad_arguments_exit_2(args, message):
    done = run_script(*args)
    assert done.returncode == 2 and message in done.stderr


def _record(op, provider, mode, p20, p50, p80, baseline=False, batch=16, iters=50):
    return make_record(op, provider, mode, "bf16", [batch, 3, 512, 512], Timing(p20, p50, p80, "test"),
                       torch.device("cpu"), baseline=baseline, extra=dict(batch=batch, iters=iters))


def test_summary_gives_every_ratio_with_its_spread_and_the_targets(tmp_path):
    records = [_record("centernet_dla34", "eager_channels_last", "inference", 30, 31, 32, baseline=True),
               _record("centernet_dla34", "compile_channels_last", "inference", 26, 27, 28, baseline=True),
               _record("centernet_dla34", "dla_fast_channels_last", "inference", 14, 15, 16),
               _record("centernet_dla34", "dla_fast[triton]_channels_last", "train_step", 60, 61, 62),
               _record("centernet_dla34", "eager_channels_last", "train_step", 59, 62, 63, baseline=True)]
    rows = summary.ratio_rows("centernet", records)
    by_pair = {(row[2], row[5], row[6]): row for row in rows}
    assert set(by_pair) == {("inference", "compile", "eager"), ("inference", "dla_fast", "eager"),
                            ("inference", "dla_fast", "compile"), ("train step", "dla_fast[triton]", "eager")}
    assert by_pair["inference", "dla_fast", "eager"][7:] == ["2.07x", "1.88-2.29", "faster", "met (>= 2x)"]
    assert by_pair["inference", "dla_fast", "compile"][7:] == ["1.80x", "1.62-2.00", "faster", ""]
    assert by_pair["train step", "dla_fast[triton]", "eager"][7:] == ["1.02x", "0.95-1.05", "within noise",
                                                                      "NOT met (>= 1.5x)"]
    write_records(str(tmp_path / "centernet.json"), records)
    (tmp_path / "notes.json").write_text(json.dumps({"not": "records"}))
    junit = tmp_path / "tests.xml"
    junit.write_text('<testsuites><testsuite name="pytest">'
                     '<testcase classname="tests.test_a" name="test_ok"/>'
                     '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
                     '<testcase classname="tests.test_b" name="test_gpu"><skipped message="y"/></testcase>'
                     '<testcase classname="tests.test_b" name="test_err"><error message="z"/></testcase>'
                     '</testsuite></testsuites>')
    text = summary.table(str(tmp_path), str(junit))
    assert "GPU tests: 4 run: 1 passed, 1 failed, 1 errors, 1 skipped" in text
    assert "  failure: tests.test_a::test_bad" in text and "  error: tests.test_b::test_err" in text
    assert "| 2.07x |" in text and "NOT met (>= 1.5x)" in text
    assert "no result file" in summary.test_report(str(tmp_path / "missing.xml"))[0]


def test_merge_joins_the_runs_of_a_stage_and_skips_missing_ones(tmp_path, capsys):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    write_records(str(first), [_record("dla34", "eager", "train_step", 1, 2, 3, baseline=True, batch=256)])
    write_records(str(second), [_record("dla34", "compile", "train_step", 1, 1.5, 2, baseline=True, batch=256)])
    out = tmp_path / "training.json"
    assert summary.main(["merge", str(out), str(first), str(tmp_path / "absent.json"), str(second)]) == 0
    assert [r.provider for r in read_records(str(out))] == ["eager", "compile"]
    assert "skipped" in capsys.readouterr().err
    assert summary.main(["merge", str(tmp_path / "none.json"), str(tmp_path / "absent.json")]) == 0
    assert not (tmp_path / "none.json").exists()
