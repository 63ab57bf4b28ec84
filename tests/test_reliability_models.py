"""Clear errors where a user reaches the models: constructor arguments, and load_checkpoint's messages for files
that are no checkpoint, checkpoints that do not fit (with the create_model call that fits) and NaN/Inf weights."""
import argparse
import io
import pickle
import sys
import types
import warnings
import zipfile

import pytest
import torch

import dla_fast
from dla_fast.models import CheckpointMismatch, UnreadableCheckpoint
from dla_fast.models.centernet import check_heads

# ------------------------------------------------------------------------------------------ constructor arguments


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_classes=-5), r"num_classes must be an int >= 0; got -5"),
    (dict(num_classes=1.5), r"num_classes must be an int >= 0; got 1.5 \(float\)"),
    (dict(num_classes=True), r"num_classes must be an int >= 0; got True \(bool\)"),
    (dict(num_classes="10"), r"num_classes must be an int >= 0; got '10'"),
    (dict(in_chans=0), r"in_chans must be an int >= 1; got 0"),
    (dict(in_chans=3.0), r"in_chans must be an int >= 1; got 3.0"),
    (dict(cardinality=0), r"cardinality must be an int >= 1"),
    (dict(features_only="no"), r"features_only must be True or False; got 'no'"),
    (dict(features_only=True, out_indices=(1.5,)), r"out_indices must be .*got \(1.5,\)"),
    (dict(features_only=True, out_indices=(True,)), r"out_indices must be .*got \(True,\)"),
    (dict(features_only=True, out_indices=(6,)), r"out_indices must be .*in -6..5.*got \(6,\)"),
    (dict(features_only=True, out_indices=(-7,)), r"out_indices must be .*got \(-7,\)"),
    (dict(features_only=True, out_indices=0), r"out_indices must be an int 1..6 \(the last n levels\).*got 0"),
    (dict(features_only=True, out_indices=7), r"out_indices must be .*got 7"),
    (dict(features_only=True, out_indices=(1, 1)), r"increasing, without repeats; got \(1, 1\)"),
    (dict(features_only=True, out_indices=(3, 1)), r"increasing, without repeats; got \(3, 1\)"),
    (dict(features_only=True, out_indices=(1, -5)), r"got \(1, -5\) \(levels \[1, 1\]\)"),
    (dict(features_only=True, out_indices="12"), r"out_indices must be .*got '12'"),
    (dict(features_only=True, out_indices=()), r"out_indices must be .*got \(\)"),
])
def test_dla_constructor_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dla_fast.create_model("dla34", **kwargs)


def test_model_names_are_checked():
    with pytest.raises(TypeError, match="the model name must be a str such as 'dla34'; got None"):
        dla_fast.create_model(None)
    with pytest.raises(ValueError, match="unknown model 'DLA34'. Did you mean dla34"):
        dla_fast.create_model("DLA34")


def test_out_indices_follow_timm_for_ints_and_negative_indices():
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 32, 32)
    for out_indices in (2, (0, -2)):
        ours = dla_fast.create_model("dla46_c", features_only=True, out_indices=out_indices).eval()
        ref = timm.create_model("dla46_c", pretrained=False, features_only=True, out_indices=out_indices).eval()
        # timm drops the levels after the last one taken; ours keeps them (random, unused)
        assert not ours.load_state_dict(ref.state_dict(), strict=False).unexpected_keys
        with torch.no_grad():
            got, want = ours(x), ref(x)
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want)), out_indices
    assert dla_fast.create_model("dla46_c", features_only=True, out_indices=2).out_indices == (4, 5)


