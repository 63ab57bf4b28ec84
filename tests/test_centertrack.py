"""CenterTrack's tracking network (xingyizhou/CenterTrack dla.py + base_model.py layout) against written references.

The reference of the previous-frame branches is written here with torch.nn.functional; the rest of the network is
CenterNet's (tested in test_centernet.py), run module by module from a CenterNet model holding the same weights.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dla_fast
from dla_fast.models import VARIANTS, CenterNet
from dla_fast.nn import folded as folded_module

from helpers import assert_close, randomize_bn

pytest.importorskip("torchvision")

HEADS = {"hm": 3, "reg": 2, "wh": 2, "tracking": 2}
BRANCHES = ("pre_img", "pre_hm")
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ------------------------------------------------------------------------------------ layout, keys and loading

def _bn(prefix, width):
    return [(f"{prefix}.{b}", () if b == "num_batches_tracked" else (width,)) for b in BN_KEYS]


def _conv_bn(prefix, c_out, c_in, k):
    """A Sequential(conv, BN[, ReLU]): keys `<prefix>.0.weight` and `<prefix>.1.*`."""
    return [(f"{prefix}.0.weight", (c_out, c_in, k, k))] + _bn(f"{prefix}.1", c_out)


def _basic_block(prefix, c_in, c_out):
    return ([(f"{prefix}.conv1.weight", (c_out, c_in, 3, 3))] + _bn(f"{prefix}.bn1", c_out)
            + [(f"{prefix}.conv2.weight", (c_out, c_out, 3, 3))] + _bn(f"{prefix}.bn2", c_out))


def _tree1(prefix, c_in, c_out, root_in):
    """A levels-1 Tree: two BasicBlocks, a Root taking `root_in` channels, a projection when widths differ."""
    keys = _basic_block(f"{prefix}.tree1", c_in, c_out) + _basic_block(f"{prefix}.tree2", c_out, c_out)
    keys += [(f"{prefix}.root.conv.weight", (c_out, root_in, 1, 1))] + _bn(f"{prefix}.root.bn", c_out)
    if c_in != c_out:
        keys += [(f"{prefix}.project.0.weight", (c_out, c_in, 1, 1))] + _bn(f"{prefix}.project.1", c_out)
    return keys


def _dla34_base_keys():
    """CenterTrack's `base` of DLA-34 (its dla.py DLA with opt.pre_img and opt.pre_hm), without the keys that
    only its checkpoints carry (`base.fc.*`, the unused projections of the levels-2 trees: `_extras`)."""
    keys = _conv_bn("base.base_layer", 16, 3, 7) + _conv_bn("base.level0", 16, 16, 3)
    keys += _conv_bn("base.level1", 32, 16, 3)
    keys += _tree1("base.level2", 32, 64, 128)
    keys += _tree1("base.level3.tree1", 64, 128, 256) + _tree1("base.level3.tree2", 128, 128, 448)  # + bottom, x1
    keys += _tree1("base.level4.tree1", 128, 256, 512) + _tree1("base.level4.tree2", 256, 256, 896)
    keys += _tree1("base.level5", 256, 512, 1280)
    keys += _conv_bn("base.pre_img_layer", 16, 3, 7) + _conv_bn("base.pre_hm_layer", 16, 1, 7)
    return keys


def _deform_conv(prefix, c_in, c_out):
    """CenterTrack's DeformConv: `actf` = (BN, ReLU), `conv` = DCN with bias and its conv_offset_mask."""
    return _bn(f"{prefix}.actf.0", c_out) + [
        (f"{prefix}.conv.weight", (c_out, c_in, 3, 3)), (f"{prefix}.conv.bias", (c_out,)),
        (f"{prefix}.conv.conv_offset_mask.weight", (27, c_in, 3, 3)), (f"{prefix}.conv.conv_offset_mask.bias", (27,))]


def _ida(prefix, out, widths, factors):
    keys = []
    for i in range(1, len(widths)):
        keys += _deform_conv(f"{prefix}.proj_{i}", widths[i], out)
        keys += [(f"{prefix}.up_{i}.weight", (out, 1, 2 * factors[i], 2 * factors[i]))]
        keys += _deform_conv(f"{prefix}.node_{i}", out, out)
    return keys


