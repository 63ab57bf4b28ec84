"""CenterNet-style DLA detector (CenterNet pose_dla_dcn, FairMOT pose_dla_conv layouts) against written references."""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dla_fast
from dla_fast.models import VARIANTS, ModulatedDeformConv3x3, bilinear_upsample, build_dla

from helpers import assert_close, randomize_bn

pytest.importorskip("torchvision")

COCO_HEADS = {"hm": 80, "wh": 2, "reg": 2}
CENTERNET_COCO_DLA34_PARAMS = 20_188_892  # ctdet_coco_dla_2x.pth, counted with its unused base.fc and projects
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ------------------------------------------------------------------------------------ layout, keys and loading

def _bn_keys(prefix, width):
    return [(f"{prefix}.{b}", () if b == "num_batches_tracked" else (width,)) for b in BN_KEYS]


def _ida_conv_keys(prefix, c_in, c_out, dcn):
    """CenterNet's DeformConv (actf registered before conv) or FairMOT's plain-conv variant."""
    keys = _bn_keys(f"{prefix}.actf.0", c_out)
    if dcn:
        keys += [(f"{prefix}.conv.weight", (c_out, c_in, 3, 3)), (f"{prefix}.conv.bias", (c_out,)),
                 (f"{prefix}.conv.conv_offset_mask.weight", (27, c_in, 3, 3)),
                 (f"{prefix}.conv.conv_offset_mask.bias", (27,))]
    else:
        keys += [(f"{prefix}.conv.weight", (c_out, c_in, 3, 3))]
    return keys


def _ida_keys(prefix, out, widths, factors, dcn):
    keys = []
    for i in range(1, len(widths)):
        keys += _ida_conv_keys(f"{prefix}.proj_{i}", widths[i], out, dcn)
        keys += [(f"{prefix}.up_{i}.weight", (out, 1, 2 * factors[i], 2 * factors[i]))]
        keys += _ida_conv_keys(f"{prefix}.node_{i}", out, out, dcn)
    return keys


def _expected_head_keys(dcn, heads=COCO_HEADS, head_conv=256):
    """Ordered (key, shape) of CenterNet's dla34 network after the backbone, written from pose_dla_dcn.py."""
    keys = _ida_keys("dla_up.ida_0", 256, [256, 512], [1, 2], dcn)
    keys += _ida_keys("dla_up.ida_1", 128, [128, 256, 256], [1, 2, 2], dcn)
    keys += _ida_keys("dla_up.ida_2", 64, [64, 128, 128, 128], [1, 2, 2, 2], dcn)
    keys += _ida_keys("ida_up", 64, [64, 128, 256], [1, 2, 4], dcn)
    for name, classes in heads.items():
        keys += [(f"{name}.0.weight", (head_conv, 64, 3, 3)), (f"{name}.0.bias", (head_conv,)),
                 (f"{name}.2.weight", (classes, head_conv, 1, 1)), (f"{name}.2.bias", (classes,))]
    return keys


@pytest.mark.parametrize("dcn", [True, False], ids=["dcn", "conv"])
def test_state_dict_follows_the_centernet_layout(dcn):
    model = dla_fast.create_model("centernet_dla34", dcn=dcn)
    sd = model.state_dict()
    base = {f"base.{k}": tuple(v.shape)
            for k, v in build_dla("dla34", features_only=True, out_indices=range(6)).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in sd.items() if k.startswith("base.")} == base
    assert [(k, tuple(v.shape)) for k, v in sd.items() if not k.startswith("base.")] == _expected_head_keys(dcn)


def _centernet_extras():
    """Keys a CenterNet COCO checkpoint has and our model does not build: base.fc and ucbdrive's unused projects."""
    extras = {"base.fc.weight": torch.randn(1000, 512, 1, 1), "base.fc.bias": torch.randn(1000)}
    for level, (c_in, c_out) in (("level3", (64, 128)), ("level4", (128, 256))):
        extras[f"base.{level}.project.0.weight"] = torch.randn(c_out, c_in, 1, 1)
        for key, shape in _bn_keys(f"base.{level}.project.1", c_out):
            extras[key] = torch.tensor(3) if key.endswith("num_batches_tracked") else torch.rand(shape) + 0.5
    return extras


