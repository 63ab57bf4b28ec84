"""`python -m dla_fast cost` and dla_fast.cost: kernels, bytes and FLOPs of one step on fake CUDA tensors, checked
against hand-computed numbers (a single conv, a fused aggregation node), the table and the JSON output."""
import contextlib
import io
import json

import pytest
import torch.nn as nn

from dla_fast import cost
from dla_fast.cli import main

BF16 = 2


def run_cost(*args):
    """`python -m dla_fast cost ARGS` in this process; returns (exit status, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["cost", *args])
    return status, out.getvalue()


def conv_model():
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False))


def only(kernels, name):
    found = [k for k in kernels if k.name == name]
    assert len(found) == 1, [k.name for k in kernels]
    return found[0]


def test_single_conv_inference_as_cudnn_reads_and_writes_it():
    n, cin, cout, hw = 4, 16, 32, 32
    kernels = cost.eager_kernels(cost.record_step(conv_model, (n, cin, hw, hw), train=False))
    conv = only(kernels, "convolution")
    # bf16 autocast: the input and the weight are cast first (two copy kernels), the conv reads both casts
    assert conv.read == n * cin * hw * hw * BF16 + cout * cin * 9 * BF16
    assert conv.written == n * cout * hw * hw * BF16
    assert conv.flops == 2 * n * cout * hw * hw * cin * 9
    casts = [k for k in kernels if k.name == "_to_copy"]
    assert sorted(k.written for k in casts) == sorted([n * cin * hw * hw * BF16, cout * cin * 9 * BF16])
    assert sorted(k.read for k in casts) == sorted([n * cin * hw * hw * 4, cout * cin * 9 * 4])


def test_single_conv_training_step_dgrad_wgrad_and_sgd():
    n, cin, cout, hw = 4, 16, 32, 32
    kernels = cost.eager_kernels(cost.record_step(conv_model, (n, cin, hw, hw), train=True))
    flops = 2 * n * cout * hw * hw * cin * 9
    wgrad = only(kernels, "convolution_backward.wgrad")
    assert (wgrad.read, wgrad.written, wgrad.flops) == (
        n * cout * hw * hw * BF16 + n * cin * hw * hw * BF16, cout * cin * 9 * BF16, flops)
    assert wgrad.phase == "backward"
    # the input needs no gradient: no dgrad kernel
    assert not [k for k in kernels if k.name == "convolution_backward.dgrad"]
    # SGD with momentum, foreach: buf *= m; buf += grad; param -= lr * buf (one launch each for one fp32 tensor)
    step = [k for k in kernels if k.phase == "optimizer"]
    weight = cout * cin * 9 * 4
    assert sorted(k.name for k in step) == ["_foreach_add_[0/1]", "_foreach_add_[0/1]", "_foreach_mul_[0/1]"]
    assert sum(k.read for k in step) == weight + 2 * weight + 2 * weight
    assert sum(k.written for k in step) == 3 * weight


def test_the_gpu_model_takes_the_larger_floor_plus_a_launch():
    gpu = cost.GPUModel("test", bytes_per_s=1e12, flops_per_s={"bf16": 1e14}, launch_s=1e-6)
    memory_bound = cost.Kernel("k", "conv", "forward", read=2_000_000, written=1_000_000, flops=10**8)
    compute_bound = cost.Kernel("k", "conv", "forward", read=1000, written=0, flops=10**9)
    assert gpu.kernel_time(memory_bound, "bf16") == pytest.approx(3e-6 + 1e-6)
    assert gpu.kernel_time(compute_bound, "bf16") == pytest.approx(1e-5 + 1e-6)


@pytest.fixture(scope="module")
def dla34_inference(tmp_path_factory):
    path = tmp_path_factory.mktemp("cost") / "dla34.json"
    status, stdout = run_cost("--model", "dla34", "--batch", "256", "--json", str(path))
    assert status == 0
    return stdout, json.loads(path.read_text())


def test_dla34_inference_table_and_json(dla34_inference):
    stdout, record = dla34_inference
    assert "dla34 inference, batch 256, 224², bf16" in stdout
    rows = record["providers"]
    assert list(rows) == ["eager", "compile", "dla_fast", "dla_fast_compile"]
    for name, summary in rows.items():
        assert f"\n{name} " in stdout
        kernels = record["kernels"][name]
        assert summary["total"]["launches"] == len(kernels) > 0
        assert summary["total"]["ms"] == pytest.approx(sum(k["ms"] for k in kernels))
        # the convs' FLOPs are those of the model (the DLA-34 forward: 3.06 GMAC per 224² image)
        assert summary["total"]["flops"] == pytest.approx(256 * 2 * 3.06e9, rel=0.03)
    # every BatchNorm folded, every root fused: fewer launches and bytes than eager
    assert rows["dla_fast"]["total"]["launches"] < rows["eager"]["total"]["launches"]
    assert rows["dla_fast"]["total"]["ms"] < rows["compile"]["total"]["ms"] < rows["eager"]["total"]["ms"]
    assert "batchnorm" not in rows["dla_fast"]["kinds"]


def test_fused_aggregation_node_bytes_and_flops_by_hand(dla34_inference):
    """level2.root of DLA-34 at batch 256 (benchmarks/NOTES.md, "The two floors"): two children of 64 channels
    at 56², one 1x1 conv 128 -> 64 with BatchNorm folded in the epilogue: M = 256 * 56 * 56 rows."""
    _, record = dla34_inference
    roots = [k for k in record["kernels"]["dla_fast"] if k["name"] == "aggregate_fwd_kernel"]
    assert len(roots) == 6  # one per Root of DLA-34
    m, k, cout = 256 * 56 * 56, 128, 64
    vectors = 4 * cout * 4  # BN mean, var, weight, bias in fp32
    assert roots[0]["read"] == m * k * BF16 + cout * k * BF16 + vectors  # 205.5 MB
    assert roots[0]["written"] == m * cout * BF16                        # 102.8 MB
    assert roots[0]["flops"] == 2 * m * k * cout                         # 13.2 GFLOP


def test_dla34_training_table():
    status, stdout = run_cost("--model", "dla34", "--batch", "256", "--train")
    assert status == 0
    assert "dla34 training, batch 256" in stdout
    for row in ("eager", "compile", "dla_fast", "dla_fast_fused_bn", "dla_fast_fused_bn_compile"):
        assert f"\n{row} " in stdout
    for kind in ("conv_dgrad", "conv_wgrad", "optimizer", "batchnorm", "fused", "gemm"):
        assert f"\n{kind} " in stdout


@pytest.mark.slow
def test_centernet_dcn_tables(tmp_path):
    path = tmp_path / "centernet.json"
    for mode in ([], ["--train"]):
        status, stdout = run_cost("--model", "centernet_dla34", "--size", "512", "--batch", "16", "--kwarg", "dcn=True",
                                  "--providers", "eager,dla_fast", "--json", str(path), *mode)
        assert status == 0
        record = json.loads(path.read_text())
        names = {p: {k["name"] for k in ks} for p, ks in record["kernels"].items()}
        # eager: torchvision's im2col + GEMM; dla_fast: the Triton deformable conv (16 of them in CenterNet's up path)
        assert "deform_conv2d.im2col" in names["eager"] and "deform_conv_fwd_kernel" in names["dla_fast"]
        assert sum(k["name"] == "deform_conv_fwd_kernel" for k in record["kernels"]["dla_fast"]) == 16
        if mode:
            assert "deform_conv_grad_sample_kernel" in names["dla_fast"]
            assert "deform_conv2d_backward.col2im" in names["eager"]
        assert record["model_kwargs"] == {"dcn": "True"}


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet50"], "--model 'resnet50' is not a dla_fast model"),
    (["--size", "100"], "--size must be a positive multiple of 32"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--kwarg", "dcn"], "expected KEY=VALUE"),
    (["--model", "dla34", "--kwarg", "dcn=True"], "--model dla34 with {'dcn': True}"),
    (["--providers", "dla_fast_fused_bn"], "the fused_bn rows need --train"),
    (["--json", "/sys/cost.json"], "--json /sys/cost.json: cannot write there"),
])
def test_bad_options_are_one_line_and_status_2(args, message, capsys):
    assert main(["cost", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
