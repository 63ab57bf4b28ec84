"""Host-side caches of the fused ops: a cached weight cast is reused until the weight changes, and never used
where it could go stale (autograd, inference tensors)."""
import copy

import pytest
import torch
import torch.nn as nn

import dla_fast
from dla_fast.ops import aggregate as agg
from dla_fast.ops.aggregate import launch as aggregate_launch
from dla_fast.ops.common import cached_derived

from helpers import assert_close, randomize_bn



def test_cached_derived_follows_the_version_counter():
    weight = torch.randn(6, 5, 1, 1)
    first = cached_derived(weight, "half", lambda: weight.half())
    assert cached_derived(weight, "half", lambda: weight.half()) is first
    assert cached_derived(weight, "other key", lambda: weight.double()) is not first
    with torch.no_grad():
        weight.mul_(2.0)  # an optimizer step: in place, the version counter moves
    second = cached_derived(weight, "half", lambda: weight.half())
    assert second is not first and torch.equal(second, weight.half())
    weight.data = torch.randn(6, 5, 1, 1)  # replaced storage (as .to() / load into .data do)
    assert torch.equal(cached_derived(weight, "half", lambda: weight.half()), weight.half())


def test_cached_derived_is_bypassed_where_it_could_go_stale():
    leaf = torch.randn(4, requires_grad=True)
    made = [cached_derived(leaf, "k", lambda: leaf * 2) for _ in range(2)]
    assert made[0] is not made[1] and made[0].requires_grad  # grad mode: part of the autograd graph, never cached
    weight = torch.randn(4)
    with torch.inference_mode():
        made_in_inference_mode = cached_derived(weight, "k", lambda: weight * 2)
        inference = torch.randn(4)
        assert cached_derived(inference, "k", lambda: inference + 1) is not cached_derived(inference, "k",
                                                                                               lambda: inference + 1)
    assert not made_in_inference_mode.is_inference()  # usable later by a training call (saved for backward)
    assert cached_derived(weight, "k", lambda: weight * 2) is made_in_inference_mode


@pytest.mark.interpreter
def test_aggregate_sees_in_place_weight_updates_with_a_cached_cast():
    """fp16 children with an fp32 weight (what autocast gives a root): the fp16 weight rows are cached across
    calls, and an in-place update of the weight (an optimizer step) is used by the next call."""
    children = [torch.randn(2, 6, 5, 3).half().contiguous(memory_format=torch.channels_last) for _ in range(2)]
    weight = torch.randn(7, 12, 1, 1)
    gamma, beta = torch.rand(7) + 0.5, torch.randn(7)
    mean, var = torch.randn(7) * 0.1, torch.rand(7) + 0.5

    def reference():
        x = torch.cat(children, 1).double()
        y = torch.nn.functional.conv2d(x, weight.half().double())
        return torch.relu(torch.nn.functional.batch_norm(y, mean.double(), var.double(), gamma.double(),
                                                         beta.double(), False))

    with dla_fast.use_backend("triton"), torch.no_grad():
        for step in range(2):
            out = agg.aggregate(children, weight, gamma, beta, mean, var)
            eager_error = (torch.nn.functional.relu(torch.nn.functional.batch_norm(
                torch.nn.functional.conv2d(torch.cat(children, 1), weight.half()).float(), mean, var, gamma, beta,
                False)).double() - reference()).abs().max().item()
            assert (out.double() - reference()).abs().max().item() <= 2 * eager_error, f"step {step}"
            weight.mul_(-1.5)
        assert aggregate_launch._weight_rows(weight, torch.float16) is aggregate_launch._weight_rows(weight, torch.float16)