def test_parameter_count_matches_centernet_coco():
    model = dla_fast.create_model("centernet_dla34")
    ours = sum(p.numel() for p in model.parameters())
    extras = _centernet_extras()
    unused = sum(v.numel() for k, v in extras.items() if k.rsplit(".", 1)[1] in ("weight", "bias"))
    assert unused == 513_000 + 41_728  # base.fc (512 -> 1000) and level3/level4.project (conv + BN affine)
    assert ours + unused == CENTERNET_COCO_DLA34_PARAMS


def test_centernet_checkpoint_loads_strictly_and_reports_ignored_keys():
    src = randomize_bn(dla_fast.create_model("centernet_dla34"))
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    extras = _centernet_extras()
    assert not set(extras) & set(src.state_dict())
    checkpoint = {"epoch": 140, "state_dict": {**src.state_dict(), **extras}}  # CenterNet's save_model format

    model = dla_fast.create_model("centernet_dla34")
    report = dla_fast.load_checkpoint(model, checkpoint, verbose=False)
    assert report.ignored == sorted(extras) and report.missing == []
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_initialisation_follows_centernet():
    model = dla_fast.create_model("centernet_dla34")
    assert torch.equal(model.hm[2].bias, torch.full((80,), -2.19))
    for name in ("wh", "reg"):
        head = getattr(model, name)
        assert not head[0].bias.any() and not head[2].bias.any()
    for name, m in model.named_modules():
        if isinstance(m, ModulatedDeformConv3x3):
            assert not m.conv_offset_mask.weight.any() and not m.conv_offset_mask.bias.any(), name
            assert not m.bias.any() and m.weight.abs().max() <= 1 / math.sqrt(m.weight.shape[1] * 9), name
        if ".up_" in name:
            f = m.stride[0]
            assert torch.equal(m.weight, bilinear_upsample(m.in_channels, f).weight), name


# ---------------------------------------------------------------------------------- deformable conv reference

def modulated_deform_conv3x3_reference(x, offset, mask, weight, bias):
    """DCNv2 3x3 (stride 1, pad 1) with grid_sample: tap k = 3i + j reads x at (y - 1 + i + offset[2k],
    x - 1 + j + offset[2k + 1]) bilinearly (zero outside), scaled by mask[k]. Sides must be >= 2."""
    n, _, h, w = x.shape
    rows = torch.arange(h, dtype=x.dtype).view(1, h, 1)
    cols = torch.arange(w, dtype=x.dtype).view(1, 1, w)
    out = bias.view(1, -1, 1, 1).expand(n, -1, h, w)
    for i in range(3):
        for j in range(3):
            k = 3 * i + j
            sample_y = rows - 1 + i + offset[:, 2 * k]
            sample_x = cols - 1 + j + offset[:, 2 * k + 1]
            grid = torch.stack([2 * sample_x / (w - 1) - 1, 2 * sample_y / (h - 1) - 1], dim=-1)
            taps = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            out = out + torch.einsum("oc,nchw->nohw", weight[:, :, i, j], taps * mask[:, k:k + 1])
    return out


