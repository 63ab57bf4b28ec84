"""torch.compile of accelerated models: one graph (fullgraph=True), the same outputs, gradients and BatchNorm
statistics as the eager accelerated model, the fused ops kept as custom ops, and running-statistics updates that
CUDA-graph capture (mode="reduce-overhead") accepts.

CPU cost: inductor's CPU backend compiles for minutes per model, so graph breaks and numerics are checked with
backend="aot_eager" (dynamo + AOT autograd + the custom ops' fake kernels, then the real kernels), and inductor
runs on one small model. The fused kernels run on CPU tensors with dla_fast backend 'triton' (Triton's
interpreter); backend 'auto' on CPU runs the eager reference of every op (cheaper: used for the training rows of
the larger models, where it checks that the models themselves trace).
"""
import copy

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import dla_fast
from dla_fast.cli.bench import training_loss
from dla_fast.ops.conv_bn_act import conv_bias_act_op

from helpers import WIDE_DCN_TILES, assert_close, randomize_bn, rel_err

pytestmark = pytest.mark.interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (model name, create_model kwargs, mode, dla_fast backend, custom ops the compiled graph must contain).
# centernet_dla34 with dcn=True: in eval the deformable IDA convs run the fused DCN block, BatchNorm folded
# into the deformable conv's epilogue (one dla_fast::deform_conv2d_fwd call, no separate BatchNorm pass).
_EVAL_OPS = {"dla_fast.conv_bias_act", "dla_fast.aggregate_fwd"}
_TRAIN_OPS = {"dla_fast.aggregate_fwd"}
CASES = [
    ("dla34", {}, "eval", "triton", _EVAL_OPS),
    ("dla34", {}, "train", "triton", _TRAIN_OPS),
    pytest.param(("dla102x", {}, "eval", "triton", _EVAL_OPS), marks=pytest.mark.slow),
    pytest.param(("dla102x", {}, "train", "auto", set()), marks=pytest.mark.slow),
    ("dla34up", {}, "eval", "triton", _EVAL_OPS | {"dla_fast.upsample_merge_fwd"}),
    pytest.param(("dla34up", {}, "train", "auto", set()), marks=pytest.mark.slow),
    ("centernet_dla34", {"dcn": False}, "eval", "triton", _EVAL_OPS | {"dla_fast.upsample_merge_fwd"}),
    pytest.param(("centernet_dla34", {"dcn": False}, "train", "triton",
                  _TRAIN_OPS | {"dla_fast.upsample_merge_fwd", "dla_fast.batchnorm_act_forward"}), marks=pytest.mark.slow),
    pytest.param(("centernet_dla34", {"dcn": True}, "eval", "triton",
                  {"dla_fast.aggregate_fwd", "dla_fast.upsample_merge_fwd", "dla_fast.deform_conv2d_fwd"}),
                 marks=pytest.mark.slow),
    pytest.param(("centernet_dla34", {"dcn": True}, "train", "auto", set()), marks=pytest.mark.slow),
]


def _case_id(case):
    name, kwargs, mode, impl, _ = case
    dcn = "" if "dcn" not in kwargs else ("-dcn" if kwargs["dcn"] else "-conv")
    return f"{name}{dcn}-{mode}-{impl}"


def _model(name, kwargs, train):
    if name.startswith("centernet"):
        pytest.importorskip("torchvision") if kwargs.get("dcn") else None
    model = randomize_bn(dla_fast.create_model(name, **kwargs)).to(DEVICE)
    return dla_fast.accelerate(model).train(train)


def _dla_fast_ops(graph_module) -> set:
    """Names ('dla_fast.<op>') of the dla_fast custom ops called by a dynamo graph."""
    names = set()
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("dla_fast."):
            names.add(str(node.target).split(".default")[0])
    return names


class _GraphRecorder:
    """A dynamo backend: records each graph dynamo hands over (for the custom ops in it), then runs it as
    aot_eager does (AOT autograd, no compiler), recording per forward graph the graph inputs it mutates and
    which inputs are static (parameters and buffers of modules). CUDA-graph trees accept mutation of static
    inputs only (torch/_inductor/cudagraph_utils.py check_for_mutation: "skipping cudagraphs due to mutated
    inputs"), so mutated inputs that are all static mean mode="reduce-overhead" can capture the step."""

    def __init__(self):
        self.graphs, self.mutations = [], []

        def forward_compiler(gm, example_inputs):
            meta = torch._guards.TracingContext.try_get().fw_metadata
            mutated = [i for i, info in enumerate(meta.input_info) if info.mutates_data]
            self.mutations.append((mutated, set(meta.static_input_indices)))
            return make_boxed_func(gm.forward)

        self._aot = aot_autograd(fw_compiler=forward_compiler,
                                 bw_compiler=lambda gm, example_inputs: make_boxed_func(gm.forward))

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self._aot(gm, example_inputs)


def _step(model, x, train):
    if train:
        out = model(x)
        training_loss(out).backward()
        return out
    with torch.no_grad():
        return model(x)


