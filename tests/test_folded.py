"""Inference BatchNorm folding: the conv_bn_act op and the Folded* blocks accelerate() swaps in.

The folded path runs in eval mode without gradients, under any backend but 'torch'; on CPU tensors it is
F.conv2d with the folded weight and bias, on CUDA one fused cuDNN call (the `cuda`-marked tests).
"""
import copy

import pytest
import torch
import torch.nn as nn

import dla_fast
from dla_fast.nn import FoldedBasicBlock, FoldedBottleneck, FoldedConvBNStack, FusedIDAUp, FusedIDAUpAdd
from dla_fast.nn import folded as folded_module
from dla_fast.ops.conv_bn_act import compute_dtype, conv_bias_act, conv_bn_act, conv_bn_act_reference, fold_batchnorm

from helpers import assert_close, randomize_bn

timm = pytest.importorskip("timm")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FOLDED_TYPES = (FoldedBasicBlock, FoldedBottleneck, FoldedConvBNStack)


def _bn(channels, generator=None):
    return randomize_bn(nn.BatchNorm2d(channels).eval(), generator)


@pytest.mark.parametrize("cin, cout, k, stride, dilation, groups, conv_bias, residual, relu", [
    (3, 5, 3, 1, 1, 1, False, False, True),
    (6, 6, 3, 2, 1, 3, True, False, True),    # strided, grouped, conv bias
    (7, 9, 1, 1, 1, 1, False, True, True),    # 1x1 + residual
    (8, 8, 3, 1, 2, 1, False, True, True),    # dilated + residual
    (5, 4, 1, 2, 1, 1, False, False, False),  # a projection: no ReLU
])
def test_folded_conv_equals_conv_bn_relu(cin, cout, k, stride, dilation, groups, conv_bias, residual, relu):
    g = torch.Generator().manual_seed(cin * 100 + cout)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, groups=groups,
                     bias=conv_bias)
    bn = _bn(cout, g)
    x = torch.randn(2, cin, 11, 9, generator=g)
    out_hw = conv(x).shape[2:]
    res = torch.randn(2, cout, *out_hw, generator=g) if residual else None
    args = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
            conv.stride, conv.padding, conv.dilation, conv.groups, res, relu)
    with torch.no_grad():
        ref = conv_bn_act_reference(x, *args)
        with dla_fast.use_backend("triton"):
            out = conv_bn_act(x, *args)
        with dla_fast.use_backend("torch"):
            assert torch.equal(conv_bn_act(x, *args), ref)
    assert_close(out, ref, 1e-5)
    if relu:
        assert out.min() >= 0


def test_fold_is_computed_in_fp32_and_returned_in_the_compute_dtype():
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), _bn(6)
    x = torch.randn(1, 4, 8, 8)
    weight, bias = fold_batchnorm(conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
                                  torch.bfloat16)
    assert weight.dtype == bias.dtype == torch.bfloat16
    with torch.no_grad():
        ref = conv_bn_act_reference(x, conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                    bn.eps, 1, 1, 1, 1, None, True)
        out = conv_bias_act(x, weight, bias, (1, 1), (1, 1))
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, 2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
    assert compute_dtype(x) == torch.float32


def test_conv_bn_act_errors():
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), _bn(6)
    args = (conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, 1, 1, 1, 1)
    with dla_fast.use_backend("triton"):
        with pytest.raises(RuntimeError, match="inference-only"):
            conv_bn_act(torch.randn(1, 4, 8, 8), *args)  # conv.weight requires grad, grad mode is on
        with torch.no_grad():
            with pytest.raises(ValueError, match="input has 5 channels but the conv takes 4"):
                conv_bn_act(torch.randn(1, 5, 8, 8), *args)
            with pytest.raises(ValueError, match=r"residual is \(1, 6, 4, 4\) .* conv output is \(1, 6, 8, 8\)"):
                conv_bn_act(torch.randn(1, 4, 8, 8), *args, residual=torch.randn(1, 6, 4, 4))
            with pytest.raises(ValueError, match="must be 4-D"):
                conv_bn_act(torch.randn(4, 8, 8), *args)
    with pytest.raises(ValueError, match=r"running_var must have shape \(6,\)"):
        fold_batchnorm(conv.weight, None, bn.weight, bn.bias, bn.running_mean, torch.ones(5), 1e-5, torch.float32)