def _randomize_offsets(model, scale=1.0):
    """Random conv_offset_mask weights giving offsets of about `scale` pixels, so sampling is off the grid."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ModulatedDeformConv3x3):
                fan_in = m.conv_offset_mask.in_channels * 9
                m.conv_offset_mask.weight.normal_(0, scale / math.sqrt(fan_in))
                m.conv_offset_mask.bias.normal_(0, scale)
                m.bias.normal_(0, 0.1)
    return model


def test_modulated_deform_conv_matches_the_reference():
    layer = _randomize_offsets(ModulatedDeformConv3x3(5, 7), scale=2.0)
    x = torch.randn(2, 5, 9, 11, requires_grad=True)
    out = layer(x)
    om = F.conv2d(x, layer.conv_offset_mask.weight, layer.conv_offset_mask.bias, padding=1)
    o1, o2, mask = torch.chunk(om, 3, dim=1)  # CenterNet's DCN forward
    ref = modulated_deform_conv3x3_reference(x, torch.cat([o1, o2], 1), torch.sigmoid(mask), layer.weight, layer.bias)
    assert out.shape == (2, 7, 9, 11)
    assert_close(out, ref, 1e-5, "deformable conv output")
    grad = torch.randn_like(out)
    inputs = [x, layer.weight, layer.bias, layer.conv_offset_mask.weight, layer.conv_offset_mask.bias]
    for name, g, r in zip(["x", "weight", "bias", "offset weight", "offset bias"],
                          torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        assert_close(g, r, 1e-4, f"grad of {name}")


# ---------------------------------------------------------------------------------- forward against a reference

def reference_centernet(model, x, training, dcn):
    """CenterNet's DLASeg forward in torch.nn.functional, with its in-place IDAUp(layers, startp, endp), reading
    `model`'s weights by CenterNet's keys. The backbone is `model.base` (tested against timm)."""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())

    def ida_conv(prefix, t):
        if dcn:
            om = F.conv2d(t, params[f"{prefix}.conv.conv_offset_mask.weight"],
                          params[f"{prefix}.conv.conv_offset_mask.bias"], padding=1)
            o1, o2, mask = torch.chunk(om, 3, dim=1)
            t = modulated_deform_conv3x3_reference(t, torch.cat([o1, o2], 1), torch.sigmoid(mask),
                                                   params[f"{prefix}.conv.weight"], params[f"{prefix}.conv.bias"])
        else:
            t = F.conv2d(t, params[f"{prefix}.conv.weight"], padding=1)
        bn = f"{prefix}.actf.0"
        return F.relu(F.batch_norm(t, buffers[f"{bn}.running_mean"], buffers[f"{bn}.running_var"],
                                   params[f"{bn}.weight"], params[f"{bn}.bias"], training, 0.1, 1e-5))

    def ida_up(prefix, layers, startp, endp):
        for i in range(startp + 1, endp):
            t = ida_conv(f"{prefix}.proj_{i - startp}", layers[i])
            f = layers[i - 1].shape[-1] // t.shape[-1]
            t = F.conv_transpose2d(t, params[f"{prefix}.up_{i - startp}.weight"], stride=f, padding=f // 2,
                                   groups=t.shape[1])
            layers[i] = ida_conv(f"{prefix}.node_{i - startp}", t + layers[i - 1])

    first_level = int(math.log2(model.down_ratio))
    layers = model.base(x)  # all six levels, as CenterNet's DLAUp receives them
    out = [layers[-1]]
    for i in range(len(layers) - first_level - 1):
        ida_up(f"dla_up.ida_{i}", layers, len(layers) - i - 2, len(layers))
        out.insert(0, layers[-1])
    y = [t.clone() for t in out[:5 - first_level]]
    ida_up("ida_up", y, 0, len(y))
    return {name: F.conv2d(F.relu(F.conv2d(y[-1], params[f"{name}.0.weight"], params[f"{name}.0.bias"], padding=1)),
                           params[f"{name}.2.weight"], params[f"{name}.2.bias"])
            for name in model.heads}


def _perturbed_centernet(dcn, down_ratio=4, heads=None):
    # dla46_c: the same network code as dla34 at a quarter of the width, so the float64 checks stay fast
    model = randomize_bn(dla_fast.create_model("centernet_dla46_c", dcn=dcn, down_ratio=down_ratio,
                                               heads=heads or {"hm": 3, "wh": 2}, head_conv=24))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".up_" in name:  # break the bilinear symmetry so a flipped or transposed kernel shows
                p.add_(torch.rand_like(p) * 0.3)
    return _randomize_offsets(model)


@pytest.mark.parametrize("dcn", [True, False], ids=["dcn", "conv"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_forward_backward_and_bn_stats_match_the_reference(dcn, training):
    """In float64, so the comparison checks the wiring and is tight: in fp32, the rounding of torchvision's
    deformable conv (checked against the reference above) and grid_sample's differ by ~1e-7 per layer, which 16
    layers and batch-statistics BN on 2x2 maps grow to ~1e-5."""
    model = _perturbed_centernet(dcn).double().train(training)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for step in range(2 if training else 1):
        xm, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        (outs,), ref_outs = model(xm), reference_centernet(ref, xr, training, dcn)
        assert list(outs) == ["hm", "wh"]
        loss, ref_loss = 0, 0
        for name, out in outs.items():
            assert out.shape == ref_outs[name].shape == (2, model.heads[name], 16, 16)
            assert_close(out, ref_outs[name], 1e-10, f"head {name}, step {step}")
            g = torch.randn_like(out)
            loss, ref_loss = loss + (out * g).sum(), ref_loss + (ref_outs[name] * g).sum()
        loss.backward()
        ref_loss.backward()
        assert_close(xm.grad, xr.grad, 1e-10, "input gradient")
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            if training and name.endswith(".conv.bias"):  # feeds batch-statistics BN, which cancels it: grad 0
                scale = ref_params[name[:-len("bias")] + "weight"].grad.abs().max()
                assert max(p.grad.abs().max(), ref_params[name].grad.abs().max()) < 1e-12 * scale, name
            else:
                assert_close(p.grad, ref_params[name].grad, 1e-10, f"grad of {name}")
        model.zero_grad(), ref.zero_grad()
    ref_buffers = dict(ref.named_buffers())
    for name, b in model.named_buffers():
        if b.dtype.is_floating_point:
            assert_close(b, ref_buffers[name], 1e-10, name)
        else:  # the reference's functional BN of the neck does not count batches; its backbone is the module
            steps = 2 if training and not name.startswith("base.") else 0
            assert b.item() == ref_buffers[name].item() + steps, name


def test_every_parameter_gets_a_gradient():
    model = dla_fast.create_model("centernet_dla34", head_conv=32).train()  # as built: zero offsets, bilinear ups
    (outs,) = model(torch.randn(2, 3, 64, 64))
    sum((out * torch.randn_like(out)).sum() for out in outs.values()).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(p.requires_grad for p in model.parameters()) and None not in grads.values()
    for name, g in grads.items():
        if name.endswith(".conv.bias"):  # the deformable conv's bias feeds batch-statistics BN: exactly cancelled
            assert g.abs().max() < 1e-5 * grads[name[:-len("bias")] + "weight"].abs().max(), name
        else:
            assert g.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------- shapes and errors

@pytest.mark.parametrize("dcn", [True, False], ids=["dcn", "conv"])
@pytest.mark.parametrize("down_ratio", [2, 4, 8])
def test_output_shapes_and_strides(down_ratio, dcn):
    model = dla_fast.create_model("centernet_dla34", dcn=dcn, down_ratio=down_ratio, head_conv=16).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 96))
    assert isinstance(outs, list) and len(outs) == 1
    assert {k: tuple(v.shape) for k, v in outs[0].items()} == {
        name: (2, classes, 64 // down_ratio, 96 // down_ratio) for name, classes in COCO_HEADS.items()}
    width = (16, 32, 64, 128, 256, 512)[int(math.log2(down_ratio))]
    assert model.hm[0].in_channels == width and model.ida_up.out_channels == width


def test_single_conv_heads_and_other_backbones():
    assert dla_fast.list_models("centernet_*") == sorted(f"centernet_{v}" for v in VARIANTS)
    model = dla_fast.create_model("centernet_dla46_c", heads={"hm": 2, "hm_hp": 4, "wh": 3}, head_conv=0,
                                  dcn=False).eval()
    assert torch.equal(model.hm.bias, torch.full((2,), -2.19))
    assert torch.equal(model.hm_hp.bias, torch.full((4,), -2.19))
    assert not model.wh.bias.any() and set(model.state_dict()) >= {"hm.weight", "hm_hp.bias", "wh.weight"}
    with torch.no_grad():
        (outs,) = model(torch.randn(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in outs.items()} == {"hm": (2, 2, 16, 16), "hm_hp": (2, 4, 16, 16),
                                                            "wh": (2, 3, 16, 16)}


@pytest.mark.parametrize("shape, message", [
    ((3, 64, 64), "4-D image batch"),
    ((2, 4, 64, 64), "expects 3 input channels; got 4"),
    ((2, 3, 48, 64), "divisible by 32.*48x64"),
])
def test_bad_input_is_a_clear_error(shape, message):
    model = dla_fast.create_model("centernet_dla34", dcn=False).eval()
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


@pytest.mark.parametrize("kwargs, message", [
    (dict(down_ratio=1), r"down_ratio must be one of \(2, 4, 8, 16\); got 1"),
    (dict(heads={}), "at least one head"),
    (dict(heads={"base": 3}), "head name 'base'"),
    (dict(heads={"heads": 3}), "head name 'heads'"),
    (dict(heads={"hm.0": 3}), "head name 'hm.0'"),
])
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dla_fast.create_model("centernet_dla34", dcn=False, **kwargs)


def test_works_without_torchvision_when_dcn_is_off():
    script = (
        "import sys; sys.modules['torchvision'] = None\n"
        "import torch, dla_fast\n"
        "(out,) = dla_fast.create_model('centernet_dla34', dcn=False).eval()(torch.randn(1, 3, 64, 64))\n"
        "assert out['hm'].shape == (1, 80, 16, 16)\n"
        "try:\n"
        "    dla_fast.create_model('centernet_dla34')\n"
        "except ImportError as e:\n"
        "    assert 'dcn=False' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('dcn=True built without torchvision')\n"
    )
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(dla_fast.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
