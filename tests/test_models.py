"""The reference DLA zoo equals timm: same keys, parameters, outputs, gradients and BN statistics."""
import pytest
import torch

import dla_fast
from dla_fast.models import PARAM_COUNTS, Tree

from helpers import assert_close, randomize_bn

timm = pytest.importorskip("timm")

VARIANTS = dla_fast.list_models("dla*")
VARIANTS = [v for v in VARIANTS if v in PARAM_COUNTS]


def test_all_twelve_variants_registered():
    assert sorted(PARAM_COUNTS) == sorted(VARIANTS) and len(VARIANTS) == 12


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_count_equals_timm(name):
    ours = sum(p.numel() for p in dla_fast.create_model(name).parameters())
    theirs = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
    assert ours == theirs == PARAM_COUNTS[name]


def _pair(name, **kwargs):
    """A timm model with random weights and BN statistics, and ours loaded from it strictly."""
    ref = randomize_bn(timm.create_model(name, pretrained=False, **kwargs))
    ours = dla_fast.create_model(name, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("name", VARIANTS)
def test_eval_and_train_parity_with_timm(name):
    ours, ref = _pair(name, num_classes=10)
    x = torch.randn(2, 3, 64, 64)

    ours.eval(), ref.eval()
    with torch.no_grad():
        assert_close(ours(x), ref(x), 1e-5, "eval logits")

    ours.train(), ref.train()
    for step in range(2):
        xo = x.clone().requires_grad_(True)
        xr = x.clone().requires_grad_(True)
        out_o, out_r = ours(xo), ref(xr)
        assert_close(out_o, out_r, 1e-5, f"train logits, step {step}")
        grad = torch.randn_like(out_r)
        out_o.backward(grad)
        out_r.backward(grad)
        assert_close(xo.grad, xr.grad, 1e-4, "input gradient")
        ref_params = dict(ref.named_parameters())
        for pname, p in ours.named_parameters():
            assert_close(p.grad, ref_params[pname].grad, 1e-4, f"grad of {pname}")
        ours.zero_grad(), ref.zero_grad()
    ref_buffers = dict(ref.named_buffers())
    for bname, b in ours.named_buffers():
        if b.dtype.is_floating_point:
            assert_close(b, ref_buffers[bname], 1e-5, bname)
        else:
            assert torch.equal(b, ref_buffers[bname]), bname


def test_features_only_matches_timm():
    ref = randomize_bn(timm.create_model("dla34", pretrained=False, features_only=True)).eval()
    ours = dla_fast.create_model("dla34", features_only=True).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs, refs = ours(x), ref(x)
    assert [o.shape[1] for o in outs] == [32, 64, 128, 256, 512]
    assert [64 // o.shape[-1] for o in outs] == [2, 4, 8, 16, 32]
    for o, r in zip(outs, refs):
        assert_close(o, r, 1e-5, "feature map")


def test_out_indices_select_levels():
    model = dla_fast.create_model("dla46_c", features_only=True, out_indices=(0, 5)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 16, 64, 64), (1, 256, 2, 2)]
    with pytest.raises(ValueError, match="out_indices"):
        dla_fast.create_model("dla34", features_only=True, out_indices=(6,))


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'dla35'.*Did you mean.*dla34.*Known models:.*dla169"):
        dla_fast.create_model("dla35")


@pytest.mark.parametrize("shape, message", [
    ((3, 64, 64), "4-D image batch"),
    ((1, 1, 64, 64), "expects 3 input channels; got 1"),
    ((1, 3, 64, 48), "divisible by 32.*64x48"),
])
def test_bad_input_is_a_clear_error(shape, message):
    model = dla_fast.create_model("dla34").eval()
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


def _ucbdrive_state_dict(model):
    """timm's keys plus the `project` layers ucbdrive builds (unused) in trees with levels > 1."""
    sd = dict(model.state_dict())
    extra = []
    for name, module in model.named_modules():
        if isinstance(module, Tree) and module.levels > 1:
            inc = _tree_in_channels(module)
            outc = _tree_out_channels(module)
            if inc != outc:
                sd[f"{name}.project.0.weight"] = torch.randn(outc, inc, 1, 1)
                for buf, value in (("weight", torch.rand(outc)), ("bias", torch.randn(outc)),
                                   ("running_mean", torch.randn(outc)), ("running_var", torch.rand(outc) + 0.5),
                                   ("num_batches_tracked", torch.tensor(7))):
                    sd[f"{name}.project.1.{buf}"] = value
                extra.append(f"{name}.project")
    return sd, extra


def _tree_in_channels(tree):
    while isinstance(tree, Tree):
        tree = tree.tree1
    return tree.conv1.in_channels


def _tree_out_channels(tree):
    while tree.root is None:
        tree = tree.tree2
    return tree.root.conv.out_channels


def test_ucbdrive_layout_loads_and_reports_ignored_keys(tmp_path, capsys):
    src = randomize_bn(dla_fast.create_model("dla34"))
    sd, extra = _ucbdrive_state_dict(src)
    assert extra == ["level3.project", "level4.project"]
    path = tmp_path / "dla34-ucbdrive.pth"
    torch.save(sd, path)

    model = dla_fast.create_model("dla34")
    report = dla_fast.load_checkpoint(model, path)
    assert sorted({k.rsplit(".project", 1)[0] + ".project" for k in report.ignored}) == extra
    assert len(report.ignored) == 2 * 6 and report.missing == []
    assert "ignored 12 keys" in capsys.readouterr().out
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_training_checkpoint_wrapped_with_module_prefix(tmp_path):
    src = randomize_bn(dla_fast.create_model("dla46_c"))
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    model = dla_fast.create_model("dla46_c")
    report = dla_fast.load_checkpoint(model, path, verbose=False)
    assert report.ignored == [] and report.missing == []
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), src.eval()(x))
    # the same through a {'model': ...} wrapper, passed as a dict
    report = dla_fast.load_checkpoint(dla_fast.create_model("dla46_c"), {"model": src.state_dict()}, verbose=False)
    assert len(report.loaded) == len(src.state_dict())


def test_checkpoint_of_another_variant_names_the_mismatch():
    sd = dla_fast.create_model("dla46x_c").state_dict()
    with pytest.raises(dla_fast.CheckpointMismatch, match=r"looks like dla46x_c(.|\n)*level2\.tree1\.conv1\.weight: "
                                                          r"checkpoint \(64, 32, 1, 1\) vs model \(32, 32, 1, 1\)"):
        dla_fast.load_checkpoint(dla_fast.create_model("dla46_c"), sd)
    sd = dla_fast.create_model("dla60").state_dict()
    with pytest.raises(dla_fast.CheckpointMismatch, match="looks like dla60"):
        dla_fast.load_checkpoint(dla_fast.create_model("dla102"), sd)


def test_missing_checkpoint_file():
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        dla_fast.load_checkpoint(dla_fast.create_model("dla34"), "no_such.pth")
