"""Fused BatchNorm (+ residual) (+ ReLU): every implementation against nn.BatchNorm2d (+ add) (+ ReLU).

Implementations on CPU tensors: 'torch' (eager), 'triton' (Triton interpreter), 'cuda' (the C++ CPU kernels of
the extension dla_fast._C). On a GPU (`@pytest.mark.cuda`): 'triton' and 'cuda' on CUDA tensors, bf16 included.
"""
import copy

import pytest
import torch
import torch.nn as nn

from dla_fast import backend
from dla_fast.ops import batchnorm_act as bna
from dla_fast.ops.batchnorm_act import blocks as bn_blocks
from dla_fast.ops.common import rows_view

from helpers import assert_close, randomize_bn, rel_err

EXTENSION_BUILT, EXTENSION_DETAIL = backend.extension_status()
needs_extension = pytest.mark.skipif(
    not EXTENSION_BUILT, reason=f"dla_fast._C is {EXTENSION_DETAIL}: build it with "
    "DLA_FAST_FORCE_CUDA=1 pip install --no-build-isolation -e .")
needs_interpreter = pytest.mark.skipif(
    not backend.triton_interpreter_enabled(),
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (conftest sets it only on machines without a GPU)")

CPU_IMPLS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton", marks=[pytest.mark.interpreter, needs_interpreter]),
    pytest.param("cuda", id="cpp", marks=needs_extension),
]
KERNEL_CPU_IMPLS = CPU_IMPLS[1:]
GPU_IMPLS = [pytest.param("triton", id="triton"), pytest.param("cuda", id="cuda", marks=needs_extension)]

# (N, C, H, W): odd channel counts; M = N*H*W spans several row tiles and reduction programs and is not a
# multiple of any block (Triton tiles of 1024x4, 128x32, 64x64 values; C++ chunks of 512 rows).
SHAPES = [(2, 3, 29, 31), (3, 17, 13, 17), (2, 100, 9, 11)]


def shape_id(shape):
    return "x".join(map(str, shape))


def make_bn(channels, momentum=0.1, affine=True, track_running_stats=True):
    """An fp32 nn.BatchNorm2d with random affine parameters and running statistics."""
    bn = nn.BatchNorm2d(channels, momentum=momentum, affine=affine, track_running_stats=track_running_stats)
    return randomize_bn(bn)


def random_input(shape, dtype=torch.float32, device="cpu", channels_last=True):
    x = (torch.randn(shape, device=device) * 1.5 + 0.3).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _results(bn, out, x, residual):
    results = {"output": out.detach(), "grad x": x.grad}
    if residual is not None:
        results["grad residual"] = residual.grad
    if bn.affine:
        results["grad weight"], results["grad bias"] = bn.weight.grad.clone(), bn.bias.grad.clone()
        bn.zero_grad()
    return results


def run_fused(bn, x, grad, impl, residual=None, relu=True):
    """batchnorm_act with bn's parameters and buffers (updated in place): output and gradients by name."""
    x = x.detach().clone().requires_grad_()
    residual = None if residual is None else residual.detach().clone().requires_grad_()
    with backend.use_backend(impl):
        out = bna.batchnorm_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                                bn.training, bn.momentum, bn.eps, residual=residual, relu=relu)
    out.backward(grad)
    return _results(bn, out, x, residual)


def run_eager(bn, x, grad, residual=None, relu=True):
    """The eager chain bn(x) [+ residual] [ReLU]: output and gradients by name."""
    x = x.detach().clone().requires_grad_()
    residual = None if residual is None else residual.detach().clone().requires_grad_()
    out = bn(x)
    if residual is not None:
        out = out + residual
    if relu:
        out = torch.relu(out)
    out.backward(grad)
    return _results(bn, out, x, residual)


def assert_fp32_parity(ours, ref):
    assert ours.keys() == ref.keys()
    for what in ref:
        assert_close(ours[what], ref[what], 1e-5 if what == "output" else 1e-4, what)


def assert_buffers_match(bn_ours, bn_ref):
    if bn_ref.track_running_stats:
        assert_close(bn_ours.running_mean, bn_ref.running_mean, 1e-5, "running_mean")
        assert_close(bn_ours.running_var, bn_ref.running_var, 1e-5, "running_var")
        assert bn_ours.num_batches_tracked.item() == bn_ref.num_batches_tracked.item()


def _poisoned(*like):
    return tuple(torch.full_like(t, float("nan")) for t in like)


