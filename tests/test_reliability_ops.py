"""Reliability of the fused ops (issue 13): NaN/Inf propagate as in eager, one argument check per op with the
same errors on every backend, fp64 runs the eager reference under 'auto', and dla_fast works without Triton.

Backends on CPU tensors: 'triton' (the Triton interpreter) and 'cuda' (the C++ CPU kernels of dla_fast._C,
skipped when it is not built); the reference is eager PyTorch written here (F.batch_norm, F.conv2d,
F.conv_transpose2d, relu). Non-finite comparisons check that NaN, +Inf and -Inf sit at exactly the positions
where eager has them, and that the finite values agree (fp32: 1e-5 outputs, 1e-4 gradients).
"""
import copy
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import dla_fast
from dla_fast import backend
from dla_fast.ops.aggregate import aggregate
from dla_fast.ops.batchnorm_act import batchnorm_act
from dla_fast.ops.upsample_merge import upsample_merge

from helpers import randomize_bn, rel_err

# numpy (the Triton interpreter) warns about the NaN / Inf these tests feed in on purpose
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")
EXTENSION_BUILT, EXTENSION_DETAIL = backend.extension_status()
needs_extension = pytest.mark.skipif(not EXTENSION_BUILT, reason=f"dla_fast._C is {EXTENSION_DETAIL}")
needs_interpreter = pytest.mark.skipif(
    not backend.triton_interpreter_enabled(),
    reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (conftest sets it only on machines without a GPU)")
KERNEL_IMPLS = [
    pytest.param("triton", marks=[pytest.mark.interpreter, needs_interpreter]),
    pytest.param("cuda", id="cpp", marks=[needs_extension, pytest.mark.interpreter, needs_interpreter]),
]
ALL_IMPLS = [pytest.param("torch")] + KERNEL_IMPLS
POISONS = [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf")]


class TritonLaunches:
    """Counts interpreted Triton launches (proves the kernels, not an eager fallback, ran)."""

    def __init__(self, monkeypatch):
        from triton.runtime.interpreter import InterpretedFunction
        self.count = 0
        original = InterpretedFunction.run

        def counting_run(fn, *args, **kwargs):
            self.count += 1
            return original(fn, *args, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", counting_run)


def assert_same_values(out, ref, what, tol=1e-5):
    """NaN / +Inf / -Inf exactly where ref has them; the finite values within `tol` relative error."""
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    for name, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        got, want = test(out), test(ref)
        assert torch.equal(got, want), (f"{what}: {name} at {int(got.sum())} positions, eager has "
                                        f"{int(want.sum())} ({int((got != want).sum())} differ)")
    finite = torch.isfinite(ref)
    if finite.any():
        err = rel_err(out[finite], ref[finite])
        assert err < tol, f"{what}: finite values differ, relative error {err:.3g}"


def poison(t, value, index=0):
    """A copy of t with one element (flat `index`) set to value."""
    t = t.detach().clone()
    t.view(-1)[index % t.numel()] = value
    return t


# ----------------------------------------------------------------------------------------------------------
# NaN / Inf propagation, forward and backward, eval and training, every input
# ----------------------------------------------------------------------------------------------------------

def _bn_inputs():
    c = 5
    return dict(x=torch.randn(2, c, 3, 3), weight=torch.rand(c) + 0.5, bias=torch.randn(c),
                running_mean=torch.randn(c) * 0.2, running_var=torch.rand(c) + 0.5,
                residual=torch.randn(2, c, 3, 3))


class _EagerBatchNorm(torch.autograd.Function):
    """Eager PyTorch's BatchNorm as eager CUDA groups it: statistics and the backward from aten's own
    native_batch_norm / native_batch_norm_backward, the output as ((x - mean) * invstd) * weight + bias (eager
    CUDA's kernel, and dla_fast's). Eager CPU folds the output into x * a + (bias - mean * a), which turns an Inf
    weight or mean into inf - inf = NaN at some positions; with NaN poisons both groupings agree."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training):
        _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var,
                                                                      training, 0.1, 1e-5)
        mean, invstd = (save_mean, save_invstd) if training else (running_mean, torch.rsqrt(running_var + 1e-5))
        shape = (1, -1, 1, 1)
        ctx.save_for_backward(x, weight, running_mean, running_var, save_mean, save_invstd)
        ctx.training = training
        return ((x - mean.view(shape)) * invstd.view(shape)) * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, grad):
        x, weight, running_mean, running_var, save_mean, save_invstd = ctx.saved_tensors
        grads = torch.ops.aten.native_batch_norm_backward(grad, x, weight, running_mean, running_var, save_mean,
                                                          save_invstd, ctx.training, 1e-5, [True, True, True])
        return (*grads, None, None, None)


def _affine_batch_norm(x, running_mean, running_var, weight, bias, training):
    return _EagerBatchNorm.apply(x, weight, bias, running_mean, running_var, training)


def _bn_eager(x, weight, bias, running_mean, running_var, residual, training):
    return F.relu(_affine_batch_norm(x, running_mean, running_var, weight, bias, training) + residual)


def _bn_fused(x, weight, bias, running_mean, running_var, residual, training):
    return batchnorm_act(x, weight, bias, running_mean, running_var, None, training, 0.1, 1e-5, residual, True)


def _aggregate_inputs():
    cout = 6
    return dict(child0=torch.randn(2, cout, 3, 3), child1=torch.randn(2, 3, 3, 3),
                weight=torch.randn(cout, cout + 3, 1, 1) * 0.3, bn_weight=torch.rand(cout) + 0.5,
                bn_bias=torch.randn(cout), running_mean=torch.randn(cout) * 0.2, running_var=torch.rand(cout) + 0.5)


def _aggregate_eager(child0, child1, weight, bn_weight, bn_bias, running_mean, running_var, training):
    y = _affine_batch_norm(F.conv2d(torch.cat([child0, child1], 1), weight), running_mean, running_var, bn_weight,
                           bn_bias, training)
    return F.relu(y + child0)


def _aggregate_fused(child0, child1, weight, bn_weight, bn_bias, running_mean, running_var, training):
    return aggregate([child0, child1], weight, bn_weight, bn_bias, running_mean, running_var, None, training,
                     0.1, 1e-5, True)


def _check_propagation(make_inputs, eager, fused, impl, training, site, value, buffers, monkeypatch, index=7):
    """One poisoned element in input `site` ('grad' poisons the output gradient): the fused op under `impl` gives
    the eager forward, every gradient and the updated running statistics, non-finite positions included."""
    inputs = make_inputs()
    grad_out = None
    if site != "grad":
        inputs[site] = poison(inputs[site], value, index)
    results = []
    for fn in (eager, fused):
        args = {k: v.clone().requires_grad_(k not in buffers) for k, v in inputs.items()}
        launches = TritonLaunches(monkeypatch) if fn is fused and impl == "triton" else None
        with backend.use_backend(impl if fn is fused else "torch"):
            out = fn(**args, training=training)
        if grad_out is None:
            grad_out = torch.randn_like(out)
            if site == "grad":
                grad_out = poison(grad_out, value, index=11)
        out.backward(grad_out)
        if launches is not None:
            assert launches.count > 0, "no Triton kernel ran"
        results.append((out, {k: v.grad for k, v in args.items() if k not in buffers},
                        {k: args[k] for k in buffers}))
    (out, grads, stats), (ref, ref_grads, ref_stats) = results[1], results[0]
    assert_same_values(out, ref, f"{site}={value}: output")
    for name in ref_grads:
        assert_same_values(grads[name], ref_grads[name], f"{site}={value}: grad of {name}", tol=1e-4)
    for name in buffers:
        if training and value in (float("inf"), float("-inf")) and site in ("x", "child0", "child1"):
            # Known difference: the batch mean of values with an Inf is +-Inf in eager (a plain sum) and NaN in
            # the kernels (Welford/Chan merging: inf - inf); the variance, the output and the gradients are NaN
            # in both. Both running statistics are non-finite at the same channels.
            assert torch.equal(torch.isfinite(stats[name]), torch.isfinite(ref_stats[name])), name
            continue
        assert_same_values(stats[name], ref_stats[name], f"{site}={value}: {name} after the step")


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("value", POISONS)
@pytest.mark.parametrize("site", ["x", "weight", "bias", "running_mean", "running_var", "residual", "grad"])
def test_batchnorm_act_propagates_nonfinite_like_eager(impl, training, value, site, monkeypatch):
    _check_propagation(_bn_inputs, _bn_eager, _bn_fused, impl, training, site, value,
                       ("running_mean", "running_var"), monkeypatch)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("value", POISONS)
@pytest.mark.parametrize("site", ["child0", "child1", "weight", "bn_weight", "bn_bias", "running_mean",
                                  "running_var", "grad"])
def test_aggregate_propagates_nonfinite_like_eager(impl, training, value, site, monkeypatch):
    _check_propagation(_aggregate_inputs, _aggregate_eager, _aggregate_fused, impl, training, site, value,
                       ("running_mean", "running_var"), monkeypatch)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("value", POISONS)
@pytest.mark.parametrize("site", ["low", "weight", "high", "grad"])
@pytest.mark.parametrize("mode", ["add", "concat"])
def test_upsample_merge_propagates_nonfinite_like_eager(impl, value, site, mode, monkeypatch):
    """No BatchNorm here, so no eval/training difference. Poisoned: weight element 7 (tap (1, 3), which the
    right-border pixels apply outside the output: eager and the kernels skip it there, no 0 * NaN), low element
    5 (channel 0, interior pixel (1, 1)). A border pixel of low is not poisoned: for grad_weight eager CPU adds
    the padded zeros' products (0 * NaN = NaN at taps that never touched the pixel), the kernels skip them."""
    def make_inputs():
        return dict(low=torch.randn(1, 3, 3, 4), weight=torch.randn(3, 1, 4, 4),
                    high=torch.randn(1, 3 if mode == "add" else 2, 6, 8))

    def eager(low, weight, high, training):
        up = F.conv_transpose2d(low, weight, stride=2, padding=1, groups=3)
        return up + high if mode == "add" else torch.cat([high, up], 1)

    def fused(low, weight, high, training):
        return upsample_merge(low, weight, high, 2, mode)

    _check_propagation(make_inputs, eager, fused, impl, False, site, value, (), monkeypatch,
                       index=5 if site == "low" else 7)


@pytest.mark.interpreter
@needs_interpreter
def test_accelerated_dla46_c_eval_keeps_one_nan_pixel(monkeypatch):
    """The issue's case: one NaN pixel into accelerate(dla46_c) in eval gives NaN logits, as eager does."""
    model = randomize_bn(dla_fast.create_model("dla46_c", num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    x[0, 1, 17, 9] = float("nan")
    with torch.no_grad():
        ref = model(x)
        fast = dla_fast.accelerate(copy.deepcopy(model))
        launches = TritonLaunches(monkeypatch)
        with dla_fast.use_backend("triton"):
            out = fast(x)
    assert launches.count > 0
    assert ref.isnan().all(), "eager spreads the NaN to every logit"
    assert_same_values(out, ref, "logits")


# ----------------------------------------------------------------------------------------------------------
# One validation per op: the same bad arguments, the same error on every backend
# ----------------------------------------------------------------------------------------------------------

def _bn_call(change):
    args = dict(x=torch.randn(2, 4, 3, 3), weight=torch.rand(4), bias=torch.randn(4), running_mean=torch.zeros(4),
                running_var=torch.ones(4), num_batches_tracked=torch.tensor(0), training=True, momentum=0.1,
                eps=1e-5)
    args.update(change)
    return lambda: batchnorm_act(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("running_mean"),
                                 args.pop("running_var"), **args)


def _aggregate_call(change):
    args = dict(children=[torch.randn(2, 4, 3, 3), torch.randn(2, 3, 3, 3)], weight=torch.randn(4, 7, 1, 1),
                bn_weight=torch.rand(4), bn_bias=torch.randn(4), running_mean=torch.zeros(4),
                running_var=torch.ones(4), num_batches_tracked=torch.tensor(0), training=True, momentum=0.1,
                eps=1e-5)
    args.update(change)
    return lambda: aggregate(**args)


BAD_ARGUMENTS = [
    # (name, error, message pattern naming the argument, changes); nn.BatchNorm2d's rules first
    ("eps=0 in training", ValueError, "eps must be positive during training, but got 0.0", dict(eps=0.0)),
    ("eps<0 in eval", ValueError, "eps must be non-negative, but got -1e-05", dict(eps=-1e-5, training=False)),
    ("eps<0 without running stats", ValueError, "eps must be positive during training",
     dict(eps=-1e-5, training=False, running_mean=None, running_var=None)),
    ("momentum=None without num_batches_tracked", ValueError, "momentum=None .* needs num_batches_tracked",
     dict(momentum=None, num_batches_tracked=None)),
    ("momentum not a number", TypeError, "momentum must be a number", dict(momentum="0.1")),
    ("one value per channel", ValueError, "Expected more than 1 value per channel", "one_value"),
    ("running_var missing", ValueError, "both running_mean and running_var", dict(running_var=None)),
    ("running_mean shape", ValueError, r"running_mean must have shape \(4,\)", dict(running_mean=torch.zeros(5))),
    ("running_var dtype", TypeError, "running_var has dtype torch.float64",
     dict(running_var=torch.ones(4, dtype=torch.float64))),
    ("weight dtype", TypeError, "weight has dtype torch.float16", dict(weight=torch.rand(4).half())),
    ("num_batches_tracked shape", ValueError, "num_batches_tracked must be a one-element tensor",
     dict(num_batches_tracked=torch.zeros(2))),
]


@pytest.mark.parametrize("op", ["batchnorm_act", "aggregate"])
@pytest.mark.parametrize("name, error, message, change", BAD_ARGUMENTS, ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_batchnorm_arguments_raise_the_same_error_on_every_backend(op, name, error, message, change):
    renames = dict(weight="bn_weight") if op == "aggregate" else {}
    if change == "one_value":
        change = (dict(x=torch.randn(1, 4, 1, 1)) if op == "batchnorm_act" else
                  dict(children=[torch.randn(1, 4, 1, 1), torch.randn(1, 3, 1, 1)]))
    change = {renames.get(k, k): v for k, v in change.items()}
    call = (_bn_call if op == "batchnorm_act" else _aggregate_call)
    impls = ["torch", "triton"] + (["cuda"] if EXTENSION_BUILT else [])
    for impl in impls:  # every backend refuses before dispatch: no interpreter needed to see the error
        with backend.use_backend(impl), pytest.raises(error, match=message):
            call(dict(change))()


def test_bad_aggregate_conv_weight_dtype_is_the_same_error_on_every_backend():
    for impl in ["torch", "triton"] + (["cuda"] if EXTENSION_BUILT else []):
        with backend.use_backend(impl), pytest.raises(TypeError, match="conv weight has dtype torch.float64"):
            _aggregate_call(dict(weight=torch.randn(4, 7, 1, 1, dtype=torch.float64)))()


@pytest.mark.parametrize("args, error, message", [
    ((torch.randn(1, 3, 2, 2), torch.randn(3, 1, 6, 6), torch.randn(1, 3, 6, 6), 3), ValueError, "factor"),
    ((torch.randn(1, 3, 2, 2), torch.randn(3, 1, 3, 3), torch.randn(1, 3, 4, 4), 2), ValueError, "weight must have"),
    ((torch.randn(1, 3, 2, 2), torch.randn(3, 1, 4, 4).double(), torch.randn(1, 3, 4, 4), 2), TypeError,
     "dtypes differ: low torch.float32, weight torch.float64"),
    ((torch.randn(1, 3, 2, 2), torch.randn(3, 1, 4, 4), torch.randn(1, 3, 4, 5), 2), ValueError, "high must be"),
], ids=["odd factor", "weight shape", "weight dtype", "high size"])
def test_bad_upsample_merge_arguments_raise_the_same_error_on_every_backend(args, error, message):
    for impl in ["torch", "triton"] + (["cuda"] if EXTENSION_BUILT else []):
        with backend.use_backend(impl), pytest.raises(error, match=message):
            upsample_merge(*args, "add")


# ----------------------------------------------------------------------------------------------------------
# fp64: eager reference under 'auto' and 'torch'; explicit kernel backends refuse naming the dtype
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_kernel_backends_refuse_float64_naming_the_dtype(impl):
    """A backend that can run here refuses fp64 naming the dtype; one that cannot (backend 'cuda' without the
    extension built) refuses with that reason first, whatever the dtype."""
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    unavailable = backend.unavailable_reason(impl, x.device)
    expected = "torch.float64" if unavailable is None else re.escape(unavailable)
    calls = [
        lambda: batchnorm_act(x, None, None, None, None, training=True),
        lambda: aggregate([x], torch.randn(4, 4, 1, 1, dtype=torch.float64), torch.rand(4, dtype=torch.float64),
                          torch.randn(4, dtype=torch.float64), training=True),
        lambda: upsample_merge(x, torch.randn(4, 1, 4, 4, dtype=torch.float64),
                               torch.randn(2, 4, 6, 6, dtype=torch.float64), 2, "add"),
    ]
    for call in calls:
        with backend.use_backend(impl), pytest.raises(dla_fast.BackendUnavailable, match=expected):
            call()


def test_auto_resolves_float64_to_the_eager_reference_on_cuda_tensors():
    """What 'auto' picks for CUDA tensors (resolve needs no GPU to answer): kernels for fp32, eager for fp64."""
    cuda = torch.device("cuda")
    with backend.use_backend("auto"):
        assert backend.resolve(cuda, "batchnorm_act", torch.float64) == "torch"
        assert backend.resolve(cuda, "aggregate", torch.float32) in ("triton", "cuda")


@pytest.mark.parametrize("name, training", [("dla46_c", True), ("dla46_cup", False), ("centernet_dla46_c", False),
                                            ("centernet_dla46_c", True)])
def test_accelerated_model_in_float64_equals_eager_float64_under_auto(name, training):
    """`.double()` after accelerate(): FusedRoot, the folded blocks and the fused IDA modules (DLA-Up's concat,
    CenterNet's add) run fp64 and give eager fp64's outputs, gradients and BatchNorm statistics."""
    kwargs = (dict(heads={"hm": 2, "wh": 2}, dcn=False) if name.startswith("centernet") else
              dict() if name.endswith("up") else dict(num_classes=5))
    model = randomize_bn(dla_fast.create_model(name, **kwargs)).train(training)
    fast = dla_fast.accelerate(copy.deepcopy(model)).double()
    model = model.double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    outputs = []
    for m in (model, fast):
        out = m(x.clone().requires_grad_())
        out = out if isinstance(out, torch.Tensor) else torch.cat([t.flatten() for t in _tensors(out)])
        out.square().sum().backward()
        outputs.append((out, [p.grad for p in m.parameters()], [b.clone() for b in m.buffers()]))
    (ref, ref_grads, ref_buffers), (out, grads, buffers) = outputs
    assert out.dtype == torch.float64
    # fp64 agreement: the same ops summed in another order, amplified by the depth in training (fp32: 1e-3+)
    tol = 1e-8 if training else 1e-10
    assert rel_err(out, ref) < tol
    assert [g is None for g in grads] == [g is None for g in ref_grads]
    assert all(rel_err(g, r) < 100 * tol for g, r in zip(grads, ref_grads) if r is not None)
    assert all(rel_err(b, r) < tol for b, r in zip(buffers, ref_buffers))


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value
    return [t for item in items for t in _tensors(item)]


# ----------------------------------------------------------------------------------------------------------
# Without Triton
# ----------------------------------------------------------------------------------------------------------

def test_dla_fast_works_without_triton(tmp_path):
    """A fresh interpreter where `import triton` fails (sys.modules entry None: importlib's own "not
    importable", which find_spec also reports as absent): import dla_fast, run an eager model, load a
    checkpoint, run a fused op with backend 'torch'; backend 'triton' raises BackendUnavailable naming triton; 'auto' runs
    CUDA tensors eagerly, warning once."""
    checkpoint = tmp_path / "dla46_c.pth"
    torch.save(dla_fast.create_model("dla46_c", num_classes=3).state_dict(), checkpoint)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["triton"] = None  # hides the installed package from every import
        import torch
        import dla_fast
        from dla_fast.ops.batchnorm_act import batchnorm_act
        assert "triton is not importable" in dla_fast.available_backends()["triton"]
        model = dla_fast.create_model("dla46_c", num_classes=3).eval()
        dla_fast.load_checkpoint(model, {str(checkpoint)!r})
        with torch.no_grad():
            assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
        x = torch.randn(2, 3, 4, 4)
        with dla_fast.use_backend("torch"):
            assert batchnorm_act(x, None, None, None, None, training=True).shape == x.shape
        try:
            with dla_fast.use_backend("triton"):
                batchnorm_act(x, None, None, None, None, training=True)
        except dla_fast.BackendUnavailable as e:
            assert "triton" in str(e) and "not importable" in str(e), e
        else:
            raise AssertionError("backend 'triton' ran without triton")
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cuda = torch.device("cuda")  # resolve() only looks at the device type: no GPU needed
            assert [dla_fast.backend.resolve(cuda, op, torch.bfloat16) for op in ("aggregate", "batchnorm_act")] \
                == ["torch", "torch"]
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "eager" in messages[0] and "triton" in messages[0], messages
        assert not any(name == "triton" or name.startswith("triton.") for name, m in sys.modules.items()
                       if m is not None), "something imported triton"
        print("ok")
    """)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(dla_fast.__file__))), timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
