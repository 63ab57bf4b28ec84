"""dla_fast's backbones against timm's DLA: the same pretrained_cfg (so timm's data pipeline resolves the same),
feature_info, forward_intermediates, classifier methods, gradient checkpointing, torch.hub entry points, and the
recipe for loading timm's weight files (written here from timm.create_model(..., pretrained=False): no network)."""
import copy
import os

import numpy as np
import pytest
import torch

import dla_fast
from dla_fast.models import VARIANTS

from helpers import assert_close, randomize_bn

timm = pytest.importorskip("timm")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timm_pair(name="dla34", **kwargs):
    """(timm's model, dla_fast's with timm's weights loaded), both in eval mode, random BatchNorm statistics."""
    ref = randomize_bn(timm.create_model(name, pretrained=False, **kwargs)).eval()
    ours = dla_fast.create_model(name, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pretrained_cfg_is_timms(variant):
    with torch.device("meta"):  # no weights allocated
        model = dla_fast.create_model(variant)
        centernet = dla_fast.create_model(f"centernet_{variant}", dcn=False)
        centertrack = dla_fast.create_model(f"centertrack_{variant}", dcn=False)
    expected = timm.models.get_pretrained_cfg(variant).to_dict()
    for backbone in (model, centernet.base, centertrack.base):
        assert backbone.pretrained_cfg == expected and backbone.default_cfg == expected
        assert timm.data.resolve_data_config(model=backbone) == timm.data.resolve_data_config(
            pretrained_cfg=expected)
    model.pretrained_cfg["crop_pct"] = 1.0  # each model has its own copy
    with torch.device("meta"):
        assert dla_fast.create_model(variant).pretrained_cfg["crop_pct"] == 0.875


def test_timm_users_script():
    """What a timm user does first: data config and transform, a new classifier, gradient checkpointing and a
    training step, torch.hub from a local checkout."""
    from PIL import Image

    ref = timm.create_model("dla34", pretrained=False)
    model = dla_fast.create_model("dla34")
    config = timm.data.resolve_data_config(model=model)
    assert config == timm.data.resolve_data_config(model=ref)
    assert config["interpolation"] == "bilinear" and config["crop_pct"] == 0.875
    transform = timm.data.create_transform(**config)
    ref_transform = timm.data.create_transform(**timm.data.resolve_data_config(model=ref))
    assert repr(transform) == repr(ref_transform)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 270, 3), dtype=np.uint8))
    assert torch.equal(transform(image), ref_transform(image))

    model.reset_classifier(10)
    assert model.get_classifier().out_channels == 10 and model.num_classes == 10
    randomize_bn(model).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing()
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([3, 7])
    losses = []
    for m in (model, checkpointed):
        loss = torch.nn.functional.cross_entropy(m(x), target)
        loss.backward()
        losses.append(loss)
    assert_close(losses[1], losses[0], 1e-6, "loss")
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        assert_close(q.grad, p.grad, 1e-5, f"gradient of {name}")
    for (name, b), c in zip(model.named_buffers(), checkpointed.buffers()):  # running statistics moved once
        assert_close(c.float(), b.float(), 1e-6, name)

    hub = torch.hub.load(ROOT, "dla34", source="local", num_classes=7)
    assert isinstance(hub, dla_fast.models.DLA) and hub.num_classes == 7
    assert hub.state_dict().keys() == dla_fast.create_model("dla34", num_classes=7).state_dict().keys()
    with pytest.raises(ValueError, match="pretrained=True is not supported"):
        torch.hub.load(ROOT, "dla34", source="local", pretrained=True)


def test_hubconf_lists_every_model():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", os.path.join(ROOT, "hubconf.py"))
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert hubconf.dependencies == ["torch"]
    assert all(callable(getattr(hubconf, name)) for name in dla_fast.list_models())


