"""The implicit-GEMM conv (dla_fast.ops.conv_gemm) and the conv chains built on it (dla_fast.nn.conv_chain,
accelerate(model, conv="triton")): BatchNorm + ReLU in the conv's prologue, batch statistics in its epilogue,
DLA-Up's 3x3 node reading its two inputs through their own pointers.

- The op against its eager form (prologue, concatenation, F.conv2d, torch.var_mean): outputs, statistics and the
  gradients of inputs, scales, shifts, weight and bias; several tiles, channel and row remainders, weight-gradient
  row splits, 1x1 / 3x3, stride 1 / 2, one and two inputs.
- DLA-Up's IDA node with its upsample (ucbdrive's concat + 3x3 conv + BN + ReLU): training steps and eval with
  gradients, no concatenation written.
- Module by module (tests/test_accelerate.py's replay) for dla34, dla102x, dla34up and centernet_dla34 (deformable
  convs), with and without the memory-efficient mode: outputs, input and parameter gradients, running statistics
  equal eager; the kernels ran.
"""
import contextlib
import copy
import types

import pytest
import torch
import torch.nn as nn

import dla_fast
from dla_fast.models import VARIANTS
from dla_fast.models.dla_up import IDAUp
from dla_fast.nn import conv_chain
from dla_fast.nn.ida import FusedIDAUp
from dla_fast.ops.conv_gemm import check_inputs, conv_gemm, launch

from helpers import LaunchCounter, assert_close, assert_same_buffers, randomize_bn
from test_accelerate import FOLDED_TYPES, ModuleRecorder, _check_modules, _representative_calls
from test_memory_efficient import _replay_memory_efficient, _values_per_channel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GEMM_KERNELS = ("conv_gemm_fwd_kernel", "conv_gemm_dgrad_kernel", "conv_gemm_wgrad_kernel")


def _inputs(n, h, w, channels, prologue, relu, generator):
    out = []
    for c in channels:
        x = torch.randn(n, c, h, w, generator=generator).to(DEVICE).requires_grad_()
        scale = (torch.rand(c, generator=generator) + 0.5).to(DEVICE).requires_grad_() if prologue else None
        shift = torch.randn(c, generator=generator).to(DEVICE).requires_grad_() if prologue else None
        out.append((x, scale, shift, relu))
    return out