def test_num_classes_zero_is_a_backbone_without_classifier():
    model = dla_fast.create_model("dla46_c", num_classes=0).eval()
    assert "fc.weight" not in model.state_dict()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 256)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_classes=0), r"num_classes must be an int >= 1; got 0"),
    (dict(num_classes=2.5), r"num_classes must be an int >= 1; got 2.5"),
    (dict(down_ratio=4.0), r"down_ratio must be one of \(2, 4, 8, 16\); got 4.0"),
    (dict(down_ratio=True), r"down_ratio must be one of \(2, 4, 8, 16\); got True"),
    (dict(in_chans=0), r"in_chans must be an int >= 1; got 0"),
])
def test_dla_up_constructor_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dla_fast.create_model("dla34up", **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(heads={"hm": 0}), r"heads\['hm'\] must be an int >= 1; got 0"),
    (dict(heads={"hm": 80, "wh": -2}), r"heads\['wh'\] must be an int >= 1; got -2"),
    (dict(heads={"hm": 1.5}), r"heads\['hm'\] must be an int >= 1; got 1.5"),
    (dict(heads={"hm": True}), r"heads\['hm'\] must be an int >= 1; got True"),
    (dict(heads=["hm", "wh"]), r"heads must be a dict of at least one head"),
    (dict(heads={"2d": 3}), r"head name '2d' must be a Python identifier"),
    (dict(head_conv=-1), r"head_conv must be an int >= 0; got -1"),
    (dict(head_conv=64.0), r"head_conv must be an int >= 0; got 64.0"),
    (dict(dcn="yes"), r"dcn must be True or False; got 'yes'"),
    (dict(down_ratio=4.0), r"down_ratio must be one of \(2, 4, 8, 16\); got 4.0"),
    (dict(in_chans=0), r"in_chans must be an int >= 1; got 0"),
])
def test_centernet_constructor_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dla_fast.create_model("centernet_dla34", **kwargs)


def test_check_heads_accepts_what_centernet_builds():
    check_heads({"hm": 1, "wh": 2}, 0)
    model = dla_fast.create_model("centernet_dla46_c", heads={"hm": 1, "wh": 2}, head_conv=0, dcn=False).eval()
    with torch.no_grad():
        (out,) = model(torch.randn(1, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"hm": (1, 1, 8, 8), "wh": (1, 2, 8, 8)}


# ---------------------------------------------------------------------------- files that are not checkpoints


def _torch_zip_bytes():
    buffer = io.BytesIO()
    torch.save({"weight": torch.randn(3)}, buffer)
    return buffer.getvalue()


def _write_not_checkpoints(folder):
    """name -> (path, words the message must hold) for files that are no checkpoint."""
    files = {
        "text.pth": (b"hello world\n", "a text file starting with 'hello world'"),
        "empty.pth": (b"", "an empty file"),
        "page.pth": (b"<!DOCTYPE html><html><body>Sign in</body></html>", "an HTML page"),
        "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 87319819\n",
                    "Git LFS pointer"),
        "truncated.pth": (_torch_zip_bytes()[:300], "damaged or truncated zip archive"),
        "plain.pkl": (pickle.dumps({"weight": [1.0, 2.0]}, protocol=4),
                      "a Python pickle that torch.save did not write"),
        "bad.safetensors": (b"\x00\x01garbage" * 3, "is not a safetensors file"),
    }
    out = {}
    for name, (content, words) in files.items():
        (folder / name).write_bytes(content)
        out[name] = (folder / name, words)
    with zipfile.ZipFile(folder / "other.zip", "w") as archive:
        archive.writestr("notes.txt", "not weights")
    out["other.zip"] = (folder / "other.zip", "a zip archive but not a torch.save checkpoint (it holds notes.txt")
    return out


def test_files_that_are_no_checkpoint_say_what_they_are(tmp_path):
    model = dla_fast.create_model("dla46_c")
    for name, (path, words) in _write_not_checkpoints(tmp_path).items():
        for weights_only in (True, False):  # the same answer whatever weights_only: never a hint to flip it
            with pytest.raises(UnreadableCheckpoint) as error:
                dla_fast.load_checkpoint(model, path, weights_only=weights_only, verbose=False)
            message = str(error.value)
            assert str(path) in message and words in message, (name, message)
            assert "weights_only=False" not in message, (name, message)