def _assert_same_state(compiled, eager, train):
    if train:
        for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
            if q.grad is None:  # a parameter the forward does not use
                assert p.grad is None, name
            else:
                assert_close(p.grad, q.grad, 1e-4, f"grad of {name}")
    for (name, b), c in zip(compiled.named_buffers(), eager.buffers()):
        if b.dtype == torch.long:
            assert torch.equal(b, c), f"{name}: {b.item()} != eager {c.item()}"
        else:
            assert_close(b, c, 1e-5, name)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fullgraph_compile_equals_eager_accelerated(case, monkeypatch):
    """One graph (fullgraph=True, a single frame), with the fused custom ops in it; outputs, every gradient and
    every buffer as the eager accelerated model after the same step; in training the running statistics moved
    once (num_batches_tracked + 1), and the only inputs the graph mutates are static (the BatchNorm buffers)."""
    name, kwargs, mode, impl, expected_ops = case
    train = mode == "train"
    if kwargs.get("dcn") and DEVICE == "cpu":  # wide DCN tiles: the interpreter's cost is per K-chunk loop step
        from dla_fast.ops.deform_conv import launch
        for kernel, tiles in WIDE_DCN_TILES.items():
            monkeypatch.setitem(launch.TILE_OVERRIDES, kernel, tiles)
    eager = _model(name, kwargs, train)
    model = copy.deepcopy(eager)
    recorder = _GraphRecorder()
    compiled = torch.compile(model, fullgraph=True, backend=recorder)
    x = torch.randn(2, 3, 32, 32, device=DEVICE).contiguous(memory_format=torch.channels_last)
    tracked = [b.item() for n, b in eager.named_buffers() if n.endswith("num_batches_tracked")]
    with dla_fast.use_backend(impl):
        out, ref = _step(compiled, x, train), _step(eager, x, train)
    assert len(recorder.graphs) == 1 and len(recorder.mutations) == 1
    assert expected_ops <= _dla_fast_ops(recorder.graphs[0]), _dla_fast_ops(recorder.graphs[0])
    mutated, static = recorder.mutations[0]
    assert bool(mutated) == train and set(mutated) <= static, (mutated, static)
    for i, (a, b) in enumerate(zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref))):
        assert_close(a, b, 1e-5, f"output {i}")
    _assert_same_state(model, eager, train)
    if train:  # the running statistics were updated exactly once
        after = [b.item() for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
        assert after == [t + 1 for t in tracked]


@pytest.mark.slow
def test_inductor_cpu_compile_equals_eager_accelerated():
    """Inductor's CPU backend on the smallest DLA in eval (the folded convs and the roots as extern calls of the
    custom ops, the rest inductor's C++ kernels): the same outputs as the eager accelerated model."""
    eager = _model("dla46_c", {}, train=False)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 32, 32, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with dla_fast.use_backend("triton"), torch.no_grad():
        out, ref = compiled(x), eager(x)
    assert_close(out, ref, 1e-5, "inductor output")


# ----------------------------------------------------------------------------------------------------------
# dla_fast::conv_bias_act
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_conv_bias_act_opcheck(residual, layout):
    """Schema, fake kernel (shape, dtype and strides of the real output) and dispatch agree; odd sizes, a
    strided grouped conv, with and without ReLU."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 6, 9, 7, device=DEVICE).contiguous(memory_format=fmt)
    weight = torch.randn(10, 3, 3, 3, device=DEVICE).contiguous(memory_format=fmt)
    bias = torch.randn(10, device=DEVICE)
    res = torch.randn(2, 10, 5, 4, device=DEVICE).contiguous(memory_format=fmt) if residual else None
    for relu in (True, False):
        torch.library.opcheck(conv_bias_act_op, (x, weight, bias, [2, 2], [1, 1], [1, 1], 2, res, relu))
    out = conv_bias_act_op(x, weight, bias, [2, 2], [1, 1], [1, 1], 2, res, True)
    ref = torch.nn.functional.conv2d(x, weight, bias, 2, 1, 1, 2)
    assert_close(out, torch.relu(ref + res if residual else ref), 1e-5, "conv_bias_act_op")


@pytest.mark.cuda
def test_gpu_compiled_folded_conv_keeps_the_cudnn_fused_call(monkeypatch):
    """Under inductor on the GPU the folded convs still run cuDNN's fused conv-bias-add-ReLU call."""
    from dla_fast.ops import conv_bn_act

    calls = []
    original = conv_bn_act._cudnn_fused
    monkeypatch.setattr(conv_bn_act, "_cudnn_fused", lambda *a: calls.append(1) or original(*a))
    eager = _model("dla34", {}, train=False)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = compiled(x)
        fused_calls = len(calls)
        eager_out = eager(x)
        ref64 = copy.deepcopy(eager).cpu().double()(x.cpu().double())  # backend auto on CPU: the eager reference
    assert fused_calls > 0
    # a deep BatchNorm network in fp32 is ill-conditioned: within 2x eager fp32's own error against fp64 (GUIDE)
    assert rel_err(out.cpu(), ref64) <= 2 * rel_err(eager_out.cpu(), ref64)


@pytest.mark.cuda
def test_gpu_reduce_overhead_training_captures_without_skips(caplog):
    """torch.compile(accelerate(model), mode="reduce-overhead") in training: no "skipping cudagraphs" (mutated
    running statistics or anything else), and the running statistics move once per step."""
    from torch._dynamo.utils import counters

    counters.clear()
    eager = _model("dla34", {}, train=True)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, mode="reduce-overhead")
    caplog.set_level("WARNING")
    for _ in range(4):
        x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
        _step(compiled, x, True)
        _step(eager, x, True)
    torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert "skipping cudagraphs" not in caplog.text
    for (name, b), c in zip(model.named_buffers(), eager.buffers()):
        if b.dtype == torch.long:
            assert torch.equal(b, c), name
        else:
            assert_close(b, c, 1e-3, name)