@pytest.mark.interpreter
@pytest.mark.parametrize("kernel, stride, channels, prologue, relu, stats, bias, small_tiles", [
    (3, 1, (5,), False, False, False, False, False),
    (3, 2, (20, 12), True, True, True, False, True),   # two inputs, several tiles and remainders, row splits
    (1, 1, (5, 3), True, True, True, True, False),
    (3, 1, (16,), True, False, True, True, False),     # affine prologue without ReLU
    (1, 2, (6,), False, False, True, False, True),
    (3, 2, (4,), True, True, False, False, False),
])
def test_conv_gemm_equals_its_eager_form(kernel, stride, channels, prologue, relu, stats, bias, small_tiles,
                                         monkeypatch):
    if small_tiles:
        for name, tiles in dict(fwd=(32, 16, 16), dgrad=(32, 16, 16), wgrad=(16, 16, 32)).items():
            monkeypatch.setitem(launch.TILE_OVERRIDES, name, tiles)
        monkeypatch.setattr(launch, "WGRAD_ROWS_PER_SPLIT", 40)
    generator = torch.Generator().manual_seed(kernel * 10 + stride)
    inputs = _inputs(2, 9, 7, channels, prologue, relu, generator)
    cout = 24 if small_tiles else 6
    weight = torch.randn(cout, sum(channels), kernel, kernel, generator=generator).to(DEVICE).requires_grad_()
    b = torch.randn(cout, generator=generator).to(DEVICE).requires_grad_() if bias else None
    leaves = [t for x, s, sh, _ in inputs for t in (x, s, sh) if t is not None] + [weight] + ([b] if bias else [])
    results = []
    counter = LaunchCounter(monkeypatch)
    for impl in ("torch", "triton"):
        out = conv_gemm(inputs, weight, b, stride, kernel // 2, stats=stats, impl=impl)
        out = list(out) if stats else [out]
        seeds = torch.Generator().manual_seed(7)
        loss = sum((o.float() * torch.randn(o.shape, generator=seeds).to(DEVICE)).sum() for o in out)
        results.append(([o.detach() for o in out], torch.autograd.grad(loss, leaves)))
    assert set(GEMM_KERNELS) <= set(counter.names)
    (ref_out, ref_grads), (out, grads) = results
    assert out[0].shape == ref_out[0].shape
    for k, (a, e) in enumerate(zip(out, ref_out)):
        assert_close(a, e, 1e-5, f"output {k}")
    for k, (a, e) in enumerate(zip(grads, ref_grads)):
        assert_close(a, e, 1e-4, f"grad {k}")


def test_conv_gemm_rejects_bad_arguments():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(8, 4, 3, 3)
    s = torch.ones(4)
    cases = [
        (dict(inputs=[(x, s, None, False)]), "both scale and shift"),
        (dict(inputs=[(x, None, None, True)]), "ReLU without a prologue"),
        (dict(inputs=[(x, None, None, False)], weight=torch.randn(8, 2, 3, 3)), "groups are not supported"),
        (dict(inputs=[(x, s.double(), s, False)]), "fp32 vector"),
        (dict(inputs=[(x.double(), None, None, False)]), "must match"),
        (dict(inputs=[(x, None, None, False), (torch.randn(1, 4, 6, 5), None, None, False)],
              weight=torch.randn(8, 8, 3, 3)), "spatial sizes differ"),
        (dict(inputs=[(x, None, None, False)], stride=0), "stride must be an int >= 1"),
        (dict(inputs=[(x, None, None, False)], bias=torch.zeros(3)), "bias must have shape"),
        (dict(inputs=[]), "one or two inputs"),
    ]
    for overrides, message in cases:
        args = dict(inputs=[(x, None, None, False)], weight=w, bias=None, stride=1, padding=1)
        args.update(overrides)
        with pytest.raises((ValueError, TypeError), match=message):
            check_inputs(args["inputs"], args["weight"], args["bias"], args["stride"], args["padding"])
    with pytest.raises(ValueError, match="conv must be one of"):
        dla_fast.accelerate(nn.Sequential(IDAUp(3, 16, [16, 16], [1, 2])), conv="cutlass")


def _ida_pair(seed=0):
    torch.manual_seed(seed)
    ida = randomize_bn(IDAUp(3, 16, [16, 32], [1, 2])).to(DEVICE)
    fused = dla_fast.accelerate(nn.Sequential(copy.deepcopy(ida)), conv="triton")
    assert isinstance(fused[0], FusedIDAUp)
    return ida, fused[0]


@pytest.mark.interpreter
def test_dla_up_node_reads_both_inputs_without_a_concatenation(monkeypatch):
    """The 3x3 IDA node with its upsample (ucbdrive: cat([x, up(proj(l))]) -> 3x3 conv -> BN -> ReLU), backend
    triton with conv="triton": two training steps (momentum 0.1), then eval with gradients wanted, equal eager in
    outputs, input and parameter gradients and running statistics; torch.cat is never called by the fused module
    and the implicit-GEMM kernels ran."""
    eager, fused = _ida_pair()
    counter = LaunchCounter(monkeypatch)
    generator = torch.Generator().manual_seed(3)
    layers = [torch.randn(2, 16, 8, 8, generator=generator).to(DEVICE),
              torch.randn(2, 32, 4, 4, generator=generator).to(DEVICE)]
    grads = [torch.randn(2, 16, 8, 8, generator=generator).to(DEVICE) for _ in range(2)]
    real_cat = torch.cat
    for step, training in enumerate((True, True, False)):
        eager.train(training), fused.train(training)
        results = []
        for module, backend in ((eager, "torch"), (fused, "triton")):
            leaves = [(t * (1 + 0.25 * step)).contiguous(memory_format=torch.channels_last).requires_grad_()
                      for t in layers]
            if module is fused:
                monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("the fused node concatenated"))
            with dla_fast.use_backend(backend):
                out, nodes = module(leaves)
                torch.autograd.backward([out, nodes[0]], grads[:1] + [torch.zeros_like(nodes[0])])
            monkeypatch.setattr(torch, "cat", real_cat)
            results.append((out.detach(), [leaf.grad for leaf in leaves]))
        (ref, ref_grads), (got, got_grads) = results
        where = f"step {step} ({'train' if training else 'eval'})"
        assert_close(got, ref, 1e-5, f"{where}: output")
        for k, (a, e) in enumerate(zip(got_grads, ref_grads)):
            assert_close(a, e, 1e-4, f"{where}: grad of input {k}")
        eager_params = dict(eager.named_parameters())
        for name, p in fused.named_parameters():
            expected = eager_params[name].grad
            if expected.abs().max() > 1e-6:
                assert_close(p.grad, expected, 1e-4, f"{where}: grad of {name}")
        assert_same_buffers(fused, eager, where)
    assert {"conv_gemm_fwd_kernel", "conv_gemm_dgrad_kernel", "conv_gemm_wgrad_kernel"} <= set(counter.names)


