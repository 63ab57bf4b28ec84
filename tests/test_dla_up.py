"""DLA-Up segmentation (ucbdrive layout) and the shared bilinear upsample, checked against hand-written references."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dla_fast
from dla_fast.models import PARAM_COUNTS, VARIANTS, bilinear_upsample, bilinear_weights_, build_dla

from helpers import assert_close, randomize_bn

# ucbdrive's DLAUp stages for DLA-34 at down ratio 2: (out width, input widths, up factors), ida_0 first.
DLA34_IDA_STAGES = [
    (256, [256, 512], [1, 2]),
    (128, [128, 256, 256], [1, 2, 2]),
    (64, [64, 128, 128, 128], [1, 2, 2, 2]),
    (32, [32, 64, 64, 64, 64], [1, 2, 2, 2, 2]),
]
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ---------------------------------------------------------------------------------------------- bilinear upsample

def _bilinear_formula(k):
    """ucbdrive's fill_up_weights formula, evaluated with Python floats."""
    f = math.ceil(k / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    return [[(1 - abs(i / f - c)) * (1 - abs(j / f - c)) for j in range(k)] for i in range(k)]


@pytest.mark.parametrize("factor", [2, 4, 8, 16])
def test_bilinear_weights_equal_the_formula(factor):
    up = bilinear_upsample(5, factor)
    assert (up.kernel_size, up.stride, up.padding, up.groups) == ((2 * factor,) * 2, (factor,) * 2,
                                                                  (factor // 2,) * 2, 5)
    assert up.bias is None and up.weight.requires_grad
    expected = torch.tensor(_bilinear_formula(2 * factor), dtype=torch.float32).expand(5, 1, -1, -1)
    assert torch.equal(up.weight.detach(), expected)
    assert not bilinear_upsample(3, factor, trainable=False).weight.requires_grad


def test_bilinear_taps_for_factor_two():
    w = bilinear_weights_(torch.full((2, 1, 4, 4), float("nan"), dtype=torch.float64))
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=torch.float64)
    assert torch.equal(w[1, 0], torch.outer(taps, taps))


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_bilinear_upsample_is_bilinear_interpolation_inside_the_border(factor):
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    up = bilinear_upsample(3, factor).double()
    y = up(x)
    assert y.shape == (2, 3, 5 * factor, 7 * factor)
    ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    inner = (..., slice(factor, -factor), slice(factor, -factor))
    assert_close(y[inner], ref[inner], 1e-12, "interior of the upsampled map")


@pytest.mark.parametrize("factor", [1, 3, 0, 2.5])
def test_bilinear_upsample_rejects_odd_factors(factor):
    with pytest.raises(ValueError, match="even integer factor"):
        bilinear_upsample(4, factor)


def test_bilinear_weights_rejects_a_dense_weight():
    with pytest.raises(ValueError, match=r"\(C, 1, k, k\)"):
        bilinear_weights_(torch.empty(4, 4, 4, 4))


# ------------------------------------------------------------------------------------------- structure and keys

def _stage_config(ida):
    """(out, input widths, up factors) read off the modules of one IDAUp stage."""
    out = ida.node_1[0].out_channels
    widths, factors, i = [], [], 0
    while hasattr(ida, f"proj_{i}"):
        proj, up = getattr(ida, f"proj_{i}"), getattr(ida, f"up_{i}")
        widths.append(out if isinstance(proj, nn.Identity) else proj[0].in_channels)
        if isinstance(up, nn.Identity):
            factors.append(1)
        else:
            f = up.stride[0]
            assert (up.kernel_size[0], up.padding[0], up.groups, up.in_channels) == (2 * f, f // 2, out, out)
            factors.append(f)
        if i:
            node = getattr(ida, f"node_{i}")[0]
            assert (node.in_channels, node.out_channels, node.kernel_size) == (2 * out, out, (3, 3))
            assert node.padding == (1, 1)
        i += 1
    return out, widths, factors


@pytest.mark.parametrize("down_ratio", [2, 4, 8])
def test_dla34_stages_follow_ucbdrive(down_ratio):
    model = dla_fast.create_model("dla34up", num_classes=7, down_ratio=down_ratio)
    first_level = int(math.log2(down_ratio))
    stages = [_stage_config(getattr(model.dla_up, f"ida_{k}")) for k in range(5 - first_level)]
    assert stages == [tuple(s) for s in DLA34_IDA_STAGES[:len(stages)]]
    assert not hasattr(model.dla_up, f"ida_{len(stages)}")
    assert model.fc[0].in_channels == (16, 32, 64, 128, 256, 512)[first_level]
    assert model.up.stride == (down_ratio, down_ratio)


def _expected_keys(variant, down_ratio, num_classes):
    """ucbdrive DLASeg keys and shapes, written from its structure (timm/ucbdrive backbone keys under base.)."""
    keys = {f"base.{k}": tuple(v.shape)
            for k, v in build_dla(variant, features_only=True, out_indices=range(6)).state_dict().items()}
    channels = list(VARIANTS[variant][1][int(math.log2(down_ratio)):])
    n = len(channels)
    in_channels, scales = list(channels), [2 ** i for i in range(n)]
    for k in range(n - 1):
        j = n - 2 - k
        out, prefix = channels[j], f"dla_up.ida_{k}"
        for i, (c, s) in enumerate(zip(in_channels[j:], scales[j:])):
            if c != out:
                keys[f"{prefix}.proj_{i}.0.weight"] = (out, c, 1, 1)
                keys.update({f"{prefix}.proj_{i}.1.{b}": (() if b == "num_batches_tracked" else (out,))
                             for b in BN_KEYS})
            f = s // scales[j]
            if f > 1:
                keys[f"{prefix}.up_{i}.weight"] = (out, 1, 2 * f, 2 * f)
            if i:
                keys[f"{prefix}.node_{i}.0.weight"] = (out, 2 * out, 3, 3)
                keys.update({f"{prefix}.node_{i}.1.{b}": (() if b == "num_batches_tracked" else (out,))
                             for b in BN_KEYS})
        in_channels[j + 1:] = [out] * (n - j - 1)
        scales[j + 1:] = [scales[j]] * (n - j - 1)
    keys["fc.0.weight"] = (num_classes, channels[0], 1, 1)
    keys["fc.0.bias"] = (num_classes,)
    keys["up.weight"] = (num_classes, 1, 2 * down_ratio, 2 * down_ratio)
    return keys


@pytest.mark.parametrize("variant, down_ratio", [("dla34", 2), ("dla34", 8), ("dla60x", 4)])
def test_state_dict_keys_and_shapes_follow_ucbdrive(variant, down_ratio):
    model = dla_fast.create_model(f"{variant}up", num_classes=11, down_ratio=down_ratio)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _expected_keys(variant, down_ratio, 11)


def test_parameter_count_of_dla34up():
    num_classes = 19
    model = dla_fast.create_model("dla34up", num_classes=num_classes)
    expected = PARAM_COUNTS["dla34"] - (512 * 1000 + 1000)  # backbone without its classifier
    for out, widths, factors in DLA34_IDA_STAGES:
        for i, (c, f) in enumerate(zip(widths, factors)):
            expected += (c * out + 2 * out) if c != out else 0          # proj conv1x1 + BN
            expected += out * (2 * f) ** 2 if f > 1 else 0             # depthwise up
            expected += (2 * out * out * 9 + 2 * out) if i else 0      # node conv3x3 + BN
    expected += 32 * num_classes + num_classes + num_classes * 4 ** 2  # fc and the fixed up (down ratio 2)
    assert sum(p.numel() for p in model.parameters()) == expected == 17_540_435


def test_every_backbone_is_registered():
    assert dla_fast.list_models("*up") == sorted(f"{v}up" for v in VARIANTS)


def _ucbdrive_extras(model):
    """base.fc (ImageNet classifier) and the unused `project` of dla34's levels>1 trees, as ucbdrive saves them."""
    extras = {"base.fc.weight": torch.randn(1000, 512, 1, 1), "base.fc.bias": torch.randn(1000)}
    for level, (c_in, c_out) in (("level3", (64, 128)), ("level4", (128, 256))):
        extras[f"base.{level}.project.0.weight"] = torch.randn(c_out, c_in, 1, 1)
        extras.update({f"base.{level}.project.1.{b}": (torch.tensor(5) if b == "num_batches_tracked"
                                                        else torch.rand(c_out) + 0.5) for b in BN_KEYS})
    assert not set(extras) & set(model.state_dict())
    return extras


def test_ucbdrive_checkpoint_loads_strictly_and_reports_ignored_keys():
    src = randomize_bn(dla_fast.create_model("dla34up", num_classes=19))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    extras = _ucbdrive_extras(src)

    model = dla_fast.create_model("dla34up", num_classes=19)
    report = dla_fast.load_checkpoint(model, {**src.state_dict(), **extras}, verbose=False)
    assert report.ignored == sorted(extras) and report.missing == []
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


# ---------------------------------------------------------------------------------- forward against a reference

def _bn_relu(x, prefix, params, buffers, training):
    return F.relu(F.batch_norm(x, buffers[f"{prefix}.running_mean"], buffers[f"{prefix}.running_var"],
                               params[f"{prefix}.weight"], params[f"{prefix}.bias"], training, 0.1, 1e-5))


def reference_dla_seg(model, x, training):
    """ucbdrive's DLASeg forward in torch.nn.functional, reading `model`'s weights by their ucbdrive keys.

    Widths and up factors come from the tensors' shapes; the backbone is `model.base` (tested against timm).
    """
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    layers = model.base(x)[int(math.log2(model.down_ratio)):]
    n = len(layers)
    for k in range(n - 1):
        prefix, j = f"dla_up.ida_{k}", n - 2 - k
        width, side = layers[j].shape[1], layers[j].shape[-1]
        upsampled = []
        for i, t in enumerate(layers[j:]):
            if t.shape[1] != width:
                t = _bn_relu(F.conv2d(t, params[f"{prefix}.proj_{i}.0.weight"]), f"{prefix}.proj_{i}.1",
                             params, buffers, training)
            f = side // t.shape[-1]
            if f > 1:
                t = F.conv_transpose2d(t, params[f"{prefix}.up_{i}.weight"], stride=f, padding=f // 2, groups=width)
            upsampled.append(t)
        y, nodes = upsampled[0], []
        for i in range(1, len(upsampled)):
            y = F.conv2d(torch.cat([y, upsampled[i]], 1), params[f"{prefix}.node_{i}.0.weight"], padding=1)
            y = _bn_relu(y, f"{prefix}.node_{i}.1", params, buffers, training)
            nodes.append(y)
        layers[j + 1:] = nodes
    logits = F.conv2d(y, params["fc.0.weight"], params["fc.0.bias"])
    r = model.down_ratio
    full = F.conv_transpose2d(logits, params["up.weight"], stride=r, padding=r // 2, groups=logits.shape[1])
    return F.log_softmax(full, dim=1), logits


def _perturbed_seg(down_ratio, num_classes=5):
    model = randomize_bn(dla_fast.create_model("dla34up", num_classes=num_classes, down_ratio=down_ratio))
    with torch.no_grad():  # break the symmetry of the bilinear kernels so a flipped or transposed kernel shows
        for name, p in model.named_parameters():
            if ".up_" in name or name == "up.weight":
                p.add_(torch.rand_like(p) * 0.3)
    return model


@pytest.mark.parametrize("down_ratio", [2, 4])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_forward_backward_and_bn_stats_match_the_reference(down_ratio, training):
    model = _perturbed_seg(down_ratio).train(training)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    for step in range(2 if training else 1):
        xm, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        log_probs, logits = model(xm)
        ref_log_probs, ref_logits = reference_dla_seg(ref, xr, training)
        assert log_probs.shape == (2, 5, 64, 64) and logits.shape == (2, 5, 64 // down_ratio, 64 // down_ratio)
        assert_close(logits, ref_logits, 1e-5, f"logits, step {step}")
        assert_close(log_probs, ref_log_probs, 1e-5, f"log-probabilities, step {step}")
        g_probs, g_logits = torch.randn_like(log_probs), torch.randn_like(logits)
        ((log_probs * g_probs).sum() + (logits * g_logits).sum()).backward()
        ((ref_log_probs * g_probs).sum() + (ref_logits * g_logits).sum()).backward()
        assert_close(xm.grad, xr.grad, 1e-4, "input gradient")
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert_close(p.grad, ref_params[name].grad, 1e-4, f"grad of {name}")
        model.zero_grad(), ref.zero_grad()
    ref_buffers = dict(ref.named_buffers())
    for name, b in model.named_buffers():
        if b.dtype.is_floating_point:
            assert_close(b, ref_buffers[name], 1e-5, name)
        else:  # the reference's functional BN of the head does not count batches; its backbone is the module
            steps = 2 if training and not name.startswith("base.") else 0
            assert b.item() == ref_buffers[name].item() + steps, name


def test_every_trainable_parameter_gets_a_gradient_and_the_fixed_up_none():
    model = _perturbed_seg(2).train()
    log_probs, logits = model(torch.randn(2, 3, 64, 64))
    ((log_probs * torch.randn_like(log_probs)).sum() + (logits * torch.randn_like(logits)).sum()).backward()
    assert not model.up.weight.requires_grad and model.up.weight.grad is None
    for name, p in model.named_parameters():
        if name != "up.weight":
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    # the fixed upsample is the bilinear kernel it was built with
    assert torch.equal(dla_fast.create_model("dla34up", num_classes=3).up.weight,
                       bilinear_upsample(3, 2, trainable=False).weight)


# --------------------------------------------------------------------------------------------- shapes and errors

@pytest.mark.parametrize("down_ratio", [2, 4, 8, 16])
def test_output_shapes_and_probabilities(down_ratio):
    model = dla_fast.create_model("dla34up", num_classes=3, down_ratio=down_ratio).eval()
    with torch.no_grad():
        log_probs, logits = model(torch.randn(2, 3, 64, 96))
    assert log_probs.shape == (2, 3, 64, 96)
    assert logits.shape == (2, 3, 64 // down_ratio, 96 // down_ratio)
    assert_close(log_probs.exp().sum(1), torch.ones(2, 64, 96), 1e-6, "probabilities summed over classes")


def test_another_backbone_runs():
    seg = dla_fast.create_model("dla46x_cup", num_classes=4, down_ratio=4, in_chans=1).eval()
    with torch.no_grad():
        log_probs, logits = seg(torch.randn(2, 1, 64, 64))
    assert log_probs.shape == (2, 4, 64, 64) and logits.shape == (2, 4, 16, 16)
    assert seg.fc[0].in_channels == 64


@pytest.mark.parametrize("shape, message", [
    ((3, 64, 64), "4-D image batch"),
    ((2, 1, 64, 64), "expects 3 input channels; got 1"),
    ((2, 3, 64, 80), "divisible by 32.*64x80"),
])
def test_bad_input_is_a_clear_error(shape, message):
    model = dla_fast.create_model("dla34up", num_classes=3).eval()
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"down_ratio must be one of \(2, 4, 8, 16\); got 32"):
        dla_fast.create_model("dla34up", down_ratio=32)
    with pytest.raises(ValueError, match="unknown DLA backbone 'dla35'"):
        dla_fast.models.DLASeg("dla35", 3)
    with pytest.raises(ValueError, match="built for 5 levels; got 4"):
        dla_fast.create_model("dla34up").dla_up([torch.randn(1, 8, 4, 4)] * 4)