# ----------------------------------------------------------------------------------------------------------
# Building blocks on [M, C] rows
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_building_blocks_match_fp64_formulas(impl, shape):
    c = shape[1]
    y = rows_view(random_input(shape))
    residual, grad_out = torch.randn_like(y), torch.randn_like(y)
    weight, bias = torch.rand(c) + 0.5, torch.randn(c)
    eps = 1e-5
    y64 = y.double()
    var64, mean64 = torch.var_mean(y64, dim=0, correction=0)

    mean, var = bna.channel_stats(y, impl=impl, out=_poisoned(weight, weight))
    assert_close(mean, mean64, 1e-5, "mean")
    assert_close(var, var64, 1e-5, "var")

    out = bna.bn_apply(y, mean, var, weight, bias, eps, residual, relu=True, impl=impl, out=_poisoned(y)[0])
    xhat64 = (y64 - mean.double()) * torch.rsqrt(var.double() + eps)
    assert_close(out, torch.relu(xhat64 * weight.double() + bias.double() + residual.double()), 1e-5, "bn_apply")

    sum_g, sum_g_xhat = bna.bn_backward_reduce(grad_out, out, y, mean, var, eps, relu=True, impl=impl,
                                               out=_poisoned(weight, weight))
    g64 = torch.where(out <= 0, 0.0, grad_out.double())
    assert_close(sum_g, g64.sum(0), 1e-5, "sum_g")
    assert_close(sum_g_xhat, (g64 * xhat64).sum(0), 1e-5, "sum_g_xhat")

    grad_y, grad_residual = bna.bn_backward_apply(grad_out, out, y, mean, var, weight, eps, True, sum_g, sum_g_xhat,
                                                  residual_grad=True, impl=impl, out=_poisoned(y, y))
    rows = y.shape[0]
    scale64 = weight.double() * torch.rsqrt(var.double() + eps)
    grad_y64 = scale64 * (g64 - sum_g.double() / rows - xhat64 * sum_g_xhat.double() / rows)
    assert_close(grad_y, grad_y64, 1e-5, "grad_y (batch statistics)")
    assert_close(grad_residual, g64, 1e-6, "grad_residual")

    grad_y_eval, no_residual_grad = bna.bn_backward_apply(grad_out, None, y, mean, var, None, eps, False, impl=impl,
                                                          out=(_poisoned(y)[0], None))
    assert no_residual_grad is None
    assert_close(grad_y_eval, grad_out.double() * torch.rsqrt(var.double() + eps), 1e-5, "grad_y (constant stats)")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_channel_stats_stable_for_large_mean(impl, monkeypatch):
    # Many reduction programs, merged in several groups (the GPU's regime, at a CPU-sized shape).
    monkeypatch.setattr(bn_blocks, "INTERPRETER_PROGRAMS", 8)
    monkeypatch.setattr(bn_blocks, "MAX_BLOCK_PARTIALS", 4)
    rows, channels = 20011, 5
    y = 1e3 + torch.randn(rows, channels) * torch.linspace(0.5, 2.0, channels)
    var64, mean64 = torch.var_mean(y.double(), dim=0, correction=0)
    mean, var = bna.channel_stats(y, impl=impl)
    ulp = torch.finfo(torch.float32).eps * 512  # fp32 spacing of values in [512, 1024)
    assert (mean.double() - mean64).abs().max().item() <= ulp
    assert_close(var, var64, 1e-5, "var")  # a naive sum of squares would lose it all in cancellation


# ----------------------------------------------------------------------------------------------------------
# The op against nn.BatchNorm2d
# ----------------------------------------------------------------------------------------------------------

TRAINING_CASES = [  # shape, residual, relu, momentum, channels_last input
    pytest.param((2, 3, 29, 31), True, True, 0.1, True, id="3ch-res-relu-m0.1-nhwc"),
    pytest.param((3, 17, 13, 17), False, True, None, False, id="17ch-relu-cumulative-nchw"),
    pytest.param((2, 100, 9, 11), True, False, 0.1, True, id="100ch-res-m0.1-nhwc"),
    pytest.param((2, 17, 5, 7), False, False, None, True, id="17ch-plain-cumulative-nhwc"),
]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("shape, residual, relu, momentum, channels_last", TRAINING_CASES)
def test_training_then_eval_matches_batchnorm2d(impl, shape, residual, relu, momentum, channels_last):
    bn_ref = make_bn(shape[1], momentum=momentum)
    bn_ours = copy.deepcopy(bn_ref)
    for training in (True, True, False):
        bn_ours.train(training), bn_ref.train(training)
        x = random_input(shape, channels_last=channels_last)
        r = torch.randn(shape) if residual else None
        grad = torch.randn(shape)
        ours = run_fused(bn_ours, x, grad, impl, r, relu)
        assert_fp32_parity(ours, run_eager(bn_ref, x, grad, r, relu))
        assert_buffers_match(bn_ours, bn_ref)
        if impl != "torch":  # the kernels write channels_last whatever the input's layout
            assert ours["output"].is_contiguous(memory_format=torch.channels_last)


