"""dla_fast.ops.deform_conv equals torchvision.ops.deform_conv2d (outputs and every gradient), and its fused-block
building blocks (offset-mask mode, scale/shift/ReLU epilogue, batch statistics) equal eager compositions."""
import pytest
import torch

import dla_fast
from dla_fast.ops.deform_conv import (deform_conv2d, deform_conv2d_backward, deform_conv2d_bwd, deform_conv2d_forward,
                                      deform_conv2d_fwd, launch)

from helpers import LaunchCounter, assert_same_non_finite, poisoned_allocations, rel_err

torchvision = pytest.importorskip("torchvision")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_BACKEND = "triton"
GRAD_NAMES = ("input", "offset", "weight", "bias", "mask")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """In the interpreter: tiles smaller than the test shapes, so that several row tiles, channel chunks and
    Cout tiles (with tails) run. On the GPU the real tile choices are tested."""
    if DEVICE == "cpu":
        monkeypatch.setattr(launch, "TILE_OVERRIDES", {"fwd": (32, 16, 16), "grad_sample": (32, 16, 16),
                                                       "grad_weight": (16, 16, 32)})


def _output_size(size, k, stride, padding, dilation):
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _make(b, cin, h, w, cout, k, stride, padding, dilation, groups, with_mask, dtype=torch.float32,
          channels_last=False):
    """Random inputs: offsets of several pixels (many samples fall outside the image), a third of them exactly
    on grid points (integer offsets), the rest in between."""
    ho, wo = _output_size(h, k, stride, padding, dilation), _output_size(w, k, stride, padding, dilation)
    x = torch.randn(b, cin, h, w, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    offset = torch.randn(b, 2 * groups * k * k, ho, wo, device=DEVICE) * 3
    on_grid = torch.rand(offset.shape, device=DEVICE) < 1 / 3
    offset = torch.where(on_grid, offset.round(), offset)
    mask = torch.rand(b, groups * k * k, ho, wo, device=DEVICE) if with_mask else None
    weight = torch.randn(cout, cin, k, k, device=DEVICE) / (cin * k * k) ** 0.5
    bias = torch.randn(cout, device=DEVICE)
    tensors = dict(input=x, offset=offset, weight=weight, bias=bias, mask=mask)
    return {name: None if t is None else t.to(dtype) for name, t in tensors.items()}


def _run(fn, tensors, conv, grad_out):
    """Output and gradients of fn(input, offset, weight, bias, stride, padding, dilation, mask) for grad_out."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in tensors.items() if t is not None}
    out = fn(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], *conv, mask=leaves.get("mask"))
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    return out, dict(zip(leaves, grads))


def _torchvision(tensors, conv, grad_out, dtype):
    return _run(torchvision.ops.deform_conv2d, {n: None if t is None else t.to(dtype) for n, t in tensors.items()},
                conv, grad_out)


CASES = {
    # b, cin, h, w, cout, k, stride, padding, dilation, offset groups, mask, channels_last
    "3x3-mask-nchw": (1, 5, 7, 9, 19, 3, 1, 1, 1, 1, True, False),
    "3x3-stride2-dil2-groups2-channels_last": (2, 6, 9, 7, 5, 3, 2, 2, 2, 2, True, True),
    "1x1-nomask": (1, 18, 5, 7, 17, 1, 1, 0, 1, 1, False, False),
    "3x3-nopad-groups2-nomask": (1, 34, 7, 5, 6, 3, 1, 0, 1, 2, False, True),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_torchvision(case, monkeypatch):
    """Output within 1e-5 relative; every gradient within 2x torchvision-fp32's own error against fp64
    torchvision; the Triton kernels really ran (forward, grad-sample and grad-weight launches)."""
    *shape, with_mask, channels_last = CASES[case]
    b, cin, h, w, cout, k, stride, padding, dilation, groups = shape
    tensors = _make(b, cin, h, w, cout, k, stride, padding, dilation, groups, with_mask, channels_last=channels_last)
    conv = (stride, padding, dilation)
    ho, wo = tensors["offset"].shape[-2:]
    grad_out = torch.randn(b, cout, ho, wo, device=DEVICE)
    exact_out, exact_grads = _torchvision(tensors, conv, grad_out, torch.float64)
    tv_out, tv_grads = _torchvision(tensors, conv, grad_out, torch.float32)
    counter = LaunchCounter(monkeypatch)
    with dla_fast.use_backend(KERNEL_BACKEND), poisoned_allocations():
        out, grads = _run(deform_conv2d, tensors, conv, grad_out)
    assert {"deform_conv_fwd_kernel", "deform_conv_grad_sample_kernel",
            "deform_conv_grad_weight_kernel"} <= set(counter.names)
    assert out.dtype == torch.float32
    assert rel_err(out, exact_out) < 1e-5
    for name, exact in exact_grads.items():
        allowed = 2 * rel_err(tv_grads[name], exact)
        assert rel_err(grads[name], exact) <= allowed, f"grad of {name}"


@pytest.mark.interpreter
def test_fp16_within_twice_the_rounded_fp32_error(monkeypatch):
    """fp16: output and gradients within 2x the error of the same computation done in fp32 (torchvision) and
    rounded to fp16, both measured against fp64."""
    tensors = _make(1, 20, 7, 9, 18, 3, 1, 1, 1, 2, True, dtype=torch.float16, channels_last=True)
    conv = (1, 1, 1)
    grad_out = torch.randn(1, 18, 7, 9, device=DEVICE).half()
    exact_out, exact_grads = _torchvision(tensors, conv, grad_out, torch.float64)
    tv_out, tv_grads = _torchvision(tensors, conv, grad_out, torch.float32)
    counter = LaunchCounter(monkeypatch)
    with dla_fast.use_backend(KERNEL_BACKEND), poisoned_allocations():
        out, grads = _run(deform_conv2d, tensors, conv, grad_out)
    assert "deform_conv_fwd_kernel" in counter.names
    assert out.dtype == torch.float16
    assert rel_err(out, exact_out) <= 2 * rel_err(tv_out.half(), exact_out)
    for name, exact in exact_grads.items():
        assert grads[name].dtype == torch.float16
        assert rel_err(grads[name], exact) <= 2 * rel_err(tv_grads[name].half(), exact), f"grad of {name}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_at_centernet_shapes(dtype):
    """On the GPU with the real tiles, a CenterNet DCN layer's shape (64 -> 64 channels, 3x3, offsets of
    several pixels): output and gradients within 2x torchvision-fp32's error rounded to the dtype."""
    tensors = _make(2, 64, 33, 31, 64, 3, 1, 1, 1, 1, True, dtype=dtype, channels_last=True)
    conv = (1, 1, 1)
    grad_out = torch.randn(2, 64, 33, 31, device=DEVICE).to(dtype)
    exact_out, exact_grads = _torchvision(tensors, conv, grad_out, torch.float64)
    tv_out, tv_grads = _torchvision(tensors, conv, grad_out, torch.float32)
    with dla_fast.use_backend(KERNEL_BACKEND):
        out, grads = _run(deform_conv2d, tensors, conv, grad_out)
    assert rel_err(out, exact_out) <= 2 * rel_err(tv_out.to(dtype), exact_out)
    for name, exact in exact_grads.items():
        assert rel_err(grads[name], exact) <= 2 * rel_err(tv_grads[name].to(dtype), exact), f"grad of {name}"


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", ["torch", KERNEL_BACKEND])
def test_empty_batch(impl):
    tensors = _make(0, 5, 6, 6, 4, 3, 1, 1, 1, 1, True)
    grad_out = torch.randn(0, 4, 6, 6, device=DEVICE)
    with dla_fast.use_backend(impl):
        out, grads = _run(deform_conv2d, tensors, (1, 1, 1), grad_out)
    assert out.shape == (0, 4, 6, 6)
    for name, g in grads.items():
        assert g.shape == tensors[name].shape and not g.abs().sum(), name