def test_loading_timm_weight_files(tmp_path):
    """The recipe of the README: timm's published files (pytorch_model.bin / model.safetensors) load strictly."""
    from safetensors.torch import save_file

    ref = randomize_bn(timm.create_model("dla34", pretrained=False)).eval()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = ref(x)
        for name in ("pytorch_model.bin", "model.safetensors"):
            model = dla_fast.create_model("dla34")
            report = dla_fast.load_checkpoint(model, tmp_path / name, verbose=False)
            assert report.missing == [] and len(report.loaded) == len(ref.state_dict())
            model.eval()
            assert_close(model(x), expected, 1e-5, name)
            assert timm.data.resolve_data_config(model=model) == timm.data.resolve_data_config(model=ref)


def test_features_and_intermediates_equal_timms():
    ref, ours = timm_pair("dla46_c")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for indices in (None, 3, [1, 3], [-1]):
            for stop_early in (False, True):
                final, inter = ours.forward_intermediates(x, indices=indices, stop_early=stop_early)
                ref_final, ref_inter = ref.forward_intermediates(x, indices=indices, stop_early=stop_early)
                assert len(inter) == len(ref_inter)
                for a, b in zip([final] + inter, [ref_final] + ref_inter):
                    assert_close(a, b, 1e-5, f"indices {indices}, stop_early {stop_early}")
        only = ours.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape[1] for t in only] == [128, 256]
        assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                     ref.forward_head(ref.forward_features(x), pre_logits=True), 1e-5, "pre_logits")
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW'"):
        ours.forward_intermediates(x, output_fmt="NHWC")
    assert ours.group_matcher() == ref.group_matcher() and ours.group_matcher(True) == ref.group_matcher(True)

    for out_indices in ((1, 2, 3, 4, 5), (2, 4)):
        timm_features = timm.create_model("dla46_c", features_only=True, out_indices=out_indices)
        features = dla_fast.create_model("dla46_c", features_only=True, out_indices=out_indices)
        for accessor in ("channels", "reduction", "module_name", "get_dicts"):
            assert getattr(features.feature_info, accessor)() == getattr(timm_features.feature_info, accessor)()
        assert features.feature_info.channels(0) == 16 and len(features.feature_info) == 6
    assert [dict(num_chs=f["num_chs"], reduction=f["reduction"], module=f["module"]) for f in ours.feature_info] \
        == ref.feature_info  # the classifier's: timm's list of every level


def test_reset_classifier_equals_timms():
    ref, ours = timm_pair("dla46_c")
    x = torch.randn(2, 3, 32, 32)
    for num_classes, pool in ((10, None), (0, None), (5, "")):
        ref.reset_classifier(num_classes, pool)
        ours.reset_classifier(num_classes, pool)
        if num_classes:
            ours.fc.load_state_dict(ref.fc.state_dict())
        assert ours.state_dict().keys() == ref.state_dict().keys()
        assert ours.fc.training == ours.training
        with torch.no_grad():
            assert_close(ours(x), ref(x), 1e-5, f"reset_classifier({num_classes}, {pool!r})")
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        ours.reset_classifier(-1)
    with pytest.raises(ValueError, match="global_pool must be"):
        ours.reset_classifier(3, "max")
    features = dla_fast.create_model("dla46_c", features_only=True)
    with pytest.raises(RuntimeError, match="features_only=True and has no classifier head"):
        features.reset_classifier(3)
    with pytest.raises(ValueError, match="enable must be True or False"):
        ours.set_grad_checkpointing("yes")


@pytest.mark.interpreter
@pytest.mark.slow
def test_grad_checkpointing_with_accelerate_equals_eager():
    """A training step of an accelerated model (backend triton: the aggregation nodes' kernels, forward and
    backward, in the interpreter; the other op kinds left out to keep it short) with gradient checkpointing equals
    the same step without it."""
    model = randomize_bn(dla_fast.create_model("dla46_c", num_classes=4)).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing()
    x = torch.randn(2, 3, 32, 32)
    with dla_fast.use_backend("triton"):
        for m in (model, checkpointed):
            dla_fast.accelerate(m, include="aggregate")
            m(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        assert_close(q.grad, p.grad, 1e-5, f"gradient of {name}")
    for (name, b), c in zip(model.named_buffers(), checkpointed.buffers()):
        assert_close(c.float(), b.float(), 1e-6, name)