EXPECTED_LAUNCHES = {  # per training step with residual and ReLU: forward, then backward
    "triton": ["channel_stats_partial_kernel", "channel_stats_merge_kernel", "bn_apply_kernel",
               "bn_backward_reduce_partial_kernel", "bn_backward_reduce_merge_kernel", "bn_backward_apply_kernel"],
    "cuda": ["bn_channel_stats", "bn_apply", "bn_backward_reduce", "bn_backward_apply"],
}


@pytest.mark.parametrize("impl", KERNEL_CPU_IMPLS)
def test_the_kernels_really_run(impl, monkeypatch):
    launched = []
    if impl == "triton":
        from triton.runtime.interpreter import InterpretedFunction

        interpreted_run = InterpretedFunction.run

        def counting_run(kernel, *args, **kwargs):
            launched.append(kernel.__name__)
            return interpreted_run(kernel, *args, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    else:
        extension_ops = bn_blocks.extension_ops()

        class RecordingOps:
            def __getattr__(self, name):
                launched.append(name)
                return getattr(extension_ops, name)

        monkeypatch.setattr(bn_blocks, "extension_ops", RecordingOps)
    shape = (2, 5, 3, 4)
    bn = make_bn(5)
    run_fused(bn, random_input(shape), torch.randn(shape), impl, torch.randn(shape))
    assert launched == EXPECTED_LAUNCHES[impl]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_affine_false_and_no_running_stats(impl, training):
    shape = (2, 17, 6, 7)
    for affine, track in ((False, True), (True, False), (False, False)):
        bn_ref = make_bn(shape[1], affine=affine, track_running_stats=track).train(training)
        bn_ours = copy.deepcopy(bn_ref)
        x, r, grad = random_input(shape), torch.randn(shape), torch.randn(shape)
        assert_fp32_parity(run_fused(bn_ours, x, grad, impl, r), run_eager(bn_ref, x, grad, r))
        assert_buffers_match(bn_ours, bn_ref)


def assert_within_twice_eager(ours, eager, ref64, what):
    err, eager_err = rel_err(ours, ref64), rel_err(eager, ref64)
    assert err <= 2 * eager_err, f"{what}: error {err:.3g} > 2 x eager's {eager_err:.3g}"


def check_low_precision(impl, shape, dtype, device, param_dtype=None):
    """Two training steps and an eval step with `dtype` activations and `param_dtype` parameters and buffers
    (default: `dtype`): ours within 2x eager's error against fp64."""
    bn = make_bn(shape[1]).to(device=device, dtype=param_dtype or dtype)
    bn_ours, bn_eager, bn_ref = copy.deepcopy(bn), copy.deepcopy(bn), copy.deepcopy(bn).double()
    for training in (True, True, False):
        for m in (bn_ours, bn_eager, bn_ref):
            m.train(training)
        x = random_input(shape, dtype=dtype, device=device)
        r = torch.randn(shape, device=device).to(dtype)
        grad = torch.randn(shape, device=device).to(dtype)
        ours = run_fused(bn_ours, x, grad, impl, r)
        eager = run_eager(bn_eager, x, grad, r)
        ref = run_eager(bn_ref, x.double(), grad.double(), r.double())
        for what in ref:
            assert_within_twice_eager(ours[what], eager[what], ref[what], what)
        for name in ("running_mean", "running_var"):
            ours_buffer, eager_buffer, ref_buffer = (getattr(m, name) for m in (bn_ours, bn_eager, bn_ref))
            if ours_buffer.dtype == torch.float32:
                assert_close(ours_buffer, ref_buffer, 1e-5, name)
            else:
                assert_within_twice_eager(ours_buffer, eager_buffer, ref_buffer, name)


@pytest.mark.parametrize("impl", KERNEL_CPU_IMPLS)
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32], ids=["fp16-params", "fp32-params"])
def test_fp16_within_twice_eager_error(impl, param_dtype):
    check_low_precision(impl, (3, 17, 13, 17), torch.float16, "cpu", param_dtype)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("shape", [(2, 1, 3, 3), (4, 5, 1, 1)], ids=["one-channel", "1x1-spatial"])