@pytest.mark.interpreter
def test_input_gradient_follows_deterministic_algorithms_mode():
    """The input gradient is summed by atomics (not deterministic on a GPU): under
    torch.use_deterministic_algorithms(True) asking for it raises as PyTorch's own nondeterministic kernels do
    (warn_only=True: a warning); the other gradients (no atomics) still run."""
    x, om, weight, bias = _offset_mask_case(b=1, cin=3, h=4, w=5, cout=4)
    x.requires_grad_(True)
    om.requires_grad_(True)
    offset, mask = om[:, :18].detach(), torch.sigmoid(om[:, 18:]).detach()
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with dla_fast.use_backend(KERNEL_BACKEND):
            torch.use_deterministic_algorithms(True)
            with pytest.raises(RuntimeError, match="deform_conv2d backward.*deterministic"):
                deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask).sum().backward()
            offset.requires_grad_(True)
            deform_conv2d(x.detach(), offset, weight, bias, 1, 1, 1, mask).sum().backward()
            assert offset.grad is not None
            torch.use_deterministic_algorithms(True, warn_only=True)
            with pytest.warns(UserWarning, match="deform_conv2d backward"):
                deform_conv2d(x, offset.detach(), weight, bias, 1, 1, 1, mask).sum().backward()
            assert x.grad is not None
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def _offset_mask_case(b=2, cin=7, h=6, w=5, cout=9, groups=1):
    """CenterNet's DCN layer inputs: om from conv_offset_mask, [B, 3*G*9, Ho, Wo] (3x3, stride 1, pad 1)."""
    x = torch.randn(b, cin, h, w, device=DEVICE)
    om = torch.randn(b, 3 * groups * 9, h, w, device=DEVICE) * 2
    weight = torch.randn(cout, cin, 3, 3, device=DEVICE) / (cin * 9) ** 0.5
    bias = torch.randn(cout, device=DEVICE)
    return x, om, weight, bias


