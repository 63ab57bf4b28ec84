"""dla_fast.Detector / dla_fast.detect: a batch equals each image alone (CenterNet, FairMOT, CenterTrack on a
reduced DLA-46-C network, tiny images), the pieces of the pipeline equal the peers' steps, and bad inputs
are named. The end-to-end bench smoke (every stage's share printed) runs here too."""
import numpy as np
import pytest
import torch

import dla_fast
from dla_fast.cli import main

SIZES = [(40, 56), (48, 36)]
INPUT = (32, 32)


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def _model(kind):
    torch.manual_seed(0)
    if kind == "centernet":
        heads = {"hm": 3, "wh": 2, "reg": 2}
        return dla_fast.create_model("centernet_dla46_c", heads=heads, head_conv=8, dcn=False)
    if kind == "fairmot":
        heads = {"hm": 1, "wh": 4, "reg": 2, "id": 8}
        return dla_fast.create_model("centernet_dla46_c", heads=heads, head_conv=8, dcn=False)
    heads = {"hm": 2, "reg": 2, "wh": 2, "tracking": 2}
    return dla_fast.create_model("centertrack_dla46_c", heads=heads, head_conv=8, dcn=False)


def _assert_same(batched, single, what):
    assert batched.keys() == single.keys(), what
    for key in batched:
        torch.testing.assert_close(batched[key], single[key], rtol=1e-5, atol=1e-4, msg=f"{what}: {key}")


@pytest.mark.parametrize("kind", ["centernet", "fairmot", "centertrack"])
def test_batch_equals_single_images(kind):
    model = _model(kind).eval()
    images = _images()
    extra = {}
    if kind == "centertrack":
        extra = dict(pre_images=_images(seed=1), pre_hms=torch.rand(len(images), 1, *INPUT))
    detector = dla_fast.Detector(model, input_size=INPUT, K=20, threshold=None)
    assert detector.kind == kind
    batched = detector(images, **extra)
    assert len(batched) == len(images)
    for i, image in enumerate(images):
        single_extra = {}
        if kind == "centertrack":
            single_extra = dict(pre_images=[extra["pre_images"][i]], pre_hms=extra["pre_hms"][i:i + 1])
        single = dla_fast.detect(model, [image], K=20, input_size=INPUT, threshold=None, **single_extra)[0]
        _assert_same(batched[i], single, f"{kind} image {i}")
    first = batched[0]
    assert first["boxes"].shape == (20, 4) and first["classes"].dtype == torch.int64
    assert torch.all(first["scores"][:-1] >= first["scores"][1:]), "scores are not best first"
    if kind == "fairmot":
        torch.testing.assert_close(first["embeddings"].norm(dim=1), torch.ones(20))
    if kind == "centertrack":
        assert first["tracking"].shape == (20, 2)


def test_pipeline_steps_equal_the_peers():
    """Detector.decode on the network's raw output equals sigmoid -> ctdet_decode -> ctdet_post_process."""
    from dla_fast.detection import reference as ref

    model = _model("centernet").eval()
    images = _images()[:1]
    detector = dla_fast.Detector(model, input_size=INPUT, K=10)
    batch, geometries = detector.preprocess(images)
    output = detector.network(batch)
    results = detector.decode(output, geometries)
    dets = ref.ctdet_decode(output["hm"].sigmoid(), output["wh"], output["reg"], K=10).numpy()
    expected = ref.ctdet_post_process_boxes(dets, [g.center for g in geometries], [g.scale for g in geometries],
                                            INPUT[0] // 4, INPUT[1] // 4)
    for i, result in enumerate(results):
        np.testing.assert_allclose(result["boxes"].numpy(), expected[i, :, :4], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(result["scores"].numpy(), expected[i, :, 4], rtol=1e-6)
        np.testing.assert_array_equal(result["classes"].numpy(), expected[i, :, 5])


def test_thresholds_and_errors():
    model = _model("fairmot").eval()
    detector = dla_fast.Detector(model, input_size=INPUT, K=20, threshold=0.0)
    assert detector.threshold == 0.0 and detector.kind == "fairmot"
    result = detector(_images()[:1])[0]
    assert (result["scores"] > 0).all()
    assert dla_fast.Detector(model, input_size=INPUT).threshold == 0.4
    with pytest.raises(ValueError, match="pre_images / pre_hms: only CenterTrack"):
        detector(_images()[:1], pre_images=_images()[:1])
    with pytest.raises(ValueError, match="kind 'yolo'"):
        dla_fast.Detector(model, kind="yolo")
    with pytest.raises(ValueError, match="cuda_graph=True: the model is on cpu"):
        dla_fast.Detector(model, cuda_graph=True)


def test_end_to_end_bench_smoke(capsys):
    status = main(["bench", "--model", "centernet_dla46_c", "--end-to-end", "--size", "32", "--batch", "1",
                   "--warmup", "0", "--iters", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0, out
    for pipeline in ("peers_eager", "dla_fast"):
        assert pipeline in out
    for stage in ("preprocess", "network", "decode"):
        assert stage in out
    assert "%" in out and "frames/s" in out


@pytest.mark.cuda
def test_cuda_graph_detector_equals_eager_detector():
    model = _model("centernet").cuda().eval()
    images = _images()
    plain = dla_fast.Detector(model, input_size=(64, 64), K=20, threshold=None)(images)
    graphed = dla_fast.Detector(dla_fast.accelerate(model), input_size=(64, 64), K=20, threshold=None,
                                cuda_graph=True)
    for _ in range(2):  # capture, then replay
        results = graphed(images)
    for a, b in zip(results, plain):
        _assert_same(a, b, "cuda graph")


@pytest.mark.interpreter
def test_detector_kernels_equal_the_eager_twins():
    """The whole Detector with its kernels (backend 'triton': the interpreter on CPU) equals the eager twins."""
    model = _model("fairmot").eval()
    images = _images()
    with dla_fast.use_backend("torch"):
        expected = dla_fast.detect(model, images, K=12, input_size=INPUT, threshold=None)
    with dla_fast.use_backend("triton"):
        results = dla_fast.detect(model, images, K=12, input_size=INPUT, threshold=None)
    for a, b in zip(results, expected):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)
