"""Fused IDA upsample-merge: every implementation equals eager F.conv_transpose2d + add / cat.

Triton runs in the interpreter on tiny CPU shapes, the extension's C++ kernels on CPU tensors (skipped when
dla_fast._C is not built), and both on the GPU with bf16 in the `cuda`-marked tests. Outputs and gradients are
poisoned: with deterministic algorithms on, every uninitialised allocation (torch.empty in Python, at::empty
in C++) is filled with NaN, so an element a kernel leaves unwritten fails the comparison. F.conv_transpose2d
is disabled while a fused path runs, so nothing can fall back to eager unnoticed.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import dla_fast
from dla_fast import backend
from dla_fast.ops import upsample_merge as um
from dla_fast.ops.upsample_merge import upsample_merge

from helpers import assert_close, poisoned_allocations, rel_err

FACTORS = (2, 4, 8)
MODES = ("add", "concat")
EXTENSION_BUILT, EXTENSION_DETAIL = backend.extension_status()
needs_extension = pytest.mark.skipif(
    not EXTENSION_BUILT, reason=f"the extension dla_fast._C is {EXTENSION_DETAIL}; build it with "
                                "`pip install --no-build-isolation -e .` (DLA_FAST_FORCE_CUDA=1 without a GPU)")
GPU = torch.device("cuda")
# Backend 'cuda' (the extension's kernels; C++ ones for CPU tensors). Its id is not "cuda": conftest skips every
# test with a "cuda" keyword on machines without a GPU, and parametrize ids are keywords.
EXTENSION = pytest.param("cuda", marks=needs_extension, id="extension")
# Triton on CPU tensors needs the interpreter; on a GPU machine the same cases run in the cuda tests below.
cpu_triton = pytest.mark.skipif(not backend.triton_interpreter_enabled(),
                                reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (the cuda tests cover the GPU)")


def tiny_shape(factor):
    """(N, C, Ch, h, w) for interpreter tests: channels not multiples of 16, odd sides, > 64 low pixels for f < 8."""
    return (1, 5, 3, 3, 5) if factor == 8 else (2, 5, 3, 5, 7)


def make_inputs(shape, factor, mode, dtype, device="cpu"):
    """Fresh random low (N, C, h, w), weight (C, 1, 2f, 2f), high and grad_out of the merged output."""
    n, c, ch, h, w = shape
    high_channels = c if mode == "add" else ch
    low = torch.randn(n, c, h, w, device=device).to(dtype)
    weight = torch.randn(c, 1, 2 * factor, 2 * factor, device=device).div_(factor).to(dtype)
    high = torch.randn(n, high_channels, factor * h, factor * w, device=device).to(dtype)
    out_channels = c if mode == "add" else ch + c
    grad = torch.randn(n, out_channels, factor * h, factor * w, device=device).to(dtype)
    return low, weight, high, grad


def eager(low, weight, high, factor, mode):
    """The reference the op must equal, written here with plain torch ops."""
    up = F.conv_transpose2d(low, weight, stride=factor, padding=factor // 2, groups=low.shape[1])
    return up + high if mode == "add" else torch.cat([high, up], dim=1)


def forward_backward(fn, low, weight, high, grad, factor, mode):
    """(out, grad_low, grad_weight, grad_high) of fn on leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (low, weight, high)]
    out = fn(*leaves, factor, mode)
    grads = torch.autograd.grad(out, leaves, grad)
    return (out.detach(), *grads)


@contextlib.contextmanager
def fused_backend(impl, monkeypatch):
    """Backend `impl`, with poisoned allocations and F.conv_transpose2d refusing to run (no eager fallback)."""
    def refuse(*args, **kwargs):
        raise AssertionError("F.conv_transpose2d ran on the fused path")

    with monkeypatch.context() as patch, poisoned_allocations(), dla_fast.use_backend(impl):
        patch.setattr(F, "conv_transpose2d", refuse)
        yield


def run_fused(impl, monkeypatch, low, weight, high, grad, factor, mode):
    """forward_backward of upsample_merge under fused_backend(impl); the output must be channels_last."""
    with fused_backend(impl, monkeypatch):
        result = forward_backward(upsample_merge, low, weight, high, grad, factor, mode)
    assert result[0].is_contiguous(memory_format=torch.channels_last)
    return result