def test_edge_shapes(impl, shape):
    bn_ref = make_bn(shape[1])
    bn_ours = copy.deepcopy(bn_ref)
    x, r, grad = random_input(shape), torch.randn(shape), torch.randn(shape)
    assert_fp32_parity(run_fused(bn_ours, x, grad, impl, r), run_eager(bn_ref, x, grad, r))
    assert_buffers_match(bn_ours, bn_ref)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_empty_batch_like_pytorch(impl):
    shape = (0, 5, 4, 3)
    bn_ref = make_bn(5)
    bn_ours = copy.deepcopy(bn_ref)
    x, r, grad = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    ours = run_fused(bn_ours, x, grad, impl, r)
    ref = run_eager(bn_ref, x, grad, r)
    for what in ("output", "grad x", "grad residual"):
        assert ours[what].shape == ref[what].shape == shape
    for what in ("grad weight", "grad bias"):
        assert torch.equal(ours[what], ref[what]), what
    assert_buffers_match(bn_ours, bn_ref)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("training, track_running_stats", [(True, True), (False, False)],
                         ids=["training", "eval-without-running-stats"])
def test_one_value_per_channel_with_batch_stats_is_pytorchs_error(impl, training, track_running_stats):
    bn = make_bn(3, track_running_stats=track_running_stats).train(training)
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        run_fused(bn, x, torch.randn_like(x), impl)


@pytest.mark.parametrize("impl", KERNEL_CPU_IMPLS)
def test_large_mean_input_matches_fp64_reference(impl):
    shape = (2, 7, 23, 19)
    bn = make_bn(7)
    bn_ours, bn_eager, bn_ref = copy.deepcopy(bn), copy.deepcopy(bn), copy.deepcopy(bn).double()
    x = 1e3 + torch.randn(shape)
    grad = torch.randn(shape)
    ours = run_fused(bn_ours, x, grad, impl, relu=False)
    eager = run_eager(bn_eager, x, grad, relu=False)
    ref = run_eager(bn_ref, x.double(), grad.double(), relu=False)
    for what in ref:  # fp32 parity with the fp64 reference, or within 2x eager fp32's own error
        err, eager_err = rel_err(ours[what], ref[what]), rel_err(eager[what], ref[what])
        tol = 1e-5 if what == "output" else 1e-4
        assert err < tol or err <= 2 * eager_err, f"{what}: error {err:.3g}, eager's {eager_err:.3g}"
    assert_buffers_match(bn_ours, bn_ref)


BAD_INPUTS = [  # (changes to the good arguments, message)
    pytest.param(dict(x=torch.randn(2, 5, 4)), "expected a 4-D", id="3-D input"),
    pytest.param(dict(weight=torch.randn(6)), r"weight must have shape \(5,\)", id="weight channels"),
    pytest.param(dict(running_var=None), "both running_mean and running_var", id="half the running stats"),
    pytest.param(dict(residual=torch.randn(2, 5, 4, 4, dtype=torch.float64)), "residual .* must match",
                 id="residual dtype"),
    pytest.param(dict(residual=torch.randn(2, 5, 4, 4, device="meta")), "residual .* must match",
                 id="residual device"),
    pytest.param(dict(residual=torch.randn(2, 5, 4, 5)), "residual .* must match", id="residual shape"),
]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("change, message", BAD_INPUTS)
def test_bad_inputs_are_clear_errors(impl, change, message):
    args = dict(x=torch.randn(2, 5, 4, 4), weight=torch.rand(5), bias=torch.randn(5), running_mean=torch.zeros(5),
                running_var=torch.ones(5), residual=None)
    args.update(change)
    with backend.use_backend(impl), pytest.raises(ValueError, match=message):
        bna.batchnorm_act(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("running_mean"),
                          args.pop("running_var"), training=True, **args)


@pytest.mark.parametrize("impl", KERNEL_CPU_IMPLS)
def test_kernels_reject_float64(impl):
    with backend.use_backend(impl), pytest.raises(backend.BackendUnavailable, match="not torch.float64"):
        bna.batchnorm_act(torch.randn(2, 3, 4, 4, dtype=torch.float64), None, None, None, None, training=True)


# ----------------------------------------------------------------------------------------------------------
# Custom ops: opcheck and torch.compile
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", KERNEL_CPU_IMPLS)
def test_custom_ops_pass_opcheck(impl):
    shape = (2, 5, 3, 4)
    x = random_input(shape).requires_grad_()
    residual = torch.randn(shape, requires_grad=True)
    weight, bias = (torch.rand(5) + 0.5).requires_grad_(), torch.randn(5, requires_grad=True)
    running_mean, running_var = torch.randn(5), torch.rand(5) + 0.5
    for use_batch_stats in (True, False):
        torch.library.opcheck(bna.batchnorm_act_forward,
                              (x, weight, bias, running_mean, running_var, residual, use_batch_stats, 1e-5, True, impl))
    out, mean, var = bna.batchnorm_act_forward(x.detach(), weight.detach(), bias.detach(), None, None, None, True,
                                               1e-5, True, impl)
    torch.library.opcheck(bna.batchnorm_act_backward,
                          (torch.randn(shape), out, x.detach(), weight.detach(), mean, var, True, 1e-5, True, impl,
                           True, True, True))