def test_weights_only_hint_only_where_it_works(tmp_path):
    src = dla_fast.create_model("dla46_c")
    path = tmp_path / "train.pth"
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": src.state_dict()}, path)
    model = dla_fast.create_model("dla46_c")
    with pytest.raises(UnreadableCheckpoint, match=r"train.pth is a torch.save checkpoint that holds Python objects "
                                                   r"besides tensors \(Unsupported global: GLOBAL argparse.Namespace\)"
                                                   r".*pass weights_only=False"):
        dla_fast.load_checkpoint(model, path, verbose=False)
    report = dla_fast.load_checkpoint(model, path, weights_only=False, verbose=False)  # the hint works
    assert len(report.loaded) == len(src.state_dict())
    # a whole pickled module (torch.save(model)) loads the same way
    torch.save(src, tmp_path / "module.pth")
    report = dla_fast.load_checkpoint(dla_fast.create_model("dla46_c"), tmp_path / "module.pth", weights_only=False,
                                      verbose=False)
    assert report.missing == [] and len(report.loaded) == len(src.state_dict())
    # ... unless its classes cannot be imported here
    gone = types.ModuleType("gone_training_code")
    exec("class Trainer:\n    pass", gone.__dict__)
    sys.modules["gone_training_code"] = gone
    try:
        torch.save({"trainer": gone.Trainer(), "state_dict": src.state_dict()}, tmp_path / "gone.pth")
    finally:
        del sys.modules["gone_training_code"]
    with pytest.raises(UnreadableCheckpoint, match=r"gone.pth pickles Python objects whose classes cannot be imported "
                                                   r"here \(No module named 'gone_training_code'\)"):
        dla_fast.load_checkpoint(dla_fast.create_model("dla46_c"), tmp_path / "gone.pth", weights_only=False)


def test_safetensors_and_torch_files_are_told_apart_by_content(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    src = dla_fast.create_model("dla46_c")
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    safetensors_torch.save_file(state, tmp_path / "weights.safetensors")
    safetensors_torch.save_file(state, tmp_path / "weights_safetensors.pth")
    torch.save(state, tmp_path / "torch_save.safetensors")
    for name in ("weights.safetensors", "weights_safetensors.pth", "torch_save.safetensors"):
        model = dla_fast.create_model("dla46_c")
        dla_fast.load_checkpoint(model, tmp_path / name, verbose=False)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), name


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        dla_fast.load_checkpoint(dla_fast.create_model("dla46_c"), tmp_path)


# ----------------------------------------------------------------------- checkpoints that do not fit the model


def _mismatch(model, state_dict):
    with pytest.raises(CheckpointMismatch) as error:
        dla_fast.load_checkpoint(model, state_dict, verbose=False)
    return str(error.value)


def _loads(call_kwargs, name, state_dict):
    """The suggested create_model call really loads the checkpoint."""
    report = dla_fast.load_checkpoint(dla_fast.create_model(name, **call_kwargs), state_dict, verbose=False)
    assert report.missing == []


def test_other_classifier_size_says_num_classes():
    sd = dla_fast.create_model("dla46_c", num_classes=10).state_dict()
    message = _mismatch(dla_fast.create_model("dla46_c"), sd)
    assert "the checkpoint's classifier has 10 classes and the model's 1000" in message
    assert "dla_fast.create_model('dla46_c', num_classes=10)" in message
    assert "num_classes=0 loads the backbone" in message
    assert "looks like" not in message and "fc.weight: checkpoint (10, 256, 1, 1) vs model (1000, 256, 1, 1)" in message
    _loads(dict(num_classes=10), "dla46_c", sd)
    _loads(dict(num_classes=0), "dla46_c", sd)


def test_backbone_checkpoint_without_classifier_says_num_classes_0():
    sd = dla_fast.create_model("dla46_c", num_classes=0).state_dict()
    message = _mismatch(dla_fast.create_model("dla46_c"), sd)
    assert "no classifier" in message and "create_model('dla46_c', num_classes=0)" in message