def test_conv_choice_auto_keeps_cudnn_until_measured(monkeypatch):
    """accelerate(conv="auto") runs the implicit GEMM only for shapes in MEASURED_FASTER (empty: nothing measured
    on a GPU yet), so no conv of the node goes through it; "cudnn" (the default) never."""
    assert conv_chain.MEASURED_FASTER == frozenset()
    node = IDAUp(3, 16, [16, 16], [1, 2]).node_1[0]
    for choice in ("auto", "cudnn"):
        assert not conv_chain.kernel_takes(node, choice, torch.float32)
    assert conv_chain.kernel_takes(node, "triton", torch.float32)
    grouped = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
    narrow = nn.Conv2d(3, 16, 7, padding=3, bias=False)
    assert not conv_chain.kernel_takes(grouped, "triton", torch.float32)
    assert not conv_chain.kernel_takes(narrow, "triton", torch.float32)


@pytest.fixture
def narrow_variants(monkeypatch):
    """dla34's and dla102x's structure at a quarter of their widths (the interpreter's time goes with them)."""
    for variant in ("dla34", "dla102x"):
        levels, channels, block, extra = VARIANTS[variant]
        monkeypatch.setitem(VARIANTS, variant, (levels, tuple(c // 4 for c in channels), block, extra))


MODELS = [
    ("dla34", dict(num_classes=10)),
    ("dla102x", dict(num_classes=10)),          # BottleneckX: its grouped 3x3 stays on PyTorch's conv mid-chain
    ("dla34up", dict(num_classes=5)),           # DLA-Up: the concat-free 3x3 nodes
    ("centernet_dla34", dict(dcn=True, heads={"hm": 3, "wh": 2}, head_conv=16)),  # deformable IDA convs
]


@pytest.mark.interpreter
@pytest.mark.parametrize("memory_efficient", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["plain", "memory_efficient"])
@pytest.mark.parametrize("name, kwargs", [MODELS[0], MODELS[2]] + [pytest.param(*m, marks=pytest.mark.slow)
                                                                   for m in (MODELS[1], MODELS[3])],
                         ids=[MODELS[i][0] for i in (0, 2, 1, 3)])
def test_models_train_through_the_implicit_gemm_like_eager(name, kwargs, memory_efficient, narrow_variants,
                                                          monkeypatch):
    """accelerate(model, conv="triton"[, memory_efficient=True]): a training step is recorded (backend torch: the
    same inputs and output gradients, the interpreter's time is the limit), then one replaced module of each kind
    that runs a conv chain (blocks with and without a separate residual, conv stacks, DLA-Up's IDA steps) is
    replayed with backend triton — inside the memory-efficient context for that mode — and equals the eager module
    it replaced: outputs, input and parameter gradients, running statistics (training; plain mode also eval with
    gradients wanted); the implicit-GEMM kernels ran."""
    model = randomize_bn(dla_fast.create_model(name, **kwargs)).to(DEVICE).train()
    dla_fast.accelerate(model, conv="triton", memory_efficient=memory_efficient)
    replayed = FOLDED_TYPES + (FusedIDAUp,)
    recorder = ModuleRecorder(model, replayed)
    x = torch.randn(2, 3, 64, 64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with dla_fast.use_backend("torch"):
        outs = model(x)
    outs = [outs[0][k] for k in sorted(outs[0])] if isinstance(outs, list) else (
        list(outs) if isinstance(outs, tuple) else [outs])
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    recorder.remove()
    calls = [c for c in recorder.calls if _values_per_channel(c) >= 8
             and any(conv_chain.kernel_takes(m, "triton", torch.float32) for m in c["module"].modules())]
    representatives = _representative_calls(calls)
    assert representatives, "no replaced module has a conv the kernels take"
    if name == "dla34up":
        assert FusedIDAUp in {type(c["module"]) for c in representatives}
    counter = LaunchCounter(monkeypatch)
    if memory_efficient:
        for call in representatives:
            _replay_memory_efficient(call)
    else:
        _check_modules(types.SimpleNamespace(calls=representatives), True, replayed, "triton")
        _check_modules(types.SimpleNamespace(calls=representatives), False, replayed, "triton", in_model=False)
    assert set(GEMM_KERNELS) <= set(counter.names)


@pytest.mark.interpreter
@pytest.mark.slow
def test_whole_dla34_training_step_through_the_implicit_gemm(narrow_variants):
    """dla34 (quarter widths, 64x64) trained one step with conv="triton" and the memory-efficient mode, backend
    triton, against eager: outputs, input and parameter gradients, running statistics. Through 30-odd layers fp32
    summation-order differences compound (the plain accelerated model is off eager by the same order), so the
    bound is 5e-4 relative."""
    torch.manual_seed(0)
    ref = randomize_bn(dla_fast.create_model("dla34", num_classes=10)).to(DEVICE).train()
    fused = dla_fast.accelerate(copy.deepcopy(ref), conv="triton", memory_efficient=True)
    x = torch.randn(2, 3, 64, 64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 10, device=DEVICE)
    runs = []
    for model, backend in ((ref, "torch"), (fused, "triton")):
        leaf = x.clone().requires_grad_()
        with dla_fast.use_backend(backend):
            out = model(leaf)
            out.backward(grad)
        runs.append((out.detach(), leaf.grad))
    assert_close(runs[1][0], runs[0][0], 1e-4, "output")
    assert_close(runs[1][1], runs[0][1], 5e-4, "input gradient")
    ref_params = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        assert_close(p.grad, ref_params[name].grad, 5e-4, f"grad of {name}")
    for (name, a), (_, b) in zip(fused.named_buffers(), ref.named_buffers()):
        assert_close(a.float(), b.float(), 1e-4, name)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_affine_act_equals_eager_and_saves_only_what_the_chain_keeps(relu, residual, memory_efficient):
    """affine_act (a conv chain's last BatchNorm [+ residual] [+ ReLU] with known statistics) against the eager
    formula: output and gradients of y, scale, shift and residual. It never saves its output inside the
    memory-efficient mode (a recipe there), and outside it saves the output only as the ReLU's mask."""
    from dla_fast.ops import recompute
    from dla_fast.ops.conv_gemm import affine_act
    generator = torch.Generator().manual_seed(5)
    y = torch.randn(2, 8, 5, 5, generator=generator).requires_grad_()
    scale = (torch.rand(8, generator=generator) + 0.5).requires_grad_()
    shift = torch.randn(8, generator=generator).requires_grad_()
    res = torch.randn(2, 8, 5, 5, generator=generator).requires_grad_() if residual else None
    leaves = [t for t in (y, scale, shift, res) if t is not None]
    grad = torch.randn(2, 8, 5, 5, generator=generator)
    expected = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1) + (res if residual else 0)
    expected = torch.relu(expected) if relu else expected
    ref_grads = torch.autograd.grad(expected, leaves, grad)
    saved = []
    with contextlib.ExitStack() as stack:
        if memory_efficient:
            stack.enter_context(recompute.recompute_activations())
        stack.enter_context(recompute.observe_saved(saved.append))
        out = affine_act(y, scale, shift, relu, res)
        grads = torch.autograd.grad(out, leaves, grad)
    assert_close(out.detach(), expected.detach(), 1e-6, "output")
    for k, (a, e) in enumerate(zip(grads, ref_grads)):
        assert_close(a, e, 1e-5, f"grad {k}")
    saved_outputs = [p for p in saved if isinstance(p, torch.Tensor) and p.data_ptr() == out.data_ptr()]
    assert len(saved_outputs) == (1 if relu and not memory_efficient else 0)
    with pytest.raises(ValueError, match="differ in shape"):
        affine_act(y, scale, shift, relu, torch.zeros(2, 8, 5, 4))
