"""Clear errors for bad or unusual input to the public API (each named here was unclear or wrong before)."""
import io
import math
import zipfile

import pytest
import torch

import dla_fast
from dla_fast.models import UnreadableCheckpoint


def _with_damaged_pickle(tmp_path, damage):
    """A torch.save checkpoint of a small model whose data.pkl was changed by `damage(bytes) -> bytes`, rewritten
    as a valid zip (right CRCs): only the pickle is corrupt."""
    buffer = io.BytesIO()
    torch.save(dla_fast.create_model("dla46_c").state_dict(), buffer)
    path = tmp_path / "damaged.pth"
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, damage(data) if info.filename.endswith("data.pkl") else data)
    return path


@pytest.mark.parametrize("damage", [
    lambda d: d[:2] + b"\xff" + d[3:],       # not an opcode
    lambda d: d[:2] + b"\x84" + d[3:],       # EXT4: an opcode torch.save never writes
    lambda d: d[: len(d) // 2],              # cut short
], ids=["bad-opcode", "ext4", "truncated"])
def test_corrupted_checkpoint_pickle_is_reported_damaged_without_unsafe_advice(tmp_path, damage):
    path = _with_damaged_pickle(tmp_path, damage)
    for weights_only in (True, False):
        with pytest.raises(UnreadableCheckpoint) as error:
            dla_fast.load_checkpoint(dla_fast.create_model("dla46_c"), path, weights_only=weights_only)
        message = str(error.value)
        assert "damaged" in message and str(path) in message, message
        assert "weights_only=False" not in message and "besides tensors" not in message, message


def test_accelerate_names_a_bare_fusable_module():
    torchvision = pytest.importorskip("torchvision")
    conv = torchvision.ops.DeformConv2d(4, 4, 3, padding=1)
    with pytest.raises(ValueError, match=r"`model` is itself a fusable DeformConv2d \(it would become a "
                                         r"dla_fast.nn.FusedDeformConv2d\): wrap it"):
        dla_fast.accelerate(conv)
    wrapped = dla_fast.accelerate(torch.nn.Sequential(conv))  # the advice works
    assert type(wrapped[0]).__name__ == "FusedDeformConv2d"
    with pytest.raises(TypeError, match="accelerate: model must be an nn.Module; got str"):
        dla_fast.accelerate("x")


def test_centertrack_previous_frame_dtype_and_device_name_the_argument():
    model = dla_fast.create_model("centertrack_dla46_c", dcn=False, head_conv=0, heads={"hm": 2}).eval()
    img = torch.randn(1, 3, 32, 32)
    for name in ("pre_img", "pre_hm"):
        channels = 3 if name == "pre_img" else 1
        with pytest.raises(ValueError, match=f"{name} must have the image's dtype torch.float32; got torch.float64"):
            model(img, **{name: torch.randn(1, channels, 32, 32, dtype=torch.float64)})
        with pytest.raises(ValueError, match=f"{name} must be on the image's device cpu; got meta"):
            model(img, **{name: torch.empty(1, channels, 32, 32, device="meta")})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "0.1", None])
def test_centertrack_prior_bias_must_be_finite(value):
    with pytest.raises(ValueError, match="prior_bias must be a finite number"):
        dla_fast.create_model("centertrack_dla46_c", dcn=False, prior_bias=value)


def test_wrappers_and_cache_clearing_refuse_a_non_module():
    for wrapper in (dla_fast.CUDAGraphTraining, dla_fast.CUDAGraphInference):
        with pytest.raises(TypeError, match=f"{wrapper.__name__}: model must be an nn.Module; got 'x' \\(str\\)"):
            wrapper("x")
    with pytest.raises(TypeError, match=r"clear_weight_caches: model must be an nn.Module or None; got 'x' \(str\)"):
        dla_fast.clear_weight_caches("x")
    dla_fast.clear_weight_caches()  # None: the ops' caches only