def centertrack_dla34_keys(heads, head_conv):
    """(key, shape) of CenterTrack's `dla_34` tracking model (--dla_node dcn, --pre_hm, num_head_conv 1)."""
    keys = _dla34_base_keys()
    keys += _ida("dla_up.ida_0", 256, [256, 512], [1, 2]) + _ida("dla_up.ida_1", 128, [128, 256, 256], [1, 2, 2])
    keys += _ida("dla_up.ida_2", 64, [64, 128, 128, 128], [1, 2, 2, 2]) + _ida("ida_up", 64, [64, 128, 256], [1, 2, 4])
    for name, classes in heads.items():
        keys += [(f"{name}.0.weight", (head_conv, 64, 3, 3)), (f"{name}.0.bias", (head_conv,)),
                 (f"{name}.2.weight", (classes, head_conv, 1, 1)), (f"{name}.2.bias", (classes,))]
    return keys


def _random_tensor(key, shape):
    if key.endswith("num_batches_tracked"):
        return torch.randint(1, 1000, ())
    if key.endswith("running_var"):
        return torch.rand(shape) + 0.5
    return torch.randn(shape)


def _extras():
    """Keys of a CenterTrack checkpoint its model does not use: the ImageNet classifier its DLA loaded
    (`base.fc`) and the projections its Tree builds for levels-2 trees too."""
    keys = [("base.fc.weight", (1000, 512, 1, 1)), ("base.fc.bias", (1000,))]
    keys += _conv_bn("base.level3.project", 128, 64, 1) + _conv_bn("base.level4.project", 256, 128, 1)
    return {k: _random_tensor(k, s) for k, s in keys}


def test_centertrack_checkpoint_loads_strictly(tmp_path):
    """A MOT17-style CenterTrack model (1 class, ltrb_amodal), saved as CenterTrack's save_model does."""
    heads = {"hm": 1, "reg": 2, "wh": 2, "tracking": 2, "ltrb_amodal": 4}
    model = dla_fast.create_model("centertrack_dla34", heads=heads, head_conv=256)
    expected = centertrack_dla34_keys(heads, 256)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == dict(expected)
    state_dict = {k: _random_tensor(k, s) for k, s in expected}
    extras = _extras()
    path = tmp_path / "mot17_half.pth"
    torch.save({"epoch": 70, "state_dict": {**state_dict, **extras}}, path)

    report = dla_fast.load_checkpoint(model, path, verbose=False)
    assert report.ignored == sorted(extras) and report.missing == []
    loaded = model.state_dict()
    for k, v in state_dict.items():
        assert torch.equal(loaded[k], v), k

    without_hm_branch = dla_fast.create_model("centertrack_dla34", heads=heads, head_conv=256, pre_hm=False)
    with pytest.raises(dla_fast.CheckpointMismatch, match=r"unexpected key base\.pre_hm_layer\.0\.weight"):
        dla_fast.load_checkpoint(without_hm_branch, path)


def test_a_centertrack_checkpoint_given_to_centernet_is_recognised():
    with torch.device("meta"):
        state_dict = dla_fast.create_model("centertrack_dla34").state_dict()
        detector = dla_fast.create_model("centernet_dla34")
    with pytest.raises(dla_fast.CheckpointMismatch,
                       match=r"(?s)looks like centertrack_dla34\..*unexpected key base\.pre_img_layer\.0\.weight"):
        dla_fast.load_checkpoint(detector, state_dict)