def test_host_launch_arithmetic_equals_tritons():
    """The launchers' plain-Python cdiv / next_power_of_2 give Triton's answers (its constexpr functions cost
    ~1.8 us per host call)."""
    triton = pytest.importorskip("triton")
    from dla_fast.ops.common import cdiv, next_power_of_2
    values = [*range(0, 1100), 4095, 4096, 4097, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 2 ** 40 + 3]
    assert [next_power_of_2(n) for n in values] == [triton.next_power_of_2(n) for n in values]
    assert [cdiv(n, d) for n in values for d in (1, 3, 16, 64, 1000)] == \
        [triton.cdiv(n, d) for n in values for d in (1, 3, 16, 64, 1000)]


@pytest.mark.interpreter
def test_upsample_merge_caches_the_cast_weight_layout_until_the_weight_changes():
    """Training under autocast (fp16 activations, fp32 weight parameter): the weight's fp16 transposed layout is
    made once per weight version and reused by later calls, an in-place update (an optimizer step) is seen by
    the next call, and a bad argument after good calls still raises."""
    from dla_fast.ops import common
    from dla_fast.ops.upsample_merge import upsample_merge
    low = torch.randn(2, 5, 3, 5).half().requires_grad_()
    high = torch.randn(2, 5, 6, 10).half()
    weight = torch.randn(5, 1, 4, 4).div_(2).requires_grad_()

    def reference():
        up = torch.nn.functional.conv_transpose2d(low.double(), weight.detach().half().double(), stride=2,
                                                  padding=1, groups=5)
        return up + high.double()

    key = ("upsample_merge_weight_t", torch.float16)
    with dla_fast.use_backend("triton"):
        layouts = []
        for step in range(2):
            out = upsample_merge(low, weight, high, 2, "add")
            out.sum().backward()
            assert (out.double() - reference()).abs().max().item() < 2e-2, f"step {step}"
            layouts.append(common._DERIVED[weight][key][1])
            upsample_merge(low, weight, high, 2, "add")
            assert common._DERIVED[weight][key][1] is layouts[-1]  # the same weight version: reused
            with torch.no_grad():
                weight.mul_(-1.5)
        assert layouts[0] is not layouts[1]
        assert torch.equal(layouts[1], (weight.detach() / -1.5).half().reshape(5, 16).t())
        with pytest.raises(TypeError, match="dtypes differ"):
            upsample_merge(low, weight.detach().double(), high, 2, "add")
        with pytest.raises(TypeError, match="dtypes differ"):
            upsample_merge(low, weight, high.float(), 2, "add")


@pytest.fixture
def counted_checks(monkeypatch):
    """checks(module, name): count the calls of module.<name> (an op's argument checks), with a fresh
    validated-signature cache in that module; returns the list of calls."""
    from dla_fast.ops.common import ValidatedSignatures

    def checks(module, name):
        calls, real = [], getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
        monkeypatch.setattr(module, "_VALIDATED", ValidatedSignatures())
        return calls
    return checks


def _raises_after_checking(calls, error, match, fn):
    """fn raises `error` from the op's checks (they ran: the signature differs from the validated ones)."""
    before = len(calls)
    with pytest.raises(error, match=match):
        fn()
    assert len(calls) == before + 1


