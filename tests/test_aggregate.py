"""The fused aggregation node equals eager cat -> conv1x1 -> BatchNorm2d -> [+x0] -> ReLU."""
import pytest
import torch
import torch.nn as nn

import dla_fast
from dla_fast.ops.aggregate import launch as aggregate_launch
from dla_fast.ops.aggregate import aggregate, aggregate_fwd

from helpers import LaunchCounter, assert_close, poisoned_allocations, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_BACKEND = "triton"


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """In the interpreter: tiles smaller than the test shapes, so every loop, mask and multi-tile path of the
    kernels runs. On the GPU the real tile sizes are tested."""
    if DEVICE == "cpu":
        monkeypatch.setattr(aggregate_launch, "TILE_OVERRIDES",
                            {"fwd": (32, 16, 16), "grad_input": (32, 16, 16), "grad_weight": (16, 16, 32)})
        monkeypatch.setattr(aggregate_launch, "STATS_GROUP_TILES", 2)  # the two-level statistics merge runs


class EagerNode(nn.Module):
    """The independent reference: exactly what DLA's Root does, in plain modules."""

    def __init__(self, channels, cout, residual, momentum=0.1):
        super().__init__()
        self.conv = nn.Conv2d(sum(channels), cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout, momentum=momentum)
        self.residual = residual

    def forward(self, children):
        x = self.bn(self.conv(torch.cat(children, 1)))
        if self.residual:
            x = x + children[0]
        return torch.relu(x)


def _fused(node, children):
    bn = node.bn
    return aggregate(children, node.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                     bn.num_batches_tracked, bn.training, bn.momentum, bn.eps, node.residual)


def _make(channels, cout, residual, dtype=torch.float32, momentum=0.1, n=2, h=5, w=3, channels_last=True):
    ref = EagerNode(channels, cout, residual, momentum)
    with torch.no_grad():
        ref.bn.weight.uniform_(0.5, 1.5)
        ref.bn.bias.normal_(0, 0.2)
        ref.bn.running_mean.normal_(0, 0.2)
        ref.bn.running_var.uniform_(0.5, 1.5)
    fused = EagerNode(channels, cout, residual, momentum)
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.to(DEVICE), fused.to(DEVICE)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    children = [torch.randn(n, c, h, w, device=DEVICE).to(dtype).contiguous(memory_format=fmt) for c in channels]
    return ref, fused, children


def _check_step(ref, fused, children, training, tol_out=1e-5, tol_grad=1e-4):
    ref.train(training), fused.train(training)
    kids_ref = [c.detach().clone().requires_grad_() for c in children]
    kids_fused = [c.detach().clone().requires_grad_() for c in children]
    expected = ref(kids_ref)
    grad = torch.randn_like(expected)
    with dla_fast.use_backend(KERNEL_BACKEND), poisoned_allocations():  # unwritten outputs would be NaN
        out = _fused(fused, kids_fused)
        out.backward(grad)
    assert_close(out, expected, tol_out, "output")
    expected.backward(grad)
    for i, (a, b) in enumerate(zip(kids_fused, kids_ref)):
        assert_close(a.grad, b.grad, tol_grad, f"grad of child {i}")
    for name, p in fused.named_parameters():
        assert_close(p.grad, dict(ref.named_parameters())[name].grad, tol_grad, f"grad of {name}")
    fused.zero_grad(), ref.zero_grad()


def _check_buffers(ref, fused):
    assert_close(fused.bn.running_mean, ref.bn.running_mean, 1e-5, "running_mean")
    assert_close(fused.bn.running_var, ref.bn.running_var, 1e-5, "running_var")
    assert int(fused.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked)