class FoldCounter:
    """Counts the folded convolutions that ran (dla_fast.nn.folded's conv_bias_act calls)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = folded_module.conv_bias_act

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(folded_module, "conv_bias_act", counting)


def _conv_bn_pairs(model):
    """conv + BN pairs a fully folded model runs as single convolutions (every BatchNorm but the roots')."""
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.interpreter
@pytest.mark.parametrize("name, block, roots", [
    ("dla34", FoldedBasicBlock, 6),       # basic blocks
    ("dla46x_c", FoldedBottleneck, 6),    # grouped bottlenecks (BottleneckX)
    ("dla60", FoldedBottleneck, 8),       # bottlenecks
])
def test_accelerated_timm_model_folds_every_conv_bn_in_eval(name, block, roots, monkeypatch):
    ref = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    fused = dla_fast.accelerate(copy.deepcopy(ref))
    assert any(isinstance(m, block) for m in fused.modules())
    assert sum(isinstance(m, dla_fast.nn.FusedRoot) for m in fused.modules()) == roots
    counter = FoldCounter(monkeypatch)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)
        with dla_fast.use_backend("triton"):
            out = fused(x)
    assert_close(out, expected, 1e-5)
    assert counter.calls == _conv_bn_pairs(ref) - roots  # every conv + BN outside the roots ran folded
    assert fused.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.interpreter
def test_folded_blocks_do_not_fold_when_training_or_when_gradients_are_wanted(monkeypatch):
    """No folded call then: with gradients wanted the blocks run conv + the fused BatchNorm op (backend triton;
    tests/test_accelerate.py checks that path module by module), with backend torch their eager modules."""
    ref = randomize_bn(dla_fast.create_model("dla46_c", num_classes=4)).to(memory_format=torch.channels_last)
    fused = dla_fast.accelerate(copy.deepcopy(ref))  # the same layout: the same eager training step
    counter = FoldCounter(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    with dla_fast.use_backend("triton"):
        fused.eval(), ref.eval()
        out = fused(x)  # grad mode on, parameters require grad: eager, differentiable
        out.sum().backward()
        assert counter.calls == 0
        assert_close(out, ref(x), 1e-5)
        fused.train(), ref.train()
        with dla_fast.use_backend("torch"):  # the roots eager too, so the statistics match exactly
            fused(x), ref(x)
        assert counter.calls == 0
        for name, buf in ref.named_buffers():
            assert torch.equal(fused.get_buffer(name), buf), name
        fused.eval(), ref.eval()
        with torch.no_grad():
            assert_close(fused(x), ref(x), 1e-5, "eval after a training step (new statistics folded)")
        assert counter.calls > 0


@pytest.mark.interpreter
def test_folded_weights_follow_in_place_parameter_and_statistics_updates():
    ref = randomize_bn(dla_fast.create_model("dla46_c", num_classes=4)).eval()
    fused = dla_fast.accelerate(copy.deepcopy(ref))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), dla_fast.use_backend("triton"):
        assert_close(fused(x), ref(x), 1e-5)
        for model in (ref, fused):  # the cached folds must notice both kinds of in-place change
            model.level2.tree1.bn1.running_var.mul_(3.0)
            model.level2.tree1.conv2.weight.add_(0.1)
        assert_close(fused(x), ref(x), 1e-5, "after in-place updates")
        fused.load_state_dict(randomize_bn(copy.deepcopy(ref)).state_dict())
        ref.load_state_dict(fused.state_dict())
        assert_close(fused(x), ref(x), 1e-5, "after load_state_dict")