def test_aggregate_checks_run_once_per_signature(counted_checks):
    """Same signature (also with fresh tensors): checked once; any change the checks read is checked again, so a
    bad argument after good calls still raises, whatever it differs in (a shape, a dtype, eps's sign or type,
    momentum's type, the batch size, the residual's channels)."""
    from dla_fast.ops.aggregate import aggregate, op as aggregate_op
    calls = counted_checks(aggregate_op, "check_inputs")

    def args(children_shape=(2, 3, 4, 5), **changes):
        c = children_shape[1]
        given = dict(children=[torch.randn(children_shape), torch.randn(children_shape)],
                     weight=torch.randn(c, 2 * c, 1, 1), bn_weight=torch.rand(c) + 0.5, bn_bias=torch.randn(c),
                     running_mean=torch.zeros(c), running_var=torch.ones(c),
                     num_batches_tracked=torch.zeros((), dtype=torch.long), training=True, momentum=0.1, eps=1e-5,
                     residual=False)
        given.update(changes)
        return given

    with dla_fast.use_backend("torch"):
        for _ in range(3):
            aggregate(**args())
        assert len(calls) == 1
        aggregate(**args(children_shape=(2, 3, 4, 6)))
        assert len(calls) == 2
        bad = [(ValueError, "eps must be positive", dict(eps=0.0)),
               (TypeError, "eps must be a number", dict(eps=True)),
               (TypeError, "momentum must be a number", dict(momentum="0.1")),
               (ValueError, "share a dtype", dict(children=[torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5).half()])),
               (ValueError, "does not fit the children", dict(weight=torch.randn(3, 5, 1, 1))),
               (ValueError, "weight must have shape \\(3,\\)", dict(bn_weight=torch.rand(4))),
               (ValueError, "num_batches_tracked must be a one-element", dict(num_batches_tracked=torch.zeros(2))),
               (ValueError, "Expected more than 1 value", dict(children=[torch.randn(1, 3, 1, 1)] * 2)),
               (ValueError, "a residual root adds child 0", dict(residual=True, weight=torch.randn(4, 6, 1, 1),
                                                                 bn_weight=torch.rand(4), bn_bias=torch.randn(4),
                                                                 running_mean=torch.zeros(4),
                                                                 running_var=torch.ones(4)))]
        for error, match, change in bad:
            _raises_after_checking(calls, error, match, lambda: aggregate(**args(**change)))
        aggregate(**args())
        assert len(calls) == 2 + len(bad)


def test_batchnorm_act_checks_run_once_per_signature(counted_checks):
    from dla_fast.ops.batchnorm_act import batchnorm_act, op as batchnorm_act_op
    calls = counted_checks(batchnorm_act_op, "check_inputs")

    def args(**changes):
        given = dict(x=torch.randn(2, 3, 4, 5), weight=torch.rand(3) + 0.5, bias=torch.randn(3),
                     running_mean=torch.zeros(3), running_var=torch.ones(3),
                     num_batches_tracked=torch.zeros((), dtype=torch.long), training=False, momentum=0.1, eps=1e-5,
                     residual=torch.randn(2, 3, 4, 5))
        given.update(changes)
        return given

    with dla_fast.use_backend("torch"):
        for _ in range(3):
            batchnorm_act(**args())
        assert len(calls) == 1
        bad = [(ValueError, "eps must be non-negative", dict(eps=-1e-5)),
               (TypeError, "eps must be a number", dict(eps=False)),
               (ValueError, "residual", dict(residual=torch.randn(2, 3, 4, 6))),
               (TypeError, "running_var has dtype", dict(running_var=torch.ones(3, dtype=torch.float64))),
               (ValueError, "give both running_mean and running_var", dict(running_var=None))]
        for error, match, change in bad:
            _raises_after_checking(calls, error, match, lambda: batchnorm_act(**args(**change)))


def test_upsample_merge_checks_run_once_per_signature(counted_checks):
    from dla_fast.ops import upsample_merge as um
    calls = counted_checks(um, "check_upsample_merge_inputs")
    low, weight, high = torch.randn(2, 3, 4, 5), torch.randn(3, 1, 4, 4), torch.randn(2, 3, 8, 10)
    with dla_fast.use_backend("torch"):
        for _ in range(3):
            um.upsample_merge(low.clone(), weight, high, 2, "add")
        assert len(calls) == 1
        bad = [(ValueError, "factor must be an even integer", (low, weight, high, 2.0, "add")),  # 2.0 == 2
               (TypeError, "dtypes differ", (low, weight.double(), high, 2, "add")),
               (ValueError, "high must be exactly factor x low", (low, weight, high[..., :9], 2, "add")),
               (ValueError, "mode must be one of", (low, weight, high, 2, "sum"))]
        for error, match, given in bad:
            _raises_after_checking(calls, error, match, lambda: um.upsample_merge(*given))


