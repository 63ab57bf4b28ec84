"""dla_fast.detection decoding against faithful re-implementations of CenterNet's ctdet_decode +
ctdet_post_process, FairMOT's mot_decode (+ its re-ID gather) and CenterTrack's generic_decode
(dla_fast/detection/reference.py), on random and adversarial heatmaps, backends 'torch' and 'triton'
(the interpreter on CPU)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dla_fast
from dla_fast import detection
from dla_fast.detection import aot as detection_aot
from dla_fast.detection.transforms import centernet_geometry, letterbox_geometry

from dla_fast.detection import reference as ref
from helpers import poisoned_allocations

pytestmark = pytest.mark.interpreter
BACKENDS = ["torch", "triton"]
C, H, W = 3, 7, 9


def _heatmap(kind: str, b: int) -> torch.Tensor:
    """Scores in [0, 1] (after the sigmoid), or the adversarial cases."""
    if kind == "random":
        return torch.rand(b, C, H, W)
    if kind == "ties":  # few distinct values: ties between and within classes, plateaus of equal neighbours
        return torch.randint(0, 4, (b, C, H, W)).float() / 4
    if kind == "plateau":  # 2x2 blocks of equal values: every plateau pixel is a peak
        return torch.rand(b, C, (H + 1) // 2, (W + 1) // 2).repeat_interleave(2, 2).repeat_interleave(2, 3)[
            :, :, :H, :W].contiguous()
    if kind == "sparse":  # fewer peaks than K: the rest of the top-K are tied zeros
        heat = torch.zeros(b, C, H, W)
        heat[:, 0, 2, 3] = 0.9
        heat[:, 2, 5, 1] = 0.4
        return heat
    if kind == "equal":  # all-equal map: every position is a peak, all tie
        return torch.full((b, C, H, W), 0.5)
    raise ValueError(kind)


def _heads(b: int, cat_spec: bool = False, ltrb: bool = False):
    channels = 4 if ltrb else (2 * C if cat_spec else 2)
    wh = torch.rand(b, channels, H, W) * 6 - 1  # some negative sizes (CenterTrack clamps them)
    reg = torch.rand(b, 2, H, W)
    return wh, reg


KINDS = ["random", "ties", "plateau", "sparse", "equal"]


@pytest.mark.parametrize("implementation", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("b", [1, 3])
def test_ctdet_decode_equals_centernet(implementation, kind, b):
    heat = _heatmap(kind, b)
    wh, reg = _heads(b)
    K = 20
    expected = ref.ctdet_decode(heat, wh, reg, K=K)
    with dla_fast.use_backend(implementation), poisoned_allocations():
        out = detection.ctdet_decode(heat, wh, reg, K=K)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("implementation", BACKENDS)
@pytest.mark.parametrize("b", [1, 3])
def test_ctdet_decode_variants(implementation, b):
    """No reg (centre + 0.5), class-specific wh, fp16 heads, channels_last heads, K = H * W."""
    heat = _heatmap("ties", b)
    wh, _ = _heads(b, cat_spec=True)
    with dla_fast.use_backend(implementation):
        for K in (5, H * W):
            torch.testing.assert_close(detection.ctdet_decode(heat, wh, None, cat_spec_wh=True, K=K),
                                       ref.ctdet_decode(heat, wh, None, cat_spec_wh=True, K=K), rtol=0, atol=0)
        heat16, wh16, reg16 = heat.half(), _heads(b)[0].half(), torch.rand(b, 2, H, W).half()
        torch.testing.assert_close(detection.ctdet_decode(heat16, wh16, reg16, K=10),
                                   ref.ctdet_decode(heat16, wh16, reg16, K=10), rtol=0, atol=0)
        wh, reg = _heads(b)
        out = detection.ctdet_decode(heat, wh.contiguous(memory_format=torch.channels_last),
                                     reg.contiguous(memory_format=torch.channels_last), K=10)
        torch.testing.assert_close(out, ref.ctdet_decode(heat, wh, reg, K=10), rtol=0, atol=0)


@pytest.mark.parametrize("implementation", BACKENDS)
@pytest.mark.parametrize("b", [1, 3])
def test_fused_sigmoid_equals_sigmoid_then_decode(implementation, b):
    logits = torch.randn(b, C, H, W) * 3
    logits[:, 1, 2:4, 2:4] = 0.7  # a plateau of equal logits
    wh, reg = _heads(b)
    expected = ref.ctdet_decode(logits.sigmoid(), wh, reg, K=15)
    with dla_fast.use_backend(implementation):
        out = detection.ctdet_decode(logits, wh, reg, K=15, logits=True)
        dets, inds = detection.mot_decode(logits, wh, reg, K=15, logits=True)
    # the kernel's sigmoid is 1 / (1 + exp(-x)) in fp32: within an ulp of torch.sigmoid's
    torch.testing.assert_close(out, expected, rtol=2e-7, atol=0)
    torch.testing.assert_close(dets, expected, rtol=2e-7, atol=0)


@pytest.mark.parametrize("implementation", BACKENDS)
@pytest.mark.parametrize("kind,b,ltrb", [("random", 1, False), ("ties", 3, False), ("sparse", 3, True),
                                         ("equal", 1, True)])
def test_mot_decode_equals_fairmot(implementation, kind, b, ltrb):
    heat = _heatmap(kind, b)
    wh, reg = _heads(b, ltrb=ltrb)
    ids = torch.randn(b, 12, H, W)
    expected, expected_inds = ref.mot_decode(heat, wh, reg, ltrb=ltrb, K=10)
    with dla_fast.use_backend(implementation), poisoned_allocations():
        dets, inds = detection.mot_decode(heat, wh, reg, ltrb=ltrb, K=10)
        embeddings = detection.gather_embeddings(ids, inds)
    torch.testing.assert_close(dets, expected, rtol=0, atol=0)
    torch.testing.assert_close(inds, expected_inds, rtol=0, atol=0)
    torch.testing.assert_close(embeddings, ref.fairmot_embeddings(ids, expected_inds), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("implementation", BACKENDS)
@pytest.mark.parametrize("kind", ["random", "ties", "equal"])
@pytest.mark.parametrize("b", [1, 3])
def test_centertrack_decode_equals_generic_decode(implementation, kind, b):
    heat = _heatmap(kind, b)
    wh, reg = _heads(b)
    output = {"hm": heat, "wh": wh, "reg": reg, "tracking": torch.randn(b, 2, H, W)}
    expected = ref.generic_decode({k: v.clone() for k, v in output.items()}, K=12)
    with dla_fast.use_backend(implementation):
        out = detection.centertrack_decode(output, K=12)
    for key in ("scores", "clses", "xs", "ys", "cts", "bboxes", "tracking", "inds"):
        torch.testing.assert_close(out[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("implementation", BACKENDS)
@pytest.mark.parametrize("b", [1, 3])
def test_boxes_in_image_coordinates_equal_post_process(implementation, b):
    """decode(..., to_image) == ctdet_post_process's transform_preds (CenterNet geometry) and CenterTrack's
    transform_preds_with_trans of centre + tracking (minus the centre)."""
    heat = _heatmap("random", b)
    wh, reg = _heads(b)
    tracking = torch.randn(b, 2, H, W)
    sizes = [(57, 83), (90, 40), (33, 33)][:b]
    geometries = [centernet_geometry(h, w, (H * 4, W * 4)) for h, w in sizes]
    to_image = torch.tensor(np.stack([g.to_image for g in geometries]))
    with dla_fast.use_backend(implementation):
        decoded = detection.decode(heat, wh, reg, K=10, tracking=tracking, to_image=to_image)
    dets = ref.ctdet_decode(heat, wh, reg, K=10).numpy()
    expected = ref.ctdet_post_process_boxes(dets, [g.center for g in geometries], [g.scale for g in geometries],
                                            H, W)
    np.testing.assert_allclose(decoded.boxes.numpy(), expected[..., :4], rtol=1e-6, atol=1e-5)
    generic = ref.generic_decode({"hm": heat, "wh": wh, "reg": reg, "tracking": tracking}, K=10)
    for i, g in enumerate(geometries):
        trans = ref.get_affine_transform(g.center, g.scale, 0, (W, H), inv=1).astype(np.float32)
        cts = generic["cts"][i].numpy()
        moved = ref.transform_preds_with_trans(generic["tracking"][i].numpy() + cts, trans)
        expected_tracking = moved - ref.transform_preds_with_trans(cts, trans)
        np.testing.assert_allclose(decoded.tracking[i].numpy(), expected_tracking, rtol=1e-5, atol=1e-4)


def test_geometry_matches_centernet_and_fairmot():
    for h, w in [(57, 83), (90, 40), (480, 640)]:
        g = centernet_geometry(h, w, (64, 96))
        np.testing.assert_allclose(g.warp, ref.get_affine_transform(g.center, g.scale, 0, [96, 64]), rtol=1e-12,
                                   atol=1e-9)
        np.testing.assert_allclose(g.to_image, ref.get_affine_transform(g.center, g.scale, 0, [24, 16], inv=1),
                                   rtol=1e-12, atol=1e-9)
        lb = letterbox_geometry(h, w, (64, 96))
        _, meta = ref.fairmot_pre_process(np.zeros((h, w, 3), np.uint8), 64, 96)
        assert lb.scale == meta["s"] and np.array_equal(lb.center, meta["c"])


@pytest.mark.parametrize("implementation", BACKENDS)
def test_nan_heatmap_rejected(implementation):
    heat = torch.rand(2, C, H, W)
    heat[1, 2, 3, 4] = float("nan")
    wh, reg = _heads(2)
    with dla_fast.use_backend(implementation):
        with pytest.raises(ValueError, match="heat: the heatmap holds NaN"):
            detection.ctdet_decode(heat, wh, reg, K=5)
        with pytest.raises(ValueError, match="heat: the heatmap holds NaN"):
            detection.mot_decode(heat, wh, reg, K=5, logits=True)


def test_bad_arguments_named():
    heat = torch.rand(1, C, H, W)
    wh, reg = _heads(1)
    with pytest.raises(ValueError, match="K=64: larger than"):
        detection.ctdet_decode(heat, wh, reg, K=64)
    with pytest.raises(ValueError, match="wh: expected 6 channels"):
        detection.ctdet_decode(heat, wh, reg, cat_spec_wh=True, K=5)
    with pytest.raises(ValueError, match="reg: shape"):
        detection.ctdet_decode(heat, wh, reg[:, :, :3], K=5)
    with pytest.raises(ValueError, match="heat: expected a floating-point"):
        detection.ctdet_decode(heat.long(), wh, reg, K=5)


@pytest.mark.slow
def test_detection_kernels_compile_for_sm90_without_spills(tmp_path):
    """Every detection kernel configuration compiles for Hopper (no GPU needed) with no register spills."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(dla_fast.__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    proc = subprocess.run([sys.executable, "-m", "dla_fast.detection.aot"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count("registers") == len(detection_aot.configurations()), proc.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_kernels_equal_the_peers_on_cuda(kind):
    """On the GPU: the kernels against the peers' code run on the same GPU (torch.topk's CUDA tie order); then
    CenterNet's shapes (80 classes, 128x128, K 100) from fp32 and bf16 logits, the sigmoid fused."""
    heat = _heatmap(kind, 3).cuda()
    wh, reg = (t.cuda() for t in _heads(3))
    with dla_fast.use_backend("triton"):
        torch.testing.assert_close(detection.ctdet_decode(heat, wh, reg, K=20), ref.ctdet_decode(heat, wh, reg, K=20),
                                   rtol=0, atol=0)
        logits = torch.randn(2, 80, 128, 128, device="cuda") * 3
        wh, reg = torch.rand(2, 2, 128, 128, device="cuda") * 50, torch.rand(2, 2, 128, 128, device="cuda")
        for dtype in (torch.float32, torch.bfloat16):
            x = logits.to(dtype)
            expected = ref.ctdet_decode(x.sigmoid(), wh, reg, K=100)
            out = detection.ctdet_decode(x, wh, reg, K=100, logits=True)
            # the kernel's sigmoid (exp on the GPU) may differ from torch's by an ulp: scores within 1e-6
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6, msg=str(dtype))