def test_other_input_channels_say_in_chans():
    sd = dla_fast.create_model("dla46_c", in_chans=1).state_dict()
    message = _mismatch(dla_fast.create_model("dla46_c"), sd)
    assert "takes 1 input channels and the model 3" in message and "create_model('dla46_c', in_chans=1)" in message
    _loads(dict(in_chans=1), "dla46_c", sd)
    # a backbone without classifier keeps being one in the suggested call (the file's classifier is ignored)
    message = _mismatch(dla_fast.create_model("dla46_c", features_only=True), sd)
    assert "classes" not in message and "create_model('dla46_c', in_chans=1, features_only=True)" in message


def test_another_variant_with_other_classes_gives_the_full_call():
    sd = dla_fast.create_model("dla46x_c", num_classes=7).state_dict()
    message = _mismatch(dla_fast.create_model("dla46_c"), sd)
    assert "looks like dla46x_c" in message and "create_model('dla46x_c', num_classes=7)" in message
    _loads(dict(num_classes=7), "dla46x_c", sd)


def test_dla_up_classes_say_num_classes():
    sd = dla_fast.create_model("dla46_cup", num_classes=3).state_dict()
    message = _mismatch(dla_fast.create_model("dla46_cup"), sd)
    assert "classifier has 3 classes and the model's 19" in message
    assert "create_model('dla46_cup', num_classes=3)" in message


@pytest.mark.parametrize("saved_dcn", [True, False])
def test_centernet_dcn_checkpoint_says_dcn(saved_dcn):
    pytest.importorskip("torchvision")  # the deformable model, saved or loaded
    sd = dla_fast.create_model("centernet_dla46_c", dcn=saved_dcn).state_dict()
    message = _mismatch(dla_fast.create_model("centernet_dla46_c", dcn=not saved_dcn), sd)
    kind = "deformable (CenterNet's DCN" if saved_dcn else "plain 3x3 convs (FairMOT's pose_dla_conv"
    assert f"the checkpoint's IDA convs are {kind}" in message, message
    assert f"create_model('centernet_dla46_c', dcn={saved_dcn})" in message, message
    _loads(dict(dcn=saved_dcn), "centernet_dla46_c", sd)


def test_centernet_heads_say_heads_and_head_conv():
    heads = {"hm": 1, "wh": 2, "id": 128}  # a FairMOT-like head set
    sd = dla_fast.create_model("centernet_dla46_c", heads=heads, head_conv=64, dcn=False).state_dict()
    message = _mismatch(dla_fast.create_model("centernet_dla46_c", dcn=False), sd)
    assert f"the checkpoint's heads are {heads} (head_conv 64)" in message
    assert f"create_model('centernet_dla46_c', dcn=False, heads={heads}, head_conv=64)" in message
    _loads(dict(heads=heads, head_conv=64, dcn=False), "centernet_dla46_c", sd)


def test_unrelated_state_dict_says_no_key_is_shared():
    message = _mismatch(dla_fast.create_model("dla46_c"), {"encoder.weight": torch.randn(4, 4)})
    assert "none of its 1 tensors has a key of the model (its first keys: encoder.weight)" in message
    assert "Build the model" not in message


# ---------------------------------------------------------------------------------------- NaN and Inf weights


def test_non_finite_tensors_are_loaded_with_a_warning_naming_them(capsys):
    sd = dla_fast.create_model("dla46_c").state_dict()
    sd["level5.root.bn.running_var"][:3] = float("nan")
    sd["fc.bias"][0] = float("-inf")
    model = dla_fast.create_model("dla46_c")
    with pytest.warns(RuntimeWarning, match=r"2 tensor\(s\) of the given state dict hold NaN or Inf .*"
                                            r"level5.root.bn.running_var \(3 of 256 values\), "
                                            r"fc.bias \(1 of 1000 values\)"):
        report = dla_fast.load_checkpoint(model, sd)
    assert report.non_finite == ["fc.bias", "level5.root.bn.running_var"]
    assert "2 loaded tensors hold NaN or Inf: fc.bias, level5.root.bn.running_var" in capsys.readouterr().out
    assert model.level5.root.bn.running_var[:3].isnan().all() and model.fc.bias[0] == float("-inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finite checkpoint loads without a word
        assert dla_fast.load_checkpoint(model, dla_fast.create_model("dla46_c").state_dict(),
                                        verbose=False).non_finite == []