@pytest.mark.parametrize("impl", KERNEL_CPU_IMPLS)
def test_torch_compile_fullgraph_traces_the_op(impl):
    shape = (2, 5, 3, 4)
    bn_compiled = make_bn(5)
    bn_eager = copy.deepcopy(bn_compiled)

    def step(bn, x, residual):
        with backend.use_backend(impl):
            return bna.batchnorm_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                                     True, 0.1, 1e-5, residual=residual)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, residual, grad = random_input(shape), torch.randn(shape), torch.randn(shape)
    x_c, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c, out_e = compiled(bn_compiled, x_c, residual), step(bn_eager, x_e, residual)
    out_c.backward(grad), out_e.backward(grad)
    assert_close(out_c, out_e, 1e-6, "output")
    assert_close(x_c.grad, x_e.grad, 1e-6, "grad x")
    assert_close(bn_compiled.weight.grad, bn_eager.weight.grad, 1e-6, "grad weight")
    assert_buffers_match(bn_compiled, bn_eager)


# ----------------------------------------------------------------------------------------------------------
# On the GPU
# ----------------------------------------------------------------------------------------------------------

GPU_SHAPES = [(4, 64, 28, 28), (2, 100, 17, 19), (3, 3, 31, 29), (2, 24, 7, 9)]


@pytest.mark.cuda
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_id)
def test_cuda_fp32_matches_batchnorm2d(impl, shape):
    bn_ref = make_bn(shape[1]).cuda()
    bn_ours = copy.deepcopy(bn_ref)
    for training in (True, True, False):
        bn_ours.train(training), bn_ref.train(training)
        x, r, grad = random_input(shape, device="cuda"), torch.randn(shape, device="cuda"), torch.randn(shape,
                                                                                                       device="cuda")
        assert_fp32_parity(run_fused(bn_ours, x, grad, impl, r), run_eager(bn_ref, x, grad, r))
        assert_buffers_match(bn_ours, bn_ref)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("param_dtype", [None, torch.float32], ids=["same-params", "fp32-params"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=shape_id)
def test_cuda_low_precision_within_twice_eager_error(impl, dtype, param_dtype, shape):
    check_low_precision(impl, shape, dtype, "cuda", param_dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", GPU_IMPLS)
def test_cuda_statistics_large_m_large_mean_deterministic(impl):
    rows, channels = (1 << 20) + 37, 64
    y = 1e3 + torch.randn(rows, channels, device="cuda")
    var64, mean64 = torch.var_mean(y.double(), dim=0, correction=0)
    mean, var = bna.channel_stats(y, impl=impl)
    assert (mean.double() - mean64).abs().max().item() < 1.5e-4
    assert_close(var, var64, 1e-5, "var")
    again = bna.channel_stats(y, impl=impl)
    assert torch.equal(mean, again[0]) and torch.equal(var, again[1])
    grad, out = torch.randn_like(y), torch.randn_like(y)
    sums = bna.bn_backward_reduce(grad, out, y, mean, var, 1e-5, True, impl=impl)
    assert all(torch.equal(a, b) for a, b in zip(sums, bna.bn_backward_reduce(grad, out, y, mean, var, 1e-5, True,
                                                                             impl=impl)))


@pytest.mark.cuda
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_cuda_unaligned_rows_equal_aligned_rows(impl, dtype):
    rows, channels = 1000, 64  # C allows 16-byte vectors; the unaligned base pointer does not
    unaligned = torch.randn(rows * channels + 1, device="cuda").to(dtype)[1:].view(rows, channels)
    aligned = unaligned.clone()
    mean, var = bna.channel_stats(unaligned, impl=impl)
    var64, mean64 = torch.var_mean(unaligned.double(), dim=0, correction=0)
    assert_close(mean, mean64, 1e-5, "mean")
    assert_close(var, var64, 1e-5, "var")
    out = torch.full((rows * channels + 1,), float("nan"), device="cuda", dtype=dtype)[1:].view(rows, channels)
    bna.bn_apply(unaligned, mean, var, None, None, 1e-5, None, True, impl=impl, out=out)
    assert torch.equal(out, bna.bn_apply(aligned, mean, var, None, None, 1e-5, None, True, impl=impl))