@pytest.mark.interpreter
def test_res2net_blocks_stay_eager_and_the_model_still_matches():
    ref = randomize_bn(timm.create_model("dla60_res2net", pretrained=False, num_classes=4)).eval()
    fused = dla_fast.accelerate(copy.deepcopy(ref))
    assert not any(isinstance(m, (FoldedBasicBlock, FoldedBottleneck)) for m in fused.modules())
    assert isinstance(fused.base_layer, FoldedConvBNStack)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), dla_fast.use_backend("triton"):
        assert_close(fused(x), ref(x), 1e-5)


def test_only_plain_conv_and_batchnorm_pairs_are_folded():
    class NormAct(nn.BatchNorm2d):  # like timm's BatchNormAct2d: its forward does more than BatchNorm
        def forward(self, x):
            return super().forward(x).sigmoid()

    cases = {
        "plain": (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()), ""),
        "norm_act": (nn.Sequential(nn.Conv2d(3, 4, 3), NormAct(4), nn.ReLU()), "not a plain BatchNorm2d"),
        "no_stats": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)),
                     "without running statistics"),
        "same_padding": (nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.BatchNorm2d(4)), "padding 'same'"),
    }
    for name, (module, reason) in cases.items():
        cls, why = folded_module.folded_replacement(module)
        if reason:
            assert cls is None and reason in why, name
        else:
            assert cls is FoldedConvBNStack and why == "", name
    assert folded_module.folded_replacement(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())) == (None, "")


@pytest.mark.interpreter
def test_blocks_of_other_networks_are_not_taken_for_dla_blocks():
    """timm's ResNet BasicBlock (with squeeze-excitation) has DLA's names but more: it must stay eager, and the
    accelerated network must still compute the same thing."""
    ref = randomize_bn(timm.create_model("seresnet18", pretrained=False, num_classes=4)).eval()
    assert folded_module.folded_replacement(ref.layer1[0]) == (None, "")
    fused = dla_fast.accelerate(copy.deepcopy(ref))  # only the (conv, bn) downsample stacks are folded
    assert not any(isinstance(m, (FoldedBasicBlock, FoldedBottleneck)) for m in fused.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), dla_fast.use_backend("triton"):
        assert_close(fused(x), ref(x), 1e-5)