def test_initialisation_and_registry_follow_centertrack():
    model = dla_fast.create_model("centertrack_dla34", head_conv=8)
    assert isinstance(model, CenterNet) and model.variant == "centertrack_dla34"
    assert model.heads == {"hm": 80, "reg": 2, "wh": 2, "tracking": 2}
    assert torch.equal(model.hm[2].bias, torch.full((80,), -4.6))  # CenterTrack's prior_bias, not CenterNet's -2.19
    for name in ("reg", "wh", "tracking"):
        head = getattr(model, name)
        assert not head[0].bias.any() and not head[2].bias.any(), name
    for name in ("pre_img_layer", "pre_hm_layer"):
        conv, bn, relu = getattr(model.base, name)
        assert conv.kernel_size == (7, 7) and conv.padding == (3, 3) and conv.stride == (1, 1) and conv.bias is None
        assert bn.momentum == 0.1 and bn.eps == 1e-5 and isinstance(relu, nn.ReLU)
    single = dla_fast.create_model("centertrack_dla34", heads={"hm": 2, "tracking": 2}, head_conv=0, prior_bias=-2.19)
    assert torch.equal(single.hm.bias, torch.full((2,), -2.19)) and not single.tracking.bias.any()
    assert dla_fast.list_models("centertrack_*") == sorted(f"centertrack_{v}" for v in VARIANTS)
    compact = dla_fast.create_model("centertrack_dla46_c", heads={"hm": 1, "tracking": 2}, head_conv=8,
                                    dcn=False, pre_hm=False).eval()
    assert not hasattr(compact.base, "pre_hm_layer")
    with torch.no_grad():
        x, prev = torch.randn(1, 3, 32, 64), torch.randn(1, 3, 32, 64)
        (out,) = compact(x, prev)
        (alone,) = compact(x)
    assert out["tracking"].shape == (1, 2, 8, 16)
    assert (out["tracking"] - alone["tracking"]).abs().max() > 0  # the previous frame matters


# ------------------------------------------------------------------------------- outputs, gradients, BN stats

@pytest.fixture(scope="module")
def tracker():
    """centertrack_dla34 with narrow heads, random BatchNorm statistics, in fp32. Plain 3x3 IDA convs (dcn=False):
    the branches do not depend on the IDA conv type, and torchvision's deformable conv backward is slow on CPU (the
    deformable layout is the checkpoint test's, its numbers test_centernet.py's)."""
    torch.manual_seed(1)
    return randomize_bn(dla_fast.create_model("centertrack_dla34", heads=HEADS, head_conv=8, dcn=False))


def _inputs(batch=2, size=64):
    return {"img": torch.randn(batch, 3, size, size), "pre_img": torch.randn(batch, 3, size, size),
            "pre_hm": torch.rand(batch, 1, size, size)}


@pytest.fixture(scope="module")
def centernet():
    """A CenterNet model of the tracker's shape, for the weights that are not the branches'."""
    return dla_fast.create_model("centernet_dla34", heads=HEADS, head_conv=8, dcn=False)


def _split(tracker, centernet):
    """`centernet` with the tracker's other weights, and the branches' tensors as plain leaves and buffers:
    {branch: dict(weight, gamma, beta, running_mean, running_var, num_batches_tracked)}."""
    sd = tracker.state_dict()
    centernet.load_state_dict({k: v for k, v in sd.items() if ".pre_" not in k})
    centernet.zero_grad(set_to_none=True)
    branches = {}
    for b in BRANCHES:
        p = f"base.{b}_layer"
        branches[b] = dict(weight=sd[f"{p}.0.weight"].clone().requires_grad_(),
                           gamma=sd[f"{p}.1.weight"].clone().requires_grad_(),
                           beta=sd[f"{p}.1.bias"].clone().requires_grad_(),
                           running_mean=sd[f"{p}.1.running_mean"].clone(), running_var=sd[f"{p}.1.running_var"].clone(),
                           num_batches_tracked=sd[f"{p}.1.num_batches_tracked"].clone())
    return centernet, branches


def reference_centertrack(centernet, branches, img, pre_img, pre_hm, training):
    """CenterTrack's DLASeg.forward: base_layer(img) + Σ ReLU(BN(conv7x7(previous input))), levels 0..5, DLA-Up
    (levels 2..5), the last IDA step over its outputs for levels 2..4, the heads."""
    base = centernet.base
    x = base.base_layer(img)
    for b, inp in zip(BRANCHES, (pre_img, pre_hm)):
        if inp is None:
            continue
        p = branches[b]
        y = F.conv2d(inp, p["weight"], None, stride=1, padding=3)
        y = F.batch_norm(y, p["running_mean"], p["running_var"], p["gamma"], p["beta"], training, 0.1, 1e-5)
        if training:
            p["num_batches_tracked"] += 1
        x = x + F.relu(y)
    levels = []
    for i in range(6):
        x = getattr(base, f"level{i}")(x)
        levels.append(x)
    pyramid = centernet.dla_up(levels[2:])
    features = centernet.ida_up(pyramid[:3])[-1]
    return {name: getattr(centernet, name)(features) for name in centernet.heads}