def _centernet_eager(x, om, weight, bias, dtype=torch.float64):
    """CenterNet's DCN: o1, o2, m = chunk(om, 3); offset = cat(o1, o2); mask = sigmoid(m); torchvision."""
    o1, o2, m = torch.chunk(om.to(dtype), 3, dim=1)
    return torchvision.ops.deform_conv2d(x.to(dtype), torch.cat((o1, o2), 1), weight.to(dtype), bias.to(dtype),
                                         1, 1, 1, torch.sigmoid(m))


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", ["torch", KERNEL_BACKEND])
def test_offset_mask_epilogues_and_statistics(impl, monkeypatch):
    """deform_conv2d_forward: offset_mask mode, the plain output with batch statistics, and the inference
    epilogue relu(y*scale + shift) (NaN kept by the ReLU)."""
    x, om, weight, bias = _offset_mask_case(groups=2, cin=8)
    y_exact = _centernet_eager(x, om, weight, bias)
    var_exact, mean_exact = torch.var_mean(y_exact, dim=(0, 2, 3), correction=0)
    scale = torch.rand(9, device=DEVICE) + 0.5
    shift = torch.randn(9, device=DEVICE)
    scale[3] = float("nan")
    z_exact = torch.relu(y_exact * scale.double()[None, :, None, None] + shift.double()[None, :, None, None])
    counter = LaunchCounter(monkeypatch)
    with dla_fast.use_backend(impl), poisoned_allocations():
        y, mean, var = deform_conv2d_forward(x, weight, bias, 1, 1, 1, offset_mask=om, stats=True)
        z, no_mean, no_var = deform_conv2d_forward(x, weight, bias, 1, 1, 1, offset_mask=om, scale=scale,
                                                   shift=shift, relu=True)
    if impl == KERNEL_BACKEND:
        assert counter.names.count("deform_conv_fwd_kernel") == 2 and "aggregate_stats_merge_kernel" in counter.names
    assert rel_err(y, y_exact) < 1e-5
    assert rel_err(mean, mean_exact) < 1e-5 and rel_err(var, var_exact) < 1e-5
    assert no_mean.numel() == 0 and no_var.numel() == 0
    assert z[:, 3].isnan().all()
    keep = [c for c in range(9) if c != 3]
    assert rel_err(z[:, keep], z_exact[:, keep]) < 1e-5


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", ["torch", KERNEL_BACKEND])
def test_backward_entry_with_offset_mask(impl, monkeypatch):
    """deform_conv2d_backward(offset_mask=om) returns dL/d(om) with the sigmoid derivative folded in, and the
    gradients of input, weight and bias; unrequested gradients are None."""
    x, om, weight, bias = _offset_mask_case()
    grad_out = torch.randn(2, 9, 6, 5, device=DEVICE)
    leaves = [t.double().requires_grad_() for t in (x, om, weight, bias)]
    exact = torch.autograd.grad(_centernet_eager(*leaves), leaves, grad_out.double())
    counter = LaunchCounter(monkeypatch)
    with dla_fast.use_backend(impl), poisoned_allocations():
        grads = deform_conv2d_backward(grad_out, x, weight, 1, 1, 1, offset_mask=om)
        partial = deform_conv2d_backward(grad_out, x, weight, 1, 1, 1, offset_mask=om,
                                         needs_input_grad=(False, True, False, False))
    if impl == KERNEL_BACKEND:
        assert counter.names.count("deform_conv_grad_sample_kernel") == 2
    grad_x, grad_om, grad_mask, grad_w, grad_b = grads
    assert grad_mask is None
    for name, got, want in zip(("input", "offset_mask", "weight", "bias"), (grad_x, grad_om, grad_w, grad_b), exact):
        assert rel_err(got, want) < 1e-5, f"grad of {name}"
    assert partial[0] is None and partial[2] is None and partial[3] is None and partial[4] is None
    assert rel_err(partial[1], exact[1]) < 1e-5