def check_against_eager(impl, monkeypatch, shape, factor, mode, dtype, device="cpu", channels_last=False):
    """The fused op under backend `impl` equals the fp64 eager reference (fp32: < 1e-5 outputs, < 1e-4 grads;
    fp16 / bf16: error at most 2x that of eager PyTorch in the same dtype), forward and all three gradients."""
    low, weight, high, grad = make_inputs(shape, factor, mode, dtype, device)
    if channels_last:
        low, high, grad = (t.contiguous(memory_format=torch.channels_last) for t in (low, high, grad))
    reference = forward_backward(eager, *(t.double() for t in (low, weight, high, grad)), factor, mode)
    ours = run_fused(impl, monkeypatch, low, weight, high, grad, factor, mode)
    names = ("output", "grad_low", "grad_weight", "grad_high")
    if dtype == torch.float32:
        for name, got, ref in zip(names, ours, reference):
            assert_close(got, ref, 1e-5 if name == "output" else 1e-4, f"{impl} {name}")
        return
    theirs = forward_backward(eager, low, weight, high, grad, factor, mode)
    for name, got, eager_result, ref in zip(names, ours, theirs, reference):
        err, eager_err = rel_err(got, ref), rel_err(eager_result, ref)
        assert err <= 2 * eager_err, f"{impl} {dtype} {name}: error {err:.3g} > 2 x eager's {eager_err:.3g}"


# ---------------------------------------------------------------------------------------------------------
# The eager reference of the module, and input validation (every backend validates the same way).
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_reference_and_torch_backend_equal_conv_transpose(mode):
    low, weight, high, _ = make_inputs((2, 5, 3, 5, 7), 4, mode, torch.float32)
    expected = eager(low, weight, high, 4, mode)
    assert torch.equal(um.upsample_merge_reference(low, weight, high, 4, mode), expected)
    with dla_fast.use_backend("torch"):
        assert torch.equal(upsample_merge(low, weight, high, 4, mode), expected)


def _bad_inputs():
    low = torch.randn(2, 5, 3, 4)
    weight = torch.randn(5, 1, 8, 8)
    high = torch.randn(2, 5, 12, 16)
    return [
        ("high not f x low", (low, weight, torch.randn(2, 5, 6, 8), 4, "add"), ValueError, "exactly factor x low"),
        ("high off by one", (low, weight, torch.randn(2, 5, 12, 15), 4, "add"), ValueError, "exactly factor x low"),
        ("add channel mismatch", (low, weight, torch.randn(2, 6, 12, 16), 4, "add"), ValueError, "channels of low"),
        ("weight not (C,1,2f,2f)", (low, torch.randn(5, 1, 4, 4), high, 4, "add"), ValueError, r"\(C, 1, 2f, 2f\)"),
        ("weight channels", (low, torch.randn(4, 1, 8, 8), high, 4, "add"), ValueError, r"\(C, 1, 2f, 2f\)"),
        ("dtype mismatch", (low, weight, high.half(), 4, "add"), TypeError, "dtypes differ"),
        ("device mismatch", (low, weight, high.to("meta"), 4, "add"), ValueError, "devices differ"),
        ("low 3-D", (low[0], weight, high, 4, "add"), ValueError, "low must be 4-D"),
        ("high 5-D", (low, weight, high[None], 4, "add"), ValueError, "high must be 4-D"),
        ("batch mismatch", (low, weight, high[:1], 4, "add"), ValueError, "batch sizes differ"),
        ("factor 1", (low, torch.randn(5, 1, 2, 2), torch.randn(2, 5, 3, 4), 1, "add"), ValueError, "even integer"),
        ("odd factor", (low, torch.randn(5, 1, 6, 6), torch.randn(2, 5, 9, 12), 3, "add"), ValueError, "even integer"),
        ("unknown mode", (low, weight, high, 4, "sum"), ValueError, "mode must be one of"),
        ("integer tensors", (low.long(), weight.long(), high.long(), 4, "add"), TypeError, "floating-point"),
    ]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda case: case[0])