def test_aggregate_tile_choice_cache_equals_the_choice_and_keeps_overrides(monkeypatch):
    """The cached default tiles equal the uncached choice for every argument combination (CUDA and CPU rules; only
    the device type is read), and TILE_OVERRIDES set after cached calls still wins."""
    from dla_fast.ops.aggregate import launch
    for kernel in ("fwd", "grad_input", "grad_weight"):
        for m in (1, 4095, 4096, 100000):
            for cout in (1, 17, 64, 65, 1024):
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    for device in (torch.device("cuda"), torch.device("cpu")):
                        assert launch._tile_sizes(kernel, m, cout, dtype, device) == \
                            launch._default_tile_sizes.__wrapped__(kernel, m >= 4096, cout, dtype, device.type)
    monkeypatch.setitem(launch.TILE_OVERRIDES, "fwd", (16, 16, 16))
    assert launch._tile_sizes("fwd", 5000, 64, torch.float16, torch.device("cuda")) == (16, 16, 16)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_aggregate_weight_with_transposed_storage(dtype):
    """A conv weight whose [Cout, K] rows are not contiguous (transposed storage) is copied into rows the kernel
    reads, in the children's dtype, cached like the cast."""
    children = [torch.randn(2, 6, 3, 5).to(dtype), torch.randn(2, 5, 3, 5).to(dtype)]
    weight = torch.randn(11, 7).t().reshape(7, 11, 1, 1)  # strides (1, 7, 7, 7)
    gamma, beta = torch.rand(7) + 0.5, torch.randn(7)
    mean, var = torch.randn(7) * 0.1, torch.rand(7) + 0.5
    reference = torch.relu(torch.nn.functional.batch_norm(
        torch.nn.functional.conv2d(torch.cat(children, 1).double(), weight.to(dtype).double()), mean.double(),
        var.double(), gamma.double(), beta.double(), False))
    with dla_fast.use_backend("triton"), torch.no_grad():
        out = agg.aggregate(children, weight, gamma, beta, mean, var)
    error = (out.double() - reference).abs().max().item() / reference.abs().max().item()
    if dtype == torch.float32:
        assert error < 1e-5
    else:  # at most twice eager fp16's own error
        eager = torch.relu(torch.nn.functional.batch_norm(
            torch.nn.functional.conv2d(torch.cat(children, 1), weight.to(dtype)).float(), mean, var, gamma, beta,
            False))
        assert error <= 2 * (eager.double() - reference).abs().max().item() / reference.abs().max().item()


def test_clear_weight_caches_after_writes_the_version_counter_misses():
    """A write that keeps the version counter (FSDP2's all-gather does this) is not seen by the caches;
    dla_fast.clear_weight_caches(model) makes the next call use the new weights: the ops' derived weights and the
    folded conv + BatchNorm weights of an accelerated model."""
    weight = torch.randn(6, 5, 1, 1)
    stale = cached_derived(weight, "half", lambda: weight.half())
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(weight):
        weight.copy_(torch.randn(6, 5, 1, 1))
    assert cached_derived(weight, "half", lambda: weight.half()) is stale  # the limitation itself
    dla_fast.clear_weight_caches()
    assert torch.equal(cached_derived(weight, "half", lambda: weight.half()), weight.half())

    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()))
    model = randomize_bn(model.eval())
    reference = copy.deepcopy(model)
    dla_fast.accelerate(model)
    assert dla_fast.accelerated_modules(model)
    x = torch.randn(2, 3, 5, 6)
    with dla_fast.use_backend("triton"), torch.no_grad():
        model(x)  # folds and caches
        for m in (model, reference):
            conv = m.get_submodule("0.0")
            with torch.autograd._unsafe_preserve_version_counter(conv.weight):
                conv.weight.mul_(-2.0)
        assert not torch.allclose(model(x), reference(x), atol=1e-3)  # stale folded weight
        dla_fast.clear_weight_caches(model)
        assert_close(model(x), reference(x), 1e-5, "after clear_weight_caches")