CASES = [  # (children's channels, Cout, residual)
    ((5, 7), 6, False),
    ((6, 7, 3), 6, True),
    ((17, 20, 33), 17, True),
    ((40, 40, 24, 40), 40, False),
    ((3, 5, 6, 7, 9, 11, 4), 3, True),
    ((19, 18, 17, 16, 15, 14, 13, 12), 19, False),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("channels, cout, residual", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fp32_matches_eager(channels, cout, residual, training):
    ref, fused, children = _make(channels, cout, residual, n=2, h=7, w=5)
    for _ in range(3):
        _check_step(ref, fused, children, training)
        children = [torch.randn_like(c) for c in children]
    _check_buffers(ref, fused)


@pytest.mark.interpreter
def test_many_rows_nchw_input_and_cumulative_momentum():
    """M = 3*11*13 = 429 rows spans several row tiles; NCHW children are accepted; momentum=None."""
    ref, fused, children = _make((24, 10), 24, True, momentum=None, n=3, h=11, w=13, channels_last=False)
    for _ in range(3):
        _check_step(ref, fused, children, training=True)
    _check_buffers(ref, fused)


def _fp64_reference(ref, children, training):
    ref64 = EagerNode([c.shape[1] for c in children], ref.conv.out_channels, ref.residual).double().to(DEVICE)
    ref64.load_state_dict(ref.state_dict())
    ref64.train(training)
    return ref64([c.double() for c in children])


def _run_node(node, children, grad, fused_path=False, autocast_dtype=None):
    """{name: tensor}: output, every child's and parameter's gradient, and the running statistics after the call."""
    kids = [c.detach().clone().requires_grad_() for c in children]
    with torch.autocast(DEVICE, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None), \
            dla_fast.use_backend(KERNEL_BACKEND):
        out = _fused(node, kids) if fused_path else node(kids)
    out.backward(grad.to(out.dtype))
    result = {"output": out}
    result.update({f"grad of child {i}": k.grad for i, k in enumerate(kids)})
    result.update({f"grad of {n}": p.grad for n, p in node.named_parameters()})
    result.update({n: b for n, b in node.named_buffers() if b.dtype.is_floating_point})
    return result


def _check_low_precision(channels, cout, dtype, training, n, h, w):
    """Output, every gradient and the running statistics in `dtype`, against fp64: at most 2x the error of eager
    PyTorch in the same dtype (the node in fp16 modules on CPU, AMP autocast on the GPU)."""
    ref, fused, children = _make(channels, cout, True, n=n, h=h, w=w)
    low = [c.to(dtype) for c in children]
    grad = torch.randn(n, cout, h, w, device=DEVICE)
    states = {k: v.clone() for k, v in ref.state_dict().items()}

    def fresh(module_dtype=torch.float32):
        node = EagerNode(channels, cout, True).to(DEVICE)
        node.load_state_dict(states)
        return node.to(module_dtype).train(training)

    gold = _run_node(fresh(torch.float64), [c.double() for c in low], grad.double())
    if DEVICE == "cpu":
        eager = _run_node(fresh(dtype), low, grad)
    else:
        eager = _run_node(fresh(), low, grad, autocast_dtype=dtype)
    fused.train(training)
    mine = _run_node(fused, low, grad, fused_path=True)
    assert mine["output"].dtype == dtype
    for name, g in gold.items():
        err, eager_err = rel_err(mine[name], g), rel_err(eager[name], g)
        assert err <= 2 * eager_err + 1e-6, f"{name}: error {err:.3g} > 2 x eager's {eager_err:.3g}"


@pytest.mark.interpreter
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fp16_within_twice_eager_error(training):
    _check_low_precision((24, 17, 9), 24, torch.float16, training, n=2, h=6, w=7)


@pytest.mark.interpreter
def test_launches_triton_kernels(monkeypatch):
    """The triton backend really runs the Triton kernels (counted at launch), forward and backward."""
    from triton.runtime.interpreter import InterpretedFunction

    if DEVICE != "cpu":
        pytest.skip("counts interpreter launches")
    launched = []
    original = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    ref, fused, children = _make((6, 7, 3), 6, True, h=7, w=5)  # 70 rows: 3 row tiles, two-level merge
    _check_step(ref, fused, children, training=True)
    assert {"aggregate_fwd_kernel", "aggregate_stats_merge_kernel", "aggregate_stats_group_kernel",
            "aggregate_grad_input_kernel", "aggregate_grad_weight_kernel"} <= set(launched)
    assert "aggregate_dy_kernel" in launched  # 3 children: several column tiles, dy materialised once
    launched.clear()
    ref, fused, children = _make((6,), 6, False)
    _check_step(ref, fused, children, training=True)
    assert "aggregate_grad_input_kernel" in launched and "aggregate_dy_kernel" not in launched  # one column tile


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_training_forward_counts_the_batch_in_its_kernels(momentum, monkeypatch):
    """A training forward is three kernel launches and no other device op: num_batches_tracked is counted by the
    GEMM kernel (program 0), not by a separate add_; the statistics merge, launched after it, reads the counted
    value (momentum=None), and the buffers equal nn.BatchNorm2d's after two steps."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if torch.cuda.is_available():
        from triton.runtime.jit import JITFunction as kernel_class
    else:
        from triton.runtime.interpreter import InterpretedFunction as kernel_class
    in_kernel = []

    class MutatingOps(TorchDispatchMode):
        """The in-place aten ops dla_fast runs outside the Triton launches (device work on buffers; the
        interpreter's own copies of kernel arguments do not count)."""

        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.is_mutable and not in_kernel:
                self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    ref, fused, children = _make((6, 7), 6, False, momentum=momentum)
    ref.train(), fused.train()
    counter = LaunchCounter(monkeypatch)
    counted_run = kernel_class.run

    def run_marked(self, *args, **kwargs):
        in_kernel.append(self)
        try:
            return counted_run(self, *args, **kwargs)
        finally:
            in_kernel.pop()

    monkeypatch.setattr(kernel_class, "run", run_marked)
    for step in range(2):
        with torch.no_grad(), dla_fast.use_backend(KERNEL_BACKEND), MutatingOps() as mutating:
            out = _fused(fused, children)
        with torch.no_grad():
            expected = ref(children)
        assert mutating.names == [], mutating.names
        assert counter.names == ["aggregate_fwd_kernel", "aggregate_stats_merge_kernel", "bn_apply_kernel"]
        counter.names.clear()
        assert_close(out, expected, 1e-5, f"output, step {step}")
        _check_buffers(ref, fused)


@pytest.mark.interpreter
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_weight_gradient_takes_the_weights_layout(training):
    """A channels_last (Cout, K, 1, 1) conv weight (what accelerate()'s channels_last conversion gives: strides
    (K, 1, K, K)) gets its gradient in that layout (DistributedDataParallel's buckets compare strides exactly:
    they warn and copy otherwise), through the eager Function and the compiled path's custom op alike (its fake
    kernel says empty_like(weight)); same values as a contiguous weight."""
    children = [torch.randn(2, c, 3, 5).contiguous(memory_format=torch.channels_last) for c in (4, 3)]
    gamma, beta = torch.rand(6) + 0.5, torch.randn(6)
    weight = torch.randn(6, 7, 1, 1)
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        w = weight.to(memory_format=layout).requires_grad_(True)
        with dla_fast.use_backend(KERNEL_BACKEND):
            out = aggregate(children, w, gamma, beta, torch.zeros(6), torch.ones(6), training=training)
            (grad,) = torch.autograd.grad(out, [w], torch.ones_like(out))
        assert grad.stride() == w.stride(), (layout, grad.stride(), w.stride())
        grads.append(grad)
    assert grads[1].stride() == (7, 1, 7, 7) and torch.equal(grads[0], grads[1])


@pytest.mark.interpreter
def test_empty_batch():
    ref, fused, children = _make((6, 7), 6, False, n=0)
    ref.train(), fused.train()
    kids = [c.clone().requires_grad_() for c in children]
    with dla_fast.use_backend(KERNEL_BACKEND):
        out = _fused(fused, kids)
    expected = ref(children)
    assert out.shape == expected.shape == (0, 6, 5, 3)
    out.sum().backward()
    assert all(k.grad.shape == k.shape for k in kids)
    assert torch.count_nonzero(fused.conv.weight.grad) == 0
    _check_buffers(ref, fused)


def test_torch_backend_is_the_eager_reference():
    ref, fused, children = _make((6, 7, 3), 6, True)
    ref.train(), fused.train()
    with dla_fast.use_backend("torch"):
        out = _fused(fused, children)
    assert torch.equal(out, ref(children))
    _check_buffers(ref, fused)


@pytest.mark.parametrize("mutate, message", [
    (lambda kids, w: ([kids[0], kids[1][:, :, :4]], w), "share batch and spatial size"),
    (lambda kids, w: ([kids[0], kids[1][:1]], w), "share batch and spatial size"),
    (lambda kids, w: ([kids[0], kids[1].double()], w), "dtype"),
    (lambda kids, w: ([kids[0], kids[1].to("meta")], w), "one device"),
    (lambda kids, w: (kids, w[:, :-1]), r"does not fit the children: they have 13 channels in all \(6 \+ 7\)"),
    (lambda kids, w: ([kids[0].int(), kids[1].int()], w), "floating-point children"),
    (lambda kids, w: (kids[0], w), "list of 1 to 8 children"),
    (lambda kids, w: ([kids[0]] * 9, w), "list of 1 to 8 children"),
])
def test_bad_input_is_a_clear_error(mutate, message):
    _, fused, children = _make((6, 7), 6, True)
    kids, weight = mutate(children, fused.conv.weight)
    bn = fused.bn
    with pytest.raises(ValueError, match=message):
        aggregate(kids, weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                  True, 0.1, 1e-5, True)


def test_residual_needs_matching_channels():
    _, fused, children = _make((5, 7), 6, False)
    bn = fused.bn
    with pytest.raises(ValueError, match="child 0 has 5 channels, the output 6"):
        aggregate(children, fused.conv.weight, bn.weight, bn.bias, residual=True)


@pytest.mark.interpreter
def test_one_value_per_channel_in_training_is_pytorchs_error():
    _, fused, children = _make((5, 7), 6, False, n=1, h=1, w=1)
    fused.train()
    with dla_fast.use_backend(KERNEL_BACKEND), pytest.raises(ValueError, match="more than 1 value per channel"):
        _fused(fused, children)


@pytest.mark.interpreter
def test_batch_statistics_without_running_stats_need_two_values_too():
    """Eval mode without running statistics normalizes with batch statistics, so one value per channel is
    PyTorch's error there as well (not zeros)."""
    _, fused, children = _make((5, 7), 6, False, n=1, h=1, w=1)
    bn = fused.bn
    with dla_fast.use_backend(KERNEL_BACKEND), pytest.raises(ValueError, match="more than 1 value per channel"):
        aggregate(children, fused.conv.weight, bn.weight, bn.bias, None, None, None, False)


@pytest.mark.interpreter
def test_opcheck():
    """torch.library.opcheck: schema, fake implementation, autograd registration and dispatch agree."""
    _, fused, children = _make((6, 7), 6, True, n=1, h=3, w=3)
    kids = [c.clone().requires_grad_() for c in children]
    bn = fused.bn
    for batch_stats in (True, False):
        args = (kids, fused.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, 1e-5, True,
                batch_stats, True, "triton")
        torch.library.opcheck(aggregate_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                               "test_autograd_registration"))


@pytest.mark.interpreter
def test_torch_compile_fullgraph_traces_through():
    ref, fused, children = _make((6, 7, 3), 6, True)
    ref.train(), fused.train()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(kids):
        return _fused(fused, kids)

    kids_fused = [c.clone().requires_grad_() for c in children]
    kids_ref = [c.clone().requires_grad_() for c in children]
    with dla_fast.use_backend(KERNEL_BACKEND):
        out = step(kids_fused)
    expected = ref(kids_ref)
    assert_close(out, expected, 1e-5, "compiled output")
    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    for i, (a, b) in enumerate(zip(kids_fused, kids_ref)):
        assert_close(a.grad, b.grad, 1e-4, f"compiled grad of child {i}")
    for name, p in fused.named_parameters():
        assert_close(p.grad, dict(ref.named_parameters())[name].grad, 1e-4, f"compiled grad of {name}")
    _check_buffers(ref, fused)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gpu_half_precision_within_twice_eager_error(dtype, training):
    """On the GPU, at DLA-34's level-3 root shapes (residual on), with the real tile sizes."""
    _check_low_precision((128, 128, 64, 128), 128, dtype, training, n=4, h=28, w=28)
