"""Degenerate BatchNorm statistics in eval (running_var 0 with eps 0, a zero BatchNorm weight, a sample equal to
the running mean): every fused eval path gives the NaN / +Inf / -Inf pattern of nn.BatchNorm2d's definition

    (y - running_mean) / sqrt(running_var + eps) * weight + bias

(the grouping of eager CUDA's elementwise BatchNorm; eager CPU's F.batch_norm folds it into y * a + b and so
gives NaN where this gives +-Inf: see benchmarks/NOTES.md, "Numerics of degenerate statistics"). The reference
is that formula in fp64 on the conv output computed by the reference module in fp64. The folded paths (conv +
BN folded into one conv, and the fused DCN block's folded deformable conv) used to fold Inf into the weights,
making NaN of every sum; they now see the non-finite fold and run those pairs unfolded.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dla_fast
from dla_fast.models.centernet import IDAConv
from dla_fast.nn import FoldedConvBNStack, FusedDCNBlock
from dla_fast.ops.aggregate import aggregate
from dla_fast.ops.batchnorm_act import batchnorm_act

from helpers import assert_same_non_finite

torchvision = pytest.importorskip("torchvision")

CHANNELS = 6


def _degenerate(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Channels: var 0 (mean 0.5), var 0 with weight 0, var 0 with a negative weight, a plain channel, var 0 and
    mean 0, a plain channel with weight 0; eps 0."""
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, 0.0, -0.3, 0.2, 0.0, 0.1]))
        bn.running_var.copy_(torch.tensor([0.0, 0.0, 0.0, 1.3, 0.0, 0.5]))
        bn.weight.copy_(torch.tensor([1.0, 0.0, -2.0, 0.7, 0.5, 0.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.0, -0.1, 0.0, 0.3]))
    bn.eps = 0.0
    return bn.eval()


def _definition(y: torch.Tensor, bn: nn.BatchNorm2d, relu: bool = True) -> torch.Tensor:
    v = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    out = (y.double() - v(bn.running_mean)) / torch.sqrt(v(bn.running_var) + bn.eps) * v(bn.weight) + v(bn.bias)
    return torch.relu(out) if relu else out


def _with_ties(y: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """y with a few elements exactly at the running mean (0 * Inf = NaN in the definition)."""
    y = y.clone()
    y[0, 0, 0, :2] = bn.running_mean[0]
    y[-1, 4, 1, 1] = bn.running_mean[4]
    return y


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", ["triton"])
def test_batchnorm_act_eval(impl):
    bn = _degenerate(nn.BatchNorm2d(CHANNELS))
    y = _with_ties(torch.randn(2, CHANNELS, 3, 4), bn)
    with dla_fast.use_backend(impl):
        out = batchnorm_act(y, bn.weight, bn.bias, bn.running_mean, bn.running_var, training=False, eps=0.0)
    assert_same_non_finite(out, _definition(y, bn), 1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", ["triton"])
def test_aggregate_eval(impl):
    bn = _degenerate(nn.BatchNorm2d(CHANNELS))
    g = torch.Generator().manual_seed(0)
    children = [torch.randn(2, 3, 3, 4, generator=g), torch.randn(2, 4, 3, 4, generator=g)]
    weight = torch.randn(CHANNELS, 7, 1, 1, generator=g)
    with dla_fast.use_backend(impl):
        out = aggregate(children, weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, training=False,
                        eps=0.0)
    y = F.conv2d(torch.cat(children, 1).double(), weight.double())
    assert_same_non_finite(out, _definition(y, bn), 1e-5)


@pytest.mark.interpreter
def test_folded_conv_bn_relu_stack():
    """The conv + BN + ReLU stack folded (eval, no gradient): the non-finite fold is seen and the pair runs
    unfolded, with the definition's pattern."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, CHANNELS, 3, padding=1), _degenerate(nn.BatchNorm2d(CHANNELS)),
                             nn.ReLU()).eval()
    fused = FoldedConvBNStack(copy.deepcopy(original))
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        y = F.conv2d(x.double(), original[0].weight.double(), original[0].bias.double(), padding=1)
        with dla_fast.use_backend("triton"):
            assert fused.folds(x)
            out = fused(x)
    assert_same_non_finite(out, _definition(y, original[1]), 1e-5)


@pytest.mark.interpreter
def test_folded_dcn_block():
    """The fused DCN block in eval (its BatchNorm folded into the deformable conv) with degenerate statistics:
    the definition's pattern on the torchvision deformable conv's output (fp64)."""
    torch.manual_seed(0)
    original = IDAConv(4, CHANNELS, deformable=True).eval()
    with torch.no_grad():
        original.conv.conv_offset_mask.weight.normal_(0.0, 0.4)
        original.conv.conv_offset_mask.bias.normal_(0.0, 1.0)
        original.conv.bias.normal_(0.0, 0.5)
    _degenerate(original.actf[0])
    fused = FusedDCNBlock(copy.deepcopy(original))
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        conv = original.conv.double()
        om = conv.conv_offset_mask(x.double())
        offset, mask = om[:, :18], torch.sigmoid(om[:, 18:])
        y = torchvision.ops.deform_conv2d(x.double(), offset, conv.weight, conv.bias, padding=1, mask=mask)
        with dla_fast.use_backend("triton"):
            out = fused(x)
    assert_same_non_finite(out, _definition(y, original.actf[0]), 1e-5)