def _adversarial(case, dtype):
    """(tensors, conv) with non-finite values or samples exactly on the range boundary. One input channel group
    of 2 channels, 3 output channels, 4x6 image (W even: torchvision turns a NaN y offset into the row index
    INT_MIN + 1, and INT_MIN * W wraps to 0 for an even W, so its read stays in the image; a NaN x offset makes
    it read outside the allocation, so only y offsets are NaN here), padding 1."""
    g = torch.Generator().manual_seed(7)
    x = torch.rand(1, 2, 4, 6, generator=g) + 0.5
    weight = torch.rand(3, 2, 3, 3, generator=g) + 0.1  # positive: an Inf sample stays Inf through the sum
    offset = (torch.rand(1, 18, 4, 6, generator=g) * 4 - 2).round()  # integer: corners at weight 0 and y = -1
    mask = torch.rand(1, 9, 4, 6, generator=g) + 0.5
    if case == "nan-pixel-0-0":
        x[0, 0, 0, 0] = float("nan")
    elif case == "inf-pixel-0-0-zero-offsets":
        x[0, 1, 0, 0] = float("inf")
        offset.zero_()
    elif case == "inf-and-nan-pixels":
        x[0, 0, 0, 0], x[0, 1, 3, 5], x[0, 0, 2, 3] = float("inf"), float("-inf"), float("nan")
    elif case == "row-0-nan-samples-at-y-minus-1":
        x[0, :, 0, :] = float("nan")
        tap_row = torch.arange(9).div(3, rounding_mode="floor")
        out_row = torch.arange(4)
        offset[0, 0::2] = -(tap_row[:, None, None] + out_row[None, :, None]).float()  # y = -1 for every sample
        offset[:, 1::2] = torch.rand(1, 9, 4, 6, generator=g) * 6 - 1
    elif case == "non-finite-offsets-and-mask":
        offset = offset + torch.rand(offset.shape, generator=g) - 0.5
        offset[0, 0, 1, 1] = float("nan")
        offset[0, 2, 2, 3] = float("nan")
        offset[0, 4, 0, 0] = float("inf")
        offset[0, 5, 3, 2] = float("-inf")
        offset[0, 7, 2, 2] = float("inf")
        mask[0, 1, 3, 3] = float("nan")
        mask[0, 2, 0, 0] = float("inf")  # times the 0 of the infinite offset's sample: NaN
        mask[0, 4, 1, 4] = float("inf")
    conv = (1, 1, 1)
    tensors = dict(input=x, offset=offset, weight=weight, bias=torch.randn(3, generator=g), mask=mask)
    return {n: t.to(dtype) for n, t in tensors.items()}, conv