def _branch_tensor(branches, key):
    """The reference tensor of a tracker key `base.<branch>_layer.<i>.<name>`."""
    b, rest = key[len("base."):].split("_layer.")
    index, name = rest.split(".")
    name = {("0", "weight"): "weight", ("1", "weight"): "gamma", ("1", "bias"): "beta"}.get((index, name), name)
    return branches[b][name]


PREVIOUS = [(True, True), (False, False), (False, True)]  # (pre_img given, pre_hm given)


@pytest.mark.parametrize("training, given", [(False, (True, True)), (False, (False, False)), (True, (True, True)),
                                             (True, (False, False)), (True, (False, True))],
                         ids=["eval-both", "eval-none", "train-both", "train-none", "train-pre_hm_only"])
def test_outputs_gradients_and_bn_stats_equal_the_reference(tracker, centernet, training, given):
    """Missing previous-frame inputs skip their branch (CenterTrack's `if pre_img is not None`): its parameters
    get no gradient and its BatchNorm counts no batch."""
    model = copy.deepcopy(tracker).train(training)
    centernet, branches = _split(model, centernet)
    centernet.train(training)
    data = _inputs()
    mine = {k: v.clone().requires_grad_() for k, v in data.items()}
    theirs = {k: v.clone().requires_grad_() for k, v in data.items()}
    use = dict(zip(BRANCHES, given))
    args = [mine[b] if use[b] else None for b in BRANCHES]
    ref_args = [theirs[b] if use[b] else None for b in BRANCHES]

    (outs,) = model(mine["img"], *args)
    ref_outs = reference_centertrack(centernet, branches, theirs["img"], *ref_args, training)
    assert list(outs) == list(HEADS)
    loss, ref_loss = 0, 0
    for name, out in outs.items():
        assert out.shape == (2, HEADS[name], 16, 16)
        assert_close(out, ref_outs[name], 1e-5, f"head {name}")
        g = torch.randn_like(out)
        loss, ref_loss = loss + (out * g).sum(), ref_loss + (ref_outs[name] * g).sum()
    loss.backward()
    ref_loss.backward()

    for k in data:
        if k == "img" or use[k]:
            assert_close(mine[k].grad, theirs[k].grad, 1e-4, f"gradient of {k}")
    ref_params = dict(centernet.named_parameters())
    for name, p in model.named_parameters():
        if ".pre_" in name:
            b = name[len("base."):].split("_layer.")[0]
            if not use[b]:
                assert p.grad is None, f"{name} got a gradient without {b}"
                continue
            ref_grad = _branch_tensor(branches, name).grad
        else:
            ref_grad = ref_params[name].grad
        assert_close(p.grad, ref_grad, 1e-4, f"gradient of {name}")

    ref_buffers = dict(centernet.named_buffers())
    before = tracker.state_dict()
    for name, buf in model.named_buffers():
        expected = _branch_tensor(branches, name) if ".pre_" in name else ref_buffers[name]
        if buf.dtype.is_floating_point:
            assert_close(buf, expected, 1e-5, name)
        else:
            assert torch.equal(buf, expected), name
        if ".pre_" in name:
            b = name[len("base."):].split("_layer.")[0]
            assert torch.equal(buf, before[name]) == (not (training and use[b])), name


# ------------------------------------------------------------------------------------------------ accelerate()

