"""CUDAGraphInference: captured-graph inference equals calling the model; clear errors where it cannot run."""
import copy

import pytest
import torch

import dla_fast

from helpers import assert_close, randomize_bn


def test_needs_a_cuda_input_and_inference():
    graphed = dla_fast.CUDAGraphInference(dla_fast.create_model("dla46_c").eval())
    with torch.no_grad(), pytest.raises(ValueError, match="needs a CUDA tensor input; got cpu"):
        graphed(torch.randn(1, 3, 32, 32))


@pytest.mark.cuda
@pytest.mark.parametrize("accelerated", [False, True])
def test_graph_replay_equals_the_model(accelerated):
    ref = randomize_bn(dla_fast.create_model("dla34")).cuda().eval().to(memory_format=torch.channels_last)
    model = dla_fast.accelerate(copy.deepcopy(ref)) if accelerated else copy.deepcopy(ref)
    graphed = dla_fast.CUDAGraphInference(model)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = []
        for _ in range(3):  # new data every call: the graph reads the copied input
            x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
            out = graphed(x)
            assert_close(out.float(), model(x).float(), 1e-2, "graph replay vs direct call")
            outputs.append((out, model(x)))
        for out, direct in outputs:  # earlier outputs were cloned, not overwritten by later replays
            assert_close(out.float(), direct.float(), 1e-2, "an earlier output")
        assert len(graphed._graphs) == 1
        graphed(torch.randn(2, 3, 64, 64, device="cuda"))  # another signature: another graph
        assert len(graphed._graphs) == 2
    with pytest.raises(RuntimeError, match="inference_mode"):
        graphed(x)
    model.train()
    with torch.no_grad(), pytest.raises(RuntimeError, match="model.eval"):
        graphed(x)


@pytest.mark.cuda
def test_graphs_survive_mode_switches_and_separate_autocast_regions():
    """Capture under no_grad + autocast, replay in a later autocast region (autocast's weight cache is gone by
    then); .eval() on the wrapper resets the graphs; a weight change followed by reset() is seen."""
    ref = randomize_bn(dla_fast.create_model("dla46_c")).cuda().eval().to(memory_format=torch.channels_last)
    model = dla_fast.accelerate(copy.deepcopy(ref))
    graphed = dla_fast.CUDAGraphInference(model)
    x = torch.randn(2, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            first = graphed(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch.cuda.empty_cache()
            again = graphed(x)
            expected = ref(x)
        assert torch.equal(first, again)
        assert_close(again.float(), expected.float(), 3e-2)
        graphed.eval()
        assert not graphed._graphs
        for m in (ref, model):
            m.fc.weight.mul_(2.0)
            m.level2.tree1.bn1.running_var.mul_(3.0)
        graphed.reset()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert_close(graphed(x).float(), ref(x).float(), 3e-2, "after a weight change and reset()")