ADVERSARIAL = ("nan-pixel-0-0", "inf-pixel-0-0-zero-offsets", "inf-and-nan-pixels",
               "row-0-nan-samples-at-y-minus-1", "non-finite-offsets-and-mask")


@pytest.mark.interpreter
@pytest.mark.parametrize("impl,dtype", [("torch", torch.float64), ("torch", torch.float32),
                                        (KERNEL_BACKEND, torch.float32)])
@pytest.mark.parametrize("case", ADVERSARIAL)
def test_non_finite_values_and_boundary_samples_follow_torchvision(case, impl, dtype):
    """NaN / +Inf / -Inf at exactly torchvision's output elements (a corner outside the image is never read, a
    sample at y <= -1 is 0, a NaN coordinate gives NaN, the mask multiplies the bilinear sum), and the
    finite elements equal."""
    tensors, conv = _adversarial(case, dtype)
    expected = torchvision.ops.deform_conv2d(tensors["input"], tensors["offset"], tensors["weight"],
                                             tensors["bias"], *conv, mask=tensors["mask"])
    # adversarial: non-finite outputs, except where every sample sits at y = -1 (0, row 0 is never read)
    assert expected.isfinite().all() == (case == "row-0-nan-samples-at-y-minus-1")
    with dla_fast.use_backend(impl), poisoned_allocations():
        out = deform_conv2d(tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"], *conv,
                            mask=tensors["mask"])
    assert_same_non_finite(out, expected, 1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", ["torch", KERNEL_BACKEND])
@pytest.mark.parametrize("case", ["nan-pixel-0-0", "row-0-nan-samples-at-y-minus-1"])
def test_gradients_with_non_finite_pixels_follow_torchvision(case, impl):
    """Every gradient has NaN / Inf at torchvision's elements when the image holds NaN / Inf (the offset
    gradient reads the corners without the range test, as torchvision's)."""
    tensors, conv = _adversarial(case, torch.float32)
    grad_out = torch.rand(1, 3, 4, 6, generator=torch.Generator().manual_seed(3)) + 0.5
    _, expected = _run(torchvision.ops.deform_conv2d, tensors, conv, grad_out)
    with dla_fast.use_backend(impl), poisoned_allocations():
        _, grads = _run(deform_conv2d, tensors, conv, grad_out)
    for name, want in expected.items():
        assert_same_non_finite(grads[name], want, 1e-4, f"grad of {name}")


@pytest.mark.parametrize("impl", ["torch", KERNEL_BACKEND])
@pytest.mark.parametrize("argument,dtype", [("offset", torch.float16), ("offset", torch.float64),
                                            ("mask", torch.float64), ("mask", torch.float16)])
def test_offset_and_mask_dtypes_must_match_the_input(impl, argument, dtype):
    """torchvision refuses an offset or mask in another dtype than the input's; so does the op, naming it."""
    tensors, conv = _adversarial("nan-pixel-0-0", torch.float32)
    tensors[argument] = tensors[argument].to(dtype)
    args = (tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"], *conv)
    with pytest.raises(RuntimeError):
        torchvision.ops.deform_conv2d(*args, mask=tensors["mask"])
    with dla_fast.use_backend(impl), pytest.raises(TypeError, match=f"{argument} has dtype {dtype}, the input"):
        deform_conv2d(*args, mask=tensors["mask"])


@pytest.mark.interpreter
def test_float64_runs_the_reference_under_auto_and_is_refused_by_triton():
    tensors = _make(1, 3, 5, 5, 2, 3, 1, 1, 1, 1, True, dtype=torch.float64)
    args = (tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"], 1, 1, 1, tensors["mask"])
    expected = torchvision.ops.deform_conv2d(*args[:4], stride=1, padding=1, dilation=1, mask=tensors["mask"])
    with dla_fast.use_backend("auto"):
        assert rel_err(deform_conv2d(*args), expected) < 1e-12
    with dla_fast.use_backend(KERNEL_BACKEND), pytest.raises(dla_fast.BackendUnavailable, match="float64"):
        deform_conv2d(*args)


def _bad_inputs():  # every call pads by 1 (output 5x5)
    t = _make(2, 4, 5, 5, 3, 3, 1, 1, 1, 1, True)
    x, off, w, b, m = t["input"], t["offset"], t["weight"], t["bias"], t["mask"]
    return {
        "offset-shape": ((x, off[:, :17], w, b), {"mask": m}, ValueError,
                         r"offset must have shape .*\(2, 18\*G, 5, 5\)"),
        "offset-size": ((x, off[..., :4], w, b), {"mask": m}, ValueError, r"offset must have shape"),
        "mask-shape": ((x, off, w, b), {"mask": m[:, :8]}, ValueError, r"mask must have shape .*\(2, 9, 5, 5\)"),
        "channel-mismatch": ((x, off, torch.randn(3, 3, 3, 3, device=DEVICE), b), {}, ValueError,
                             "does not fit the input's 4 channels"),
        "groups": ((x, off, w[:, :2], b), {}, ValueError, r"weight groups = 2 .* not supported"),
        "integer-input": ((x.long(), off, w, b), {}, TypeError, "input has dtype torch.int64"),
        "integer-offset": ((x, off.int(), w, b), {}, TypeError, "offset has dtype torch.int32"),
        "device": ((x, off.to("meta"), w, b), {}, ValueError, "offset is on meta"),
        "bias-shape": ((x, off, w, b[:2]), {}, ValueError, r"bias must have shape \(3,\)"),
        "stride": ((x, off, w, b), {"stride": 0}, ValueError, "stride must be >= 1"),
    }


@pytest.mark.parametrize("impl", ["torch", KERNEL_BACKEND])
@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_get_clear_errors(impl, case):
    args, kwargs, error, match = _bad_inputs()[case]
    with dla_fast.use_backend(impl), pytest.raises(error, match=match):
        deform_conv2d(*args, **{"padding": 1, **kwargs})


def test_building_blocks_check_their_arguments():
    x, om, weight, bias = _offset_mask_case()
    with pytest.raises(ValueError, match=r"offset_mask must have shape .*\(2, 27\*G, 6, 5\)"):
        deform_conv2d_forward(x, weight, bias, 1, 1, 1, offset_mask=om[:, :26])
    with pytest.raises(ValueError, match="exactly one of offset"):
        deform_conv2d_forward(x, weight, bias, 1, 1, 1)
    with pytest.raises(ValueError, match="scale and shift together"):
        deform_conv2d_forward(x, weight, bias, 1, 1, 1, offset_mask=om, scale=torch.ones(9))
    with pytest.raises(ValueError, match=r"grad_out must have shape \(2, 9, 6, 5\)"):
        deform_conv2d_backward(torch.randn(2, 9, 5, 5), x, weight, 1, 1, 1, offset_mask=om)
    with pytest.raises(ValueError, match="stats=True needs"):
        deform_conv2d_forward(x[:0], weight, bias, 1, 1, 1, offset_mask=om[:0], stats=True)


@pytest.mark.interpreter
def test_opcheck():
    """torch.library.opcheck: schema, fake implementations, autograd registration and dispatch agree."""
    t = _make(1, 3, 4, 5, 4, 3, 1, 1, 1, 1, True)
    leaves = {n: v.requires_grad_() for n, v in t.items()}
    fwd_args = (leaves["input"], leaves["offset"], leaves["mask"], leaves["weight"], leaves["bias"], [1, 1], [1, 1],
                [1, 1], 1, None, None, False, True)
    torch.library.opcheck(deform_conv2d_fwd, fwd_args, test_utils=("test_schema", "test_faketensor",
                                                                   "test_autograd_registration"))
    grad_out = torch.randn(1, 4, 4, 5, device=DEVICE)
    bwd_args = (grad_out, t["input"].detach(), t["offset"].detach(), t["mask"].detach(), t["weight"].detach(),
                [1, 1], [1, 1], [1, 1], 1, [True, True, True, True])
    torch.library.opcheck(deform_conv2d_bwd, bwd_args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.interpreter
def test_torch_compile_fullgraph_traces_through(monkeypatch):
    class DeformLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3) / 5)
            self.bias = torch.nn.Parameter(torch.randn(4))

        def forward(self, x, offset, mask):
            return deform_conv2d(x, offset, self.weight, self.bias, padding=1, mask=mask)

    layer = DeformLayer().to(DEVICE)
    t = _make(1, 3, 5, 4, 4, 3, 1, 1, 1, 1, True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    counter = LaunchCounter(monkeypatch)
    with dla_fast.use_backend(KERNEL_BACKEND):
        out = compiled(t["input"], t["offset"], t["mask"])
        out.backward(torch.ones_like(out))
    assert "deform_conv_fwd_kernel" in counter.names and "deform_conv_grad_weight_kernel" in counter.names
    expected = torchvision.ops.deform_conv2d(t["input"], t["offset"], layer.weight, layer.bias, padding=1,
                                             mask=t["mask"])
    assert rel_err(out, expected) < 1e-5
    grad_w = torch.autograd.grad(expected, layer.weight, torch.ones_like(expected))[0]
    assert rel_err(layer.weight.grad, grad_w) < 1e-5


@pytest.mark.interpreter
@pytest.mark.parametrize("training", [False, True])
def test_fused_dcn_block_keeps_the_non_finite_pattern(training):
    """CenterNet's DCN block fused (eval: BatchNorm folded into the deformable conv; training: batch statistics)
    with NaN and +Inf pixels: the NaN / Inf pattern of the block's eager reference (dcn_block_reference, whose
    deformable conv is the eager reference tested against torchvision above; torchvision itself cannot run it:
    the offset-mask conv turns a NaN pixel into NaN x offsets, which make it read outside its allocation)."""
    import copy

    from dla_fast.models.centernet import IDAConv
    from dla_fast.nn import FusedDCNBlock
    from dla_fast.ops.deform_conv.block import dcn_block_reference

    from helpers import randomize_bn

    torch.manual_seed(0)
    original = randomize_bn(IDAConv(2, 3, deformable=True), torch.Generator().manual_seed(1)).train(training)
    with torch.no_grad():
        original.conv.conv_offset_mask.weight.normal_(0.0, 0.4)
        original.conv.conv_offset_mask.bias.normal_(0.0, 1.0)
    fused = FusedDCNBlock(copy.deepcopy(original)).train(training)
    x = torch.rand(2, 2, 5, 6) + 0.5
    x[0, 0, 0, 0] = float("nan")
    x[1, 1, 4, 5] = float("inf")
    conv, bn = original.conv, original.actf[0]
    with torch.no_grad():
        expected = dcn_block_reference(x, conv.conv_offset_mask(x), conv.weight, conv.bias, bn.weight, bn.bias,
                                       bn.running_mean.clone(), bn.running_var.clone(), training=training,
                                       eps=bn.eps, stride=(1, 1), padding=(1, 1), dilation=(1, 1))
        with dla_fast.use_backend(KERNEL_BACKEND), poisoned_allocations():
            out = fused(x)
    assert not expected.isfinite().all()
    assert_same_non_finite(out, expected, 1e-5)