@pytest.mark.interpreter
def test_frozen_block_with_a_residual_that_needs_gradients_runs_eager(monkeypatch):
    ref = randomize_bn(dla_fast.create_model("dla46_c")).eval()
    block = ref.level2.tree1
    fused = folded_module.FoldedBottleneck(copy.deepcopy(block))
    for p in fused.parameters():
        p.requires_grad_(False)
    counter = FoldCounter(monkeypatch)
    x = torch.randn(1, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        residual = torch.randn(block(x, torch.zeros(1, block.conv3.out_channels, 4, 4)).shape, requires_grad=True)
    with dla_fast.use_backend("triton"):
        out = fused(x, shortcut=residual)  # timm's keyword
        out.sum().backward()
        assert counter.calls == 0 and residual.grad is not None
        with torch.no_grad():
            assert_close(fused(x, residual), block(x, residual), 1e-5)
        assert counter.calls == 3


@pytest.mark.interpreter
def test_inference_tensor_parameters_are_folded_at_every_call():
    with torch.inference_mode():
        ref = randomize_bn(dla_fast.create_model("dla46_c")).eval()  # parameters are inference tensors
        fused = dla_fast.accelerate(copy.deepcopy(ref))
        x = torch.randn(1, 3, 32, 32)
        with dla_fast.use_backend("triton"):
            assert_close(fused(x), ref(x), 1e-5)
            for model in (ref, fused):
                model.level2.tree1.bn1.running_var.mul_(3.0)  # no version counter to notice this
            assert_close(fused(x), ref(x), 1e-5, "after an in-place update")


@pytest.mark.interpreter
def test_fold_bn_false_and_restore():
    model = dla_fast.create_model("dla46_c")
    dla_fast.accelerate(model, fold_bn=False)
    assert not any(isinstance(m, FOLDED_TYPES) for m in model.modules())
    dla_fast.restore(model)
    blocks = {n: m for n, m in model.named_modules() if type(m).__name__ in ("Bottleneck", "Sequential")}
    dla_fast.accelerate(model)
    assert isinstance(model.level2.tree1, FoldedBottleneck) and isinstance(model.level2.project, FoldedConvBNStack)
    assert model.base_layer[0] is blocks["base_layer"][0] and len(model.base_layer) == 3
    model.eval()  # switched while accelerated: the restored modules are in eval mode too
    model.level2.tree1.bn1.train()  # ... except what the user set on its own
    dla_fast.restore(model)
    assert all(model.get_submodule(n) is m for n, m in blocks.items())
    assert [n for n, m in model.named_modules() if m.training] == ["level2.tree1.bn1"]


@pytest.mark.interpreter
@pytest.mark.parametrize("name, kwargs, ida_type, folded_per_step", [
    ("dla34up", dict(num_classes=5), FusedIDAUp, 1),                                           # node
    ("centernet_dla34", dict(dcn=False, heads={"hm": 3, "wh": 2}, head_conv=16), FusedIDAUpAdd, 2),  # proj, node
    # deformable proj/node (dcn=True) fold into the DCN kernel: tests/test_dcn_block.py
])
def test_up_paths_fold_their_plain_convs_in_eval(name, kwargs, ida_type, folded_per_step, monkeypatch):
    ref = randomize_bn(dla_fast.create_model(name, **kwargs)).eval()
    fused = dla_fast.accelerate(copy.deepcopy(ref))
    ida_pairs = [p for m in fused.modules() if isinstance(m, ida_type) for p in m.__dict__["_folded"].values()]
    steps = sum(len(m.in_channels) - 1 for m in fused.modules() if isinstance(m, ida_type))
    assert len(ida_pairs) == folded_per_step * steps
    calls = []
    original_call = folded_module.FoldedConvBN.__call__

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(folded_module.FoldedConvBN, "__call__", counting)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)
        with dla_fast.use_backend("triton"):
            out = fused(x)
    first = (lambda o: o[0]) if isinstance(out, tuple) else (lambda o: o[0]["hm"])
    assert_close(first(out), first(expected), 1e-5)
    assert sum(any(c is p for p in ida_pairs) for c in calls) == len(ida_pairs)  # each IDA conv ran folded once


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_folded_dla34_on_gpu_uses_cudnn_fusion(dtype, monkeypatch):
    """On CUDA every folded conv runs as one fused cuDNN call; outputs equal eager (fp32 without TF32;
    16-bit under autocast, against eager under the same autocast)."""
    ref = randomize_bn(timm.create_model("dla34", pretrained=False)).cuda().eval()
    fused = dla_fast.accelerate(copy.deepcopy(ref))
    fused_calls = []
    for fn in ("cudnn_convolution_relu", "cudnn_convolution_add_relu"):
        original = getattr(torch, fn)
        monkeypatch.setattr(torch, fn, lambda *a, _f=original, _n=fn, **k: fused_calls.append(_n) or _f(*a, **k))
    x = torch.randn(8, 3, 224, 224, device="cuda")
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:
        expected = ref(x.contiguous(memory_format=torch.channels_last))
        out = fused(x.contiguous(memory_format=torch.channels_last))
    assert_close(out.float(), expected.float(), 1e-4 if dtype == torch.float32 else 3e-2)
    projections = sum(isinstance(m, FoldedConvBNStack) and not any(m.relus) for m in fused.modules())
    assert len(fused_calls) == _conv_bn_pairs(ref) - 6 - projections
    assert "cudnn_convolution_add_relu" in fused_calls
