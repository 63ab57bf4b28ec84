"""dla_fast.detection.preprocess against the peers' OpenCV + numpy pre-processing (dla_fast/detection/reference.py):
CenterNet's warpAffine + normalize and FairMOT's letterbox, within the stated bound (one uint8 level, and at
least 95% of values exact), for a batch tensor and a list of differently sized images, backends 'torch' and
'triton' (the interpreter on CPU)."""
import numpy as np
import pytest
import torch

import dla_fast
from dla_fast.detection.preprocess import COCO_MEAN, COCO_STD, preprocess

from dla_fast.detection import reference as ref
from helpers import poisoned_allocations

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (the peers' pre-processing) is not installed")
pytestmark = pytest.mark.interpreter
BACKENDS = ["torch", "triton"]
MEAN = np.array(COCO_MEAN, dtype=np.float32).reshape(1, 1, 3)
STD = np.array(COCO_STD, dtype=np.float32).reshape(1, 1, 3)


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    images = []
    for h, w in sizes:  # random pixels with a smooth part: both sharp and gentle interpolation cases
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ramp = (np.add.outer(np.arange(h) * 7, np.arange(w) * 3)[..., None] + np.array([0, 40, 90])) % 256
        images.append(np.where(rng.random((h, w, 1)) < 0.5, noise, ramp).astype(np.uint8))
    return images


def _check_bound(out: np.ndarray, expected: np.ndarray, level: np.ndarray, what: str) -> None:
    """|out - expected| <= one uint8 level (per channel: level[c]) everywhere, and >= 95% of values exact."""
    assert out.shape == expected.shape, what
    diff = np.abs(out.astype(np.float64) - expected.astype(np.float64))
    bound = level.reshape(1, 3, 1, 1) * (1 + 1e-5)
    assert (diff <= bound).all(), f"{what}: max difference {diff.max():.3g} exceeds one uint8 level"
    exact = (diff == 0).mean()
    assert exact >= 0.95, f"{what}: only {exact:.4f} of values equal OpenCV's"


@pytest.mark.parametrize("implementation", BACKENDS)
def test_centernet_affine_equals_opencv(implementation):
    sizes = [(23, 37), (40, 29), (16, 24)]  # wider, taller, and exactly the input size
    images = _images(sizes)
    expected = np.concatenate([ref.centernet_pre_process(im, 16, 24, mean=MEAN, std=STD)[0] for im in images])
    with dla_fast.use_backend(implementation), poisoned_allocations():
        out, geometries = preprocess(images, "centernet", input_size=(16, 24))
    _check_bound(out.numpy(), expected, 1 / (255 * STD.reshape(3)), "list of sizes")
    for g, im in zip(geometries, images):
        meta = ref.centernet_pre_process(im, 16, 24)[1]
        assert g.scale == meta["s"] and np.array_equal(g.center, meta["c"])
    same = np.stack(_images([(30, 41)] * 2, seed=1))
    expected = np.concatenate([ref.centernet_pre_process(im, 16, 16, mean=MEAN, std=STD)[0] for im in same])
    with dla_fast.use_backend(implementation):
        out, _ = preprocess(torch.from_numpy(same), "centernet", input_size=(16, 16))
    _check_bound(out.numpy(), expected, 1 / (255 * STD.reshape(3)), "batch tensor")


@pytest.mark.parametrize("implementation", BACKENDS)
def test_fairmot_letterbox_equals_opencv(implementation):
    # non-integer downscales (OpenCV's general area path), an integer one (its fast path) and no scaling
    sizes = [(25, 35), (23, 17), (32, 48), (16, 24)]
    images = _images(sizes, seed=2)
    expected = np.concatenate([ref.fairmot_pre_process(im, 16, 24)[0] for im in images])
    with dla_fast.use_backend(implementation), poisoned_allocations():
        out, _ = preprocess(images, "fairmot", input_size=(16, 24))
    _check_bound(out.numpy(), expected, np.full(3, 1 / 255), "letterbox")


def test_torch_and_triton_paths_agree_exactly():
    images = _images([(21, 35), (35, 21)], seed=3)
    for mode in ("centernet", "fairmot"):
        with dla_fast.use_backend("torch"):
            expected, _ = preprocess(images, mode, input_size=(16, 16))
        with dla_fast.use_backend("triton"):
            out, _ = preprocess(images, mode, input_size=(16, 16))
        torch.testing.assert_close(out, expected, rtol=0, atol=0, msg=mode)


def test_bad_images_named():
    with pytest.raises(ValueError, match=r"images\[1\]: expected uint8"):
        preprocess([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.float32)], input_size=(8, 8))
    with pytest.raises(ValueError, match=r"images\[0\]: expected an \(H, W, 3\)"):
        preprocess([np.zeros((8, 8), np.uint8)], input_size=(8, 8))
    with pytest.raises(ValueError, match="smaller than the letterbox"):
        preprocess([np.zeros((8, 8, 3), np.uint8)], "fairmot", input_size=(16, 16))
    with pytest.raises(ValueError, match="mode 'yolo'"):
        preprocess([np.zeros((8, 8, 3), np.uint8)], "yolo", input_size=(8, 8))


@pytest.mark.cuda
def test_cuda_preprocess_equals_opencv_within_the_bound():
    images = _images([(480, 640), (720, 1280)], seed=4)
    expected = np.concatenate([ref.centernet_pre_process(im, 512, 512, mean=MEAN, std=STD)[0] for im in images])
    out, _ = preprocess([torch.from_numpy(im).cuda() for im in images], "centernet", input_size=(512, 512))
    _check_bound(out.cpu().numpy(), expected, 1 / (255 * STD.reshape(3)), "centernet on cuda")
    expected = np.concatenate([ref.fairmot_pre_process(im, 320, 576)[0] for im in images])
    out, _ = preprocess(images, "fairmot", input_size=(320, 576), device="cuda")
    _check_bound(out.cpu().numpy(), expected, np.full(3, 1 / 255), "fairmot on cuda")