def test_bad_inputs_raise_clear_errors(case, impl):
    _, args, error, message = case
    with dla_fast.use_backend(impl), pytest.raises(error, match=message):
        upsample_merge(*args)


@pytest.mark.interpreter
@cpu_triton
def test_fused_paths_reject_float64():
    low, weight, high, _ = make_inputs((1, 3, 2, 2, 3), 2, "add", torch.float64)
    with dla_fast.use_backend("triton"), pytest.raises(dla_fast.BackendUnavailable, match="not torch.float64"):
        upsample_merge(low, weight, high, 2, "add")


# ---------------------------------------------------------------------------------------------------------
# Triton kernels in the interpreter.
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.interpreter
@cpu_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factor", FACTORS)
def test_triton_matches_eager(factor, mode, dtype, monkeypatch):
    check_against_eager("triton", monkeypatch, tiny_shape(factor), factor, mode, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", [pytest.param("triton", marks=cpu_triton), EXTENSION])
@pytest.mark.parametrize("mode", MODES)
def test_fp32_weight_with_fp16_activations_as_autocast(impl, mode, monkeypatch):
    """An fp32 weight with fp16 low / high (autocast's parameters, cast inside the op): output and gradients
    within 2x the error of eager fp16 with the weight cast as autocast casts it; the weight's gradient is fp32."""
    factor = 4
    low, _, high, grad = make_inputs(tiny_shape(factor), factor, mode, torch.float16)
    weight = torch.randn(low.shape[1], 1, 2 * factor, 2 * factor).div_(factor)
    reference = forward_backward(eager, *(t.double() for t in (low, weight, high, grad)), factor, mode)

    def eager_autocast(low, weight, high, factor, mode):
        return eager(low, weight.half(), high, factor, mode)

    theirs = forward_backward(eager_autocast, low, weight, high, grad, factor, mode)
    ours = run_fused(impl, monkeypatch, low, weight, high, grad, factor, mode)
    assert ours[2].dtype == torch.float32
    for name, got, eager_result, ref in zip(("output", "grad_low", "grad_weight", "grad_high"), ours, theirs,
                                            reference):
        err, eager_err = rel_err(got, ref), rel_err(eager_result, ref)
        assert err <= 2 * eager_err, f"{impl} {name}: error {err:.3g} > 2 x eager's {eager_err:.3g}"


@pytest.mark.interpreter
@cpu_triton
def test_triton_several_channel_blocks_and_tiles_per_program(monkeypatch):
    """Ch = 70 and C = 37 span several channel blocks of high and up; the 99 low pixels are 2 tiles of 64,
    both summed by one program into its grad_weight partial row."""
    monkeypatch.setattr(um, "MAX_PARTIAL_ROWS", 1)
    check_against_eager("triton", monkeypatch, (1, 37, 70, 9, 11), 2, "concat", torch.float32)


@pytest.mark.interpreter
@cpu_triton
def test_triton_layouts_give_the_same_result(monkeypatch):
    """NCHW inputs / gradients are copied to channels_last: the same bits as channels_last ones."""
    low, weight, high, grad = make_inputs((2, 5, 3, 5, 7), 2, "concat", torch.float32)
    as_nhwc = [t.contiguous(memory_format=torch.channels_last) for t in (low, high, grad)]
    nchw = run_fused("triton", monkeypatch, low, weight, high, grad, 2, "concat")
    nhwc = run_fused("triton", monkeypatch, as_nhwc[0], weight, as_nhwc[1], as_nhwc[2], 2, "concat")
    for a, b in zip(nchw, nhwc):
        assert torch.equal(a, b)


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", [pytest.param("triton", marks=cpu_triton), EXTENSION])
def test_weight_gradient_takes_the_weights_layout(impl, monkeypatch):
    """A channels_last (C, 1, 2f, 2f) weight (a model moved to channels_last) gets its gradient in that layout,
    as autograd's layout contract asks (DistributedDataParallel's buckets warn and copy otherwise); a contiguous
    weight keeps a contiguous one. The values are those of the contiguous weight."""
    low, weight, high, grad = make_inputs((2, 5, 3, 3, 4), 2, "add", torch.float32)
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        w = weight.detach().to(memory_format=layout).requires_grad_(True)  # channels_last: (k*k, 1, k, 1)
        assert layout == torch.contiguous_format or w.stride() != weight.stride()
        with fused_backend(impl, monkeypatch):
            (grad_weight,) = torch.autograd.grad(upsample_merge(low, w, high, 2, "add"), [w], grad)
        assert grad_weight.stride() == w.stride(), (layout, grad_weight.stride(), w.stride())
        grads.append(grad_weight)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.interpreter
@cpu_triton
def test_only_high_needs_grad(monkeypatch):
    """grad_high alone: the backward kernels do not run (their op would fail here) and grad_high is exact."""
    low, weight, high, grad = make_inputs((2, 5, 3, 3, 4), 2, "concat", torch.float32)
    high.requires_grad_(True)

    def refuse(*args, **kwargs):
        raise AssertionError("the backward kernels ran although neither low nor weight needs a gradient")

    monkeypatch.setattr(um, "upsample_merge_bwd", refuse)  # the torch.compile path
    monkeypatch.setattr(um, "_saved_input_backward", refuse)  # the eager path
    with fused_backend("triton", monkeypatch):
        out = upsample_merge(low, weight, high, 2, "concat")
        (grad_high,) = torch.autograd.grad(out, [high], grad)
    assert torch.equal(grad_high, grad[:, :3])


@pytest.mark.interpreter
@cpu_triton
@pytest.mark.parametrize("impl", ["triton", EXTENSION])
def test_empty_batch(impl, monkeypatch):
    low, weight, high, grad = make_inputs((0, 5, 3, 3, 4), 2, "concat", torch.float32)
    out, grad_low, grad_weight, grad_high = run_fused(impl, monkeypatch, low, weight, high, grad, 2, "concat")
    assert out.shape == (0, 8, 6, 8) and grad_low.shape == low.shape and grad_high.shape == high.shape
    assert torch.equal(grad_weight, torch.zeros_like(weight))


@pytest.mark.interpreter
@cpu_triton
@pytest.mark.parametrize("impl", ["triton", EXTENSION])
def test_opcheck(impl):
    low, weight, high, grad = make_inputs((1, 3, 2, 2, 3), 2, "concat", torch.float32)
    leaves = [t.requires_grad_(True) for t in (low, weight, high)]
    torch.library.opcheck(torch.ops.dla_fast.upsample_merge_fwd.default, (*leaves, 2, True, impl))
    torch.library.opcheck(torch.ops.dla_fast.upsample_merge_bwd.default,
                          (grad.contiguous(memory_format=torch.channels_last), 2, low.detach(), weight.detach(), 2,
                           impl))


@pytest.mark.interpreter
@cpu_triton
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_compile_fullgraph(impl):
    """torch.compile(fullgraph=True) traces through the op (fake kernel, autograd), forward and backward.

    aot_eager keeps this cheap on the CPU (inductor's first CPU compile takes ~45 s here); the GPU test below
    uses inductor.
    """
    low, weight, high, grad = make_inputs((1, 3, 2, 2, 3), 2, "concat", torch.float32)

    def model(low, weight, high, factor, mode):
        return torch.relu(upsample_merge(low, weight, high, factor, mode)) * 2

    torch._dynamo.reset()
    with dla_fast.use_backend(impl):
        compiled = forward_backward(torch.compile(model, fullgraph=True, backend="aot_eager"), low, weight, high,
                                    grad, 2, "concat")
        expected = forward_backward(model, low, weight, high, grad, 2, "concat")
    for got, ref in zip(compiled, expected):
        assert_close(got, ref, 1e-6)


# ---------------------------------------------------------------------------------------------------------
# The extension's C++ kernels on CPU tensors (backend 'cuda' runs torch.ops.dla_fast_C for CPU tensors too).
# ---------------------------------------------------------------------------------------------------------

@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factor", (2, 4, 6, 8))
def test_extension_cpu_matches_eager(factor, mode, dtype, monkeypatch):
    check_against_eager("cuda", monkeypatch, (2, 37, 19, 5, 7), factor, mode, dtype)


@needs_extension
def test_extension_cpu_grad_weight_is_deterministic_whatever_the_thread_count(monkeypatch):
    low, weight, high, grad = make_inputs((2, 21, 3, 9, 11), 4, "add", torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2, 1):
            torch.set_num_threads(n_threads)
            results.append(run_fused("cuda", monkeypatch, low, weight, high, grad, 4, "add"))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_extension
def test_extension_checks_its_arguments():
    import dla_fast._C  # noqa: F401

    ops = torch.ops.dla_fast_C
    low, weight, high, grad = (t.contiguous(memory_format=torch.channels_last)
                               for t in make_inputs((2, 5, 3, 3, 4), 2, "add", torch.float32))
    weight = weight.contiguous()

    def nhwc(t):
        return t.contiguous(memory_format=torch.channels_last)

    with pytest.raises(RuntimeError, match="low must be channels_last"):
        ops.upsample_merge_forward(low.contiguous(), weight, high, 2, False)
    with pytest.raises(RuntimeError, match="exactly factor x low"):
        ops.upsample_merge_forward(low, weight, nhwc(high[:, :, :5]), 2, False)
    with pytest.raises(RuntimeError, match="channels of low"):
        ops.upsample_merge_forward(low, weight, nhwc(high[:, :4]), 2, False)
    with pytest.raises(RuntimeError, match=r"\(C, 1, 2f, 2f\)"):
        ops.upsample_merge_forward(low, weight[:, :, :2, :2].contiguous(), high, 2, False)
    with pytest.raises(RuntimeError, match="weight dtype"):
        ops.upsample_merge_forward(low, weight.half(), high, 2, False)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.upsample_merge_forward(low.double(), weight.double(), high.double(), 2, False)
    with pytest.raises(RuntimeError, match="even integer"):
        ops.upsample_merge_forward(low, weight, high, 3, False)
    with pytest.raises(RuntimeError, match="outside grad_out"):
        ops.upsample_merge_backward(grad, 1, low, weight, 2)


# ---------------------------------------------------------------------------------------------------------
# GPU: Triton and CUDA kernels, fp32 / fp16 / bf16, vectorised (C % 8 == 0) and scalar channel counts.
# ---------------------------------------------------------------------------------------------------------

def gpu_impls():
    return ["triton", EXTENSION]


@pytest.mark.cuda
@pytest.mark.parametrize("channels", [(64, 32), (37, 19)], ids=["vectorized", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("impl", gpu_impls())
def test_gpu_matches_eager(impl, factor, mode, dtype, channels, monkeypatch):
    c, ch = channels
    check_against_eager(impl, monkeypatch, (2, c, ch, 13, 9), factor, mode, dtype, GPU,
                        channels_last=channels == (64, 32))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", gpu_impls())
def test_gpu_large_batch_groups_tiles(impl, dtype, monkeypatch):
    """73,728 low pixels: more than 1024 pixel tiles, so each partial row sums several tiles."""
    check_against_eager(impl, monkeypatch, (2, 64, 64, 192, 192), 2, "concat", dtype, GPU, channels_last=True)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", gpu_impls())
def test_gpu_grad_weight_is_deterministic(impl, monkeypatch):
    low, weight, high, grad = make_inputs((4, 64, 64, 64, 64), 4, "add", torch.bfloat16, GPU)
    first = run_fused(impl, monkeypatch, low, weight, high, grad, 4, "add")
    second = run_fused(impl, monkeypatch, low, weight, high, grad, 4, "add")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["torch"] + gpu_impls())
def test_gpu_compile_fullgraph_inductor(impl):
    low, weight, high, grad = make_inputs((2, 32, 16, 8, 12), 2, "concat", torch.float32, GPU)

    def model(low, weight, high, factor, mode):
        return torch.relu(upsample_merge(low, weight, high, factor, mode)) * 2

    torch._dynamo.reset()
    with dla_fast.use_backend(impl):
        compiled = forward_backward(torch.compile(model, fullgraph=True), low, weight, high, grad, 2, "concat")
        expected = forward_backward(model, low, weight, high, grad, 2, "concat")
    for got, ref in zip(compiled, expected):
        assert_close(got, ref, 1e-5)
