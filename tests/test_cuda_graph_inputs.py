"""The CUDA-graph wrappers with several inputs: CenterTrack's (img, pre_img, pre_hm). The argument handling is
checked on CPU; the captures themselves need a GPU (marked cuda)."""
import copy

import pytest
import torch

import dla_fast
from dla_fast.nn.cuda_graph import CUDAGraphInference, _describe_signature, _tensor_signature

from helpers import assert_close, randomize_bn


def _centertrack():
    return randomize_bn(dla_fast.create_model("centertrack_dla46_c", dcn=False, head_conv=8,
                                              heads={"hm": 2, "tracking": 2}))


def test_every_input_must_be_a_cuda_tensor_named_by_position():
    graphed = dla_fast.CUDAGraphInference(_centertrack().eval())
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), pytest.raises(ValueError, match=r"needs a CUDA tensor input; got cpu as input 0 \(each "
                                                          r"input must be a CUDA tensor or None\)"):
        graphed(img, img, None)
    with torch.no_grad(), pytest.raises(ValueError, match="needs at least one input tensor"):
        graphed()
    training = dla_fast.CUDAGraphTraining(_centertrack().train())
    with pytest.raises(ValueError, match=r"got str as input 0 \(each input must be a CUDA tensor\)"):
        training("img", img)


def test_signatures_cover_every_input():
    """One graph per signature of all inputs: another shape or a None in any position is another graph."""
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 1, 32, 32)
    signature = CUDAGraphInference._signature
    assert signature([a, a, b]) == signature([a.clone(), a.clone(), b.clone()])
    assert signature([a, a, b]) != signature([a, None, b])
    assert signature([a, a, b]) != signature([a, a, torch.randn(1, 1, 64, 32)])
    described = _describe_signature(_tensor_signature([a, b]))
    assert described.startswith("0: shape (1, 3, 32, 32), torch.float32") and "1: shape (1, 1, 32, 32)" in described
    assert _describe_signature(_tensor_signature([a])).startswith("shape (1, 3, 32, 32)")


def _frames(n=2, size=64):
    return [torch.randn(n, c, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
            for c in (3, 3, 1)]


@pytest.mark.cuda
@pytest.mark.parametrize("accelerated", [False, True])
def test_centertrack_graphed_inference_equals_eager(accelerated):
    ref = _centertrack().cuda().eval().to(memory_format=torch.channels_last)
    if accelerated:
        ref = dla_fast.accelerate(ref)
    graphed = dla_fast.CUDAGraphInference(copy.deepcopy(ref))
    with torch.inference_mode():
        for inputs in (_frames(), _frames(), [_frames()[0], None, _frames()[2]]):
            out, expected = graphed(*inputs)[0], ref(*inputs)[0]
            for name in expected:
                assert_close(out[name], expected[name], 1e-5, name)
    assert len(graphed._graphs) == 2  # (img, pre_img, pre_hm) and (img, None, pre_hm)


@pytest.mark.cuda
def test_centertrack_graphed_training_step_equals_eager(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    ref = dla_fast.accelerate(_centertrack().cuda().train().to(memory_format=torch.channels_last))
    model = copy.deepcopy(ref)
    graphed = dla_fast.CUDAGraphTraining(model)
    for step in range(2):
        inputs = _frames()
        outs = []
        for m, params in ((graphed, model), (ref, ref)):
            for p in params.parameters():
                p.grad = None
            out = m(*inputs)[0]
            sum(t.square().mean() for t in out.values()).backward()
            outs.append(out)
        for name in outs[1]:
            assert_close(outs[0][name], outs[1][name], 1e-4, f"step {step} {name}")
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert_close(p.grad, q.grad, 1e-3, f"step {step} grad of {name}")
