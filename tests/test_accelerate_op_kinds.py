"""accelerate(include=, exclude=): each op kind named there really runs fused or stays eager, and the model's
output equals the eager model's either way.

The fused modules decide per call whether an op runs (fold in eval, fused training BatchNorm, ...) from the
backend; here that decision is forced to "fused" while each op itself is replaced by a counting wrapper that runs
its eager reference (backend 'torch'), in fp64: the test checks which ops a module calls, not the kernels (their
own tests do that), and the outputs must equal eager PyTorch to fp64 rounding.
"""
import collections
import copy

import pytest
import torch

import dla_fast
import dla_fast.ops.deform_conv
from dla_fast import backend
from dla_fast.nn import FusedIDAUpAdd, FusedRoot, dcn, folded, ida, root
from dla_fast.nn.folded import FoldedBottleneck, FoldedConvBNStack
from dla_fast.nn.op_kinds import OP_KINDS

from helpers import assert_close, randomize_bn

pytest.importorskip("torchvision")  # the model's deformable convs (eager path)

# op kind -> the (namespace, function name) calls that run it fused
OP_CALLS = {
    "aggregate": [(root, "aggregate"), (ida, "aggregate")],
    "upsample_merge": [(ida, "upsample_merge")],
    "fold_bn": [(folded, "conv_bias_act"), (dcn, "dcn_block_inference")],
    "batchnorm_act": [(folded, "batchnorm_act"), (ida, "batchnorm_act")],
    "deform_conv": [(dcn, "dcn_block"), (dcn, "dcn_block_inference"), (dla_fast.ops.deform_conv, "deform_conv2d")],
}


@pytest.fixture
def counted_ops(monkeypatch):
    """Counts of the fused op calls by op kind; each call runs the op's eager reference. The modules' own
    decisions see a fused backend."""
    calls = collections.Counter()
    resolve = backend.resolve

    def resolve_fused(device, op, dtype=None):
        return "torch" if backend.get_backend() == "torch" else "triton"

    def counting(kind, fn):
        def call(*args, **kwargs):
            calls[kind] += 1
            with dla_fast.use_backend("torch"):
                return fn(*args, **kwargs)
        return call

    for kind, targets in OP_CALLS.items():
        for namespace, name in targets:
            monkeypatch.setattr(namespace, name, counting(kind, getattr(namespace, name)))
    monkeypatch.setattr(backend, "resolve", resolve_fused)
    assert resolve is not backend.resolve
    return calls


def centernet():
    """A CenterNet with every op kind: Roots, the IDA up path, deformable convs, conv + BN stacks."""
    return randomize_bn(dla_fast.create_model("centernet_dla46_c", heads={"hm": 3, "wh": 2}, head_conv=8)).double()


def run_both_modes(model, ref, calls):
    """Eval (no gradients) and training outputs of `model` against `ref`; the counts of each mode."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    counts = {}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        ref.train(mode == "train")
        calls.clear()
        with torch.set_grad_enabled(mode == "train"):
            out, expected = model(x)[0], ref(x)[0]
        for name in expected:
            assert_close(out[name], expected[name], 1e-6, f"{mode} {name}")  # fp32 fold weights: ~1e-8
        counts[mode] = dict(calls)
    for (name, b), c in zip(ref.named_buffers(), model.buffers()):
        assert torch.equal(c, b) or (c.double() - b.double()).abs().max() < 1e-10, name
    return counts


def test_all_op_kinds_run_fused_by_default(counted_ops):
    ref = centernet()
    model = dla_fast.accelerate(copy.deepcopy(ref), channels_last=False)
    counts = run_both_modes(model, ref, counted_ops)
    assert {k for k, n in counts["eval"].items() if n} == {"aggregate", "upsample_merge", "fold_bn", "deform_conv"}
    assert {k for k, n in counts["train"].items() if n} == {"aggregate", "upsample_merge", "batchnorm_act",
                                                             "deform_conv"}


@pytest.mark.parametrize("kind", OP_KINDS)
def test_excluded_op_kind_stays_eager(kind, counted_ops):
    ref = centernet()
    model = dla_fast.accelerate(copy.deepcopy(ref), channels_last=False, exclude=kind)
    swapped = [type(model.get_submodule(n)) for n in dla_fast.accelerated_modules(model)]
    if kind == "aggregate":
        assert FusedRoot not in swapped
    if kind in ("fold_bn", "batchnorm_act"):  # the other one still needs the blocks replaced
        assert FoldedBottleneck in swapped and FoldedConvBNStack in swapped
    assert FusedIDAUpAdd in swapped
    counts = run_both_modes(model, ref, counted_ops)
    for mode in ("eval", "train"):
        assert counts[mode].get(kind, 0) == 0 or (kind == "fold_bn" and mode == "train"), (mode, counts)
    others = {"aggregate", "upsample_merge", "deform_conv"} - {kind}
    assert all(counts["eval"].get(k) and counts["train"].get(k) for k in others), counts
    if kind == "deform_conv":  # the deformable steps run eagerly: neither folded nor fused
        assert counts["eval"].get("fold_bn") and counts["train"].get("batchnorm_act")


def test_include_only_one_kind(counted_ops):
    ref = centernet()
    model = dla_fast.accelerate(copy.deepcopy(ref), channels_last=False, include=["deform_conv"])
    swapped = {type(model.get_submodule(n)) for n in dla_fast.accelerated_modules(model)}
    assert swapped == {FusedIDAUpAdd}  # its deformable steps; the backbone untouched
    counts = run_both_modes(model, ref, counted_ops)
    assert set(counts["eval"]) == set(counts["train"]) == {"deform_conv"}


def test_fold_bn_false_excludes_the_batchnorm_kinds(counted_ops):
    ref = centernet()
    model = dla_fast.accelerate(copy.deepcopy(ref), channels_last=False, fold_bn=False, exclude="deform_conv")
    swapped = {type(model.get_submodule(n)) for n in dla_fast.accelerated_modules(model)}
    assert swapped == {FusedRoot, FusedIDAUpAdd}
    counts = run_both_modes(model, ref, counted_ops)
    assert set(counts["eval"]) == set(counts["train"]) == {"aggregate", "upsample_merge"}


def test_unknown_or_bad_op_kinds_are_refused():
    model = dla_fast.create_model("dla46_c")
    with pytest.raises(ValueError, match=r"unknown op kind 'fold' in exclude; the op kinds are aggregate, "
                                         r"upsample_merge, fold_bn, batchnorm_act, deform_conv"):
        dla_fast.accelerate(model, exclude="fold")
    with pytest.raises(ValueError, match=r"unknown op kinds 'Aggregate', 3 in include"):
        dla_fast.accelerate(model, include=["Aggregate", 3])
    with pytest.raises(TypeError, match="include must be an op kind name or a list"):
        dla_fast.accelerate(model, include=5)
    with pytest.raises(TypeError, match="fold_bn must be True or False"):
        dla_fast.accelerate(model, fold_bn="no")
    with pytest.raises(ValueError, match=r"nothing to fuse .* \(enabled: none\)"):
        dla_fast.accelerate(model, include=[])
    assert dla_fast.accelerated_modules(model) == []  # nothing was swapped by the refused calls
