"""CUDAGraphTraining: a training step's forward and backward replayed from captured CUDA graphs equal the eager
steps (outputs, gradients, BatchNorm statistics moved once per step); clear errors where capture cannot work."""
import copy

import pytest
import torch

import dla_fast
from dla_fast.cli.bench import training_loss

from helpers import assert_close, randomize_bn


def _small_model():
    return randomize_bn(dla_fast.create_model("dla46_c"))


def test_needs_a_cuda_input():
    graphed = dla_fast.CUDAGraphTraining(dla_fast.accelerate(_small_model()).train())
    with pytest.raises(ValueError, match="needs a CUDA tensor input; got cpu"):
        graphed(torch.randn(2, 3, 32, 32))


def test_needs_training_mode_and_gradients():
    x = torch.randn(2, 3, 32, 32)
    graphed = dla_fast.CUDAGraphTraining(dla_fast.accelerate(_small_model()).eval())
    with pytest.raises(RuntimeError, match="model.train"):
        graphed(x)
    graphed.model.train()
    with torch.no_grad(), pytest.raises(RuntimeError, match="gradients enabled"):
        graphed(x)


def test_refuses_what_cannot_be_captured():
    """A model on another device than the input, BatchNorm with momentum=None, hooks on the model itself."""
    model = dla_fast.accelerate(_small_model()).train()
    graphed = dla_fast.CUDAGraphTraining(model)
    x = torch.empty(2, 3, 32, 32, device="meta")
    with pytest.raises(ValueError, match="the input is on meta but the model's .* is on cpu"):
        graphed._check_capturable(x)
    model.to("meta")
    model.level1[1].momentum = None
    with pytest.raises(ValueError, match=r"level1.1 has momentum=None"):
        graphed._check_capturable(x)
    model.level1[1].momentum = 0.1
    model.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="hooks"):
        graphed._check_capturable(x)


def _train_steps(step_model, params_model, inputs):
    """One SGD step per input; returns the outputs (cloned) and the gradients of the last step."""
    optimizer = torch.optim.SGD(params_model.parameters(), lr=0.05, momentum=0.9)
    outputs = []
    for x in inputs:
        optimizer.zero_grad(set_to_none=True)
        out = step_model(x)
        training_loss(out).backward()
        outputs.append(out.detach().clone())
        optimizer.step()
    return outputs, [p.grad.clone() for p in params_model.parameters()]


@pytest.mark.cuda
@pytest.mark.parametrize("accelerated", [False, True])
def test_graphed_training_steps_equal_eager(accelerated, monkeypatch):
    """Three SGD steps, new data each: outputs, last gradients, parameters and every BatchNorm buffer as the eager
    model's; num_batches_tracked moved by exactly 3 (the capture's warm-up runs left no trace). The graphs replay
    the kernels the eager steps run; deterministic cuDNN keeps atomics out, so the steps stay comparable."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    ref = _small_model().cuda().to(memory_format=torch.channels_last).train()
    if accelerated:
        ref = dla_fast.accelerate(ref)
    model = copy.deepcopy(ref)
    graphed = dla_fast.CUDAGraphTraining(model)
    inputs = [torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
              for _ in range(3)]
    tracked = [b.item() for n, b in ref.named_buffers() if n.endswith("num_batches_tracked")]
    outs, grads = _train_steps(graphed, model, inputs)
    ref_outs, ref_grads = _train_steps(ref, ref, inputs)
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        assert_close(a, b, 1e-4, f"output of step {i}")
    for (name, g), r in zip(model.named_parameters(), ref_grads):
        assert_close(g, r, 1e-3, f"grad of {name}")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p, q, 1e-4, name)
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, c), name
        else:
            assert_close(b, c, 1e-4, name)
    assert [b.item() for n, b in model.named_buffers() if n.endswith("num_batches_tracked")] == [t + 3 for t in tracked]


@pytest.mark.cuda
def test_graphed_training_signature_is_fixed_and_autocast_capture_works():
    model = dla_fast.accelerate(_small_model()).cuda().train()
    graphed = dla_fast.CUDAGraphTraining(model)
    x = torch.randn(2, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = graphed(x)
        training_loss(out).backward()
        with pytest.raises(ValueError, match=r"captured its graphs for input shape \(2, 3, 64, 64\).*"
                                             r"got shape \(4, 3, 64, 64\).*reset\(\)"):
            graphed(torch.randn(4, 3, 64, 64, device="cuda"))
    with pytest.raises(ValueError, match="autocast off"):
        graphed(x)
    graphed.reset()
    training_loss(graphed(x)).backward()  # captured again, without autocast
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    assert "forward" not in model.__dict__  # the model's own forward is untouched