def _run(model, data, given):
    return model(data["img"], *[data[b] if g else None for b, g in zip(BRANCHES, given)])[0]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_accelerated_model_equals_the_original(tracker, training):
    """accelerate() replaces the branches like the base layer. With backend 'torch' (no BatchNorm folding, the
    fused modules' eager references) and the weights' memory format kept, the accelerated model computes what the
    original does, with and without the previous-frame inputs: outputs, gradients (training) and BatchNorm
    statistics. (channels_last convs would sum in another order, which a deep training-mode network amplifies.)"""
    ref = copy.deepcopy(tracker).train(training)
    fused = dla_fast.accelerate(copy.deepcopy(tracker), channels_last=False).train(training)
    swapped = dla_fast.accelerated_modules(fused)
    assert {"base.base_layer", "base.pre_img_layer", "base.pre_hm_layer"} <= set(swapped)
    assert isinstance(fused.base.pre_img_layer, folded_module.FoldedConvBNStack)
    assert fused.state_dict().keys() == ref.state_dict().keys()
    for given in PREVIOUS[:2] if training else PREVIOUS:
        data = _inputs()
        with dla_fast.use_backend("torch"), torch.set_grad_enabled(training):
            outs, ref_outs = _run(fused, data, given), _run(ref, data, given)
        for name in HEADS:
            assert_close(outs[name], ref_outs[name], 1e-5, f"head {name} with {given}")
        if training:
            grads = {name: torch.randn_like(out) for name, out in outs.items()}
            torch.autograd.backward([outs[n] for n in HEADS], [grads[n] for n in HEADS])
            torch.autograd.backward([ref_outs[n] for n in HEADS], [grads[n] for n in HEADS])
    ref_params = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        if training and ref_params[name].grad is not None:
            assert_close(p.grad, ref_params[name].grad, 1e-4, f"gradient of {name}")
        else:
            assert p.grad is None and ref_params[name].grad is None, name
    ref_buffers = dict(ref.named_buffers())
    for name, buf in fused.named_buffers():  # after the training steps: the same BatchNorm statistics
        if buf.dtype.is_floating_point:
            assert_close(buf, ref_buffers[name], 1e-5, name)
        else:
            assert torch.equal(buf, ref_buffers[name]), name


@pytest.mark.interpreter
def test_accelerated_model_folds_the_branches_in_the_interpreter(tracker, monkeypatch):
    """Eval with the Triton backend: every conv + BN of the branches runs folded, the fused roots and IDA steps
    launch their kernels, and the output equals the original model's."""
    from triton.runtime.interpreter import InterpretedFunction

    ref = copy.deepcopy(tracker).eval()
    fused = dla_fast.accelerate(copy.deepcopy(tracker)).eval()
    branch_pairs = [p for b in BRANCHES for p in getattr(fused.base, f"{b}_layer").pairs]
    folded_calls, launches = [], []
    original_call, original_run = folded_module.FoldedConvBN.__call__, InterpretedFunction.run

    def counting_call(self, *args, **kwargs):
        folded_calls.append(self)
        return original_call(self, *args, **kwargs)

    def counting_run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(folded_module.FoldedConvBN, "__call__", counting_call)
    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    data = _inputs(batch=1)
    with torch.no_grad():
        expected = _run(ref, data, (True, True))
        with dla_fast.use_backend("triton"):
            outs = _run(fused, data, (True, True))
    for name in HEADS:
        assert_close(outs[name], expected[name], 1e-5, f"head {name}")
    assert all(sum(c is p for c in folded_calls) == 1 for p in branch_pairs)
    assert "aggregate_fwd_kernel" in launches and "upsample_merge_fwd_kernel" in launches


# ------------------------------------------------------------------------------------------------- bad input

def test_bad_previous_frame_inputs_raise_a_clear_error(tracker):
    img = torch.randn(2, 3, 64, 64)
    bad = {
        "pre_img": [torch.randn(2, 1, 64, 64), torch.randn(2, 3, 32, 64), torch.randn(1, 3, 64, 64),
                    torch.randn(3, 64, 64), img.numpy()],
        "pre_hm": [torch.randn(2, 3, 64, 64), torch.randn(2, 64, 64), torch.randn(2, 1, 64, 32)],
    }
    accelerated = dla_fast.accelerate(copy.deepcopy(tracker), channels_last=False)
    for model in (tracker, accelerated):
        for name, values in bad.items():
            channels = 3 if name == "pre_img" else 1
            for value in values:
                with pytest.raises(ValueError, match=rf"{name} must have shape \(2, {channels}, 64, 64\)"):
                    model(img, **{name: value})
    plain = dla_fast.create_model("centertrack_dla34", heads={"hm": 1}, head_conv=0, dcn=False,
                                  pre_img=False, pre_hm=False)
    assert not any(".pre_" in k for k in plain.state_dict())
    for name, channels in (("pre_img", 3), ("pre_hm", 1)):
        with pytest.raises(ValueError, match=rf"{name} was given, but this model was built without its branch"):
            plain(img, **{name: torch.randn(2, channels, 64, 64)})
