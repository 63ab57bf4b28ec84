"""The fused CenterNet DCN block (dla_fast.nn.dcn, dla_fast.ops.deform_conv.block) against the eager modules.

References are the modules replaced: CenterNet's IDAConv(deformable=True) on torchvision.ops.deform_conv2d +
nn.BatchNorm2d + ReLU, IDAUpAdd, torchvision.ops.DeformConv2d. The offset-mask convs get random weights so the
samples move by several pixels (off the grid, some outside the image) and the masks spread over (0, 1).
Triton kernels run in the interpreter (backend 'triton'); launches are counted to prove they ran.
"""
import copy

import pytest
import torch
import torch.nn as nn

import dla_fast
import dla_fast.ops.deform_conv.launch as deform_conv_launch
from dla_fast.models.centernet import IDAConv, IDAUpAdd
from dla_fast.nn import FusedDCNBlock, FusedDeformConv2d, FusedIDAUpAdd

from helpers import (LaunchCounter, assert_close, assert_same_buffers, poisoned_allocations, randomize_bn,
                     rel_err)

torchvision = pytest.importorskip("torchvision")
pytestmark = pytest.mark.interpreter

FWD_KERNEL = "deform_conv_fwd_kernel"
BWD_KERNELS = ("deform_conv_grad_sample_kernel", "deform_conv_grad_weight_kernel")


def _perturb_dcn(model: nn.Module) -> nn.Module:
    """Random offset-mask convs (offsets of a few pixels) and deformable-conv biases, random BatchNorms."""
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "conv_offset_mask"):
                m.conv_offset_mask.weight.normal_(0.0, 0.4)
                m.conv_offset_mask.bias.normal_(0.0, 1.0)
                m.bias.normal_(0.0, 0.5)
    return randomize_bn(model)


def _compare_grads(fused: nn.Module, ref: nn.Module, where: str) -> None:
    ref_grads = dict(ref.named_parameters())
    scale = max(p.grad.abs().max().item() for p in ref_grads.values())
    for name, p in fused.named_parameters():
        expected = ref_grads[name].grad
        if expected.abs().max() <= 1e-6 * scale:  # the deformable conv's bias before training-mode BN: exactly 0
            assert p.grad.abs().max() <= 1e-5 * scale, f"{where}: grad of {name} should vanish"
        else:
            assert_close(p.grad, expected, 1e-4, f"{where}: grad of {name}")


def test_fused_block_trains_like_the_eager_block(monkeypatch):
    """Training: outputs, input and every parameter gradient, running statistics after three steps (two with
    momentum=None, the cumulative average, then one with momentum 0.1)."""
    ref = _perturb_dcn(IDAConv(5, 6, deformable=True)).train()
    fused = FusedDCNBlock(copy.deepcopy(ref))
    counter = LaunchCounter(monkeypatch)
    for step, momentum in enumerate((None, None, 0.1)):
        ref.actf[0].momentum = fused.actf[0].momentum = momentum
        x = torch.randn(2, 5, 5, 7)
        x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
        grad = torch.randn(2, 6, 5, 7)
        out_ref = ref(x_ref)
        out_ref.backward(grad)
        with dla_fast.use_backend("triton"), poisoned_allocations():
            out = fused(x_fused)
            out.backward(grad)
        assert_close(out, out_ref, 1e-5, f"step {step}: output")
        assert_close(x_fused.grad, x_ref.grad, 1e-4, f"step {step}: grad of the input")
        assert_same_buffers(fused, ref, f"step {step} (momentum {momentum})")
    _compare_grads(fused, ref, "after 3 steps")
    for kernel in (FWD_KERNEL, *BWD_KERNELS, "bn_apply_kernel", "bn_backward_apply_kernel"):
        assert kernel in counter.names, f"{kernel} did not run"


def test_fused_block_eval_folds_and_refolds(monkeypatch):
    """Eval without gradients: BatchNorm folded, one deformable-conv kernel (ReLU in its epilogue) and no BN pass;
    a changed BatchNorm parameter is folded again. Eval with gradients: exact gradients, running stats kept."""
    ref = _perturb_dcn(IDAConv(6, 5, deformable=True)).eval()
    fused = FusedDCNBlock(copy.deepcopy(ref))
    x = torch.randn(2, 6, 6, 5)
    counter = LaunchCounter(monkeypatch)
    with torch.no_grad():
        for change in range(2):
            with dla_fast.use_backend("triton"), poisoned_allocations():
                out = fused(x)
            assert_close(out, ref(x), 1e-5, f"eval output (BatchNorm change {change})")
            assert counter.names == [FWD_KERNEL], counter.names
            counter.names.clear()
            for bn in (ref.actf[0], fused.actf[0]):
                bn.weight.mul_(1.5)
                bn.running_mean.add_(0.25)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(2, 5, 6, 5)
    ref(x_ref).backward(grad)
    with dla_fast.use_backend("triton"):
        out = fused(x_fused)
        out.backward(grad)
    assert_close(out, ref(x), 1e-5, "eval output with gradients")
    assert_close(x_fused.grad, x_ref.grad, 1e-4, "eval: grad of the input")
    _compare_grads(fused, ref, "eval")
    assert_same_buffers(fused, ref, "eval")
    assert FWD_KERNEL in counter.names and BWD_KERNELS[0] in counter.names


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_fused_block_fp16_error_within_twice_eager_fp16(training):
    """fp16 (folded in eval, batch statistics in training): the error against an fp64 run of the eager block is at
    most twice eager fp16's own, for the output and every gradient (the deformable conv's bias, whose gradient
    is exactly zero before a training-mode BatchNorm, has no relative error to compare)."""
    block = _perturb_dcn(IDAConv(12, 10, deformable=True)).train(training)
    x, grad = torch.randn(2, 12, 6, 7), torch.randn(2, 10, 6, 7)
    runs = []
    for dtype, kernels in ((torch.float64, "torch"), (torch.float16, "torch"), (torch.float16, "triton")):
        module = copy.deepcopy(block).to(dtype)
        if kernels == "triton":
            module = FusedDCNBlock(module)
        xi = x.to(dtype).requires_grad_(training)
        with dla_fast.use_backend(kernels), torch.set_grad_enabled(training):
            out = module(xi)
            if training:
                out.backward(grad.to(dtype))
        runs.append((out, xi, module))
    (ref, x_ref, m_ref), (eager, x_eager, m_eager), (fused, x_fused, m_fused) = runs
    pairs = [("output", fused, eager, ref)]
    if training:
        pairs.append(("grad of the input", x_fused.grad, x_eager.grad, x_ref.grad))
        pairs += [(f"grad of {n}", p.grad, e.grad, r.grad) for (n, r), e, p in
                  zip(m_ref.named_parameters(), m_eager.parameters(), m_fused.parameters()) if n != "conv.bias"]
    for what, a, e, r in pairs:
        assert rel_err(a, r) <= 2 * rel_err(e, r), f"{what}: fp16 error {rel_err(a, r):.3g}, eager {rel_err(e, r):.3g}"


def test_fused_ida_step_with_deformable_convs_trains_like_the_eager_one(monkeypatch):
    """CenterNet's IDAUpAdd with DCN proj/node: FusedIDAUpAdd runs them as fused blocks (a training step)."""
    ref = _perturb_dcn(IDAUpAdd(6, [6, 5], [1, 2], deformable=True)).train()
    fused = FusedIDAUpAdd(copy.deepcopy(ref))
    counter = LaunchCounter(monkeypatch)
    layers = [torch.randn(2, 6, 6, 6), torch.randn(2, 5, 3, 3)]
    ref_in = [t.clone().requires_grad_() for t in layers]
    fused_in = [t.clone().requires_grad_() for t in layers]
    grad = torch.randn(2, 6, 6, 6)
    out_ref = ref(ref_in)[-1]
    out_ref.backward(grad)
    with dla_fast.use_backend("triton"):
        out = fused(fused_in)[-1]
        out.backward(grad)
    assert_close(out, out_ref, 1e-5, "output")
    for k, (a, b) in enumerate(zip(fused_in, ref_in)):
        assert_close(a.grad, b.grad, 1e-4, f"grad of layer {k}")
    _compare_grads(fused, ref, "training step")
    assert_same_buffers(fused, ref, "training step")
    assert counter.names.count(FWD_KERNEL) == 2  # proj_1 and node_1


def test_centernet_with_dcn_equals_itself_after_accelerate(monkeypatch):
    """centernet_dla34(dcn=True): same eval output before and after accelerate() with the DCN kernels running (every
    deformable IDA conv folded with its BatchNorm: one kernel each), the state_dict keys unchanged (a
    CenterNet-layout checkpoint loads strictly), restore() gives the modules back."""
    ref = _perturb_dcn(dla_fast.create_model("centernet_dla34", dcn=True, heads={"hm": 3, "wh": 2}, head_conv=16))
    ref.eval()
    fused = copy.deepcopy(ref)
    originals = {name: m for name, m in fused.named_modules() if isinstance(m, IDAUpAdd)}
    # wide tiles: the interpreter's cost is per loop step, and DLA-34's 512-channel convs take many K chunks
    monkeypatch.setitem(deform_conv_launch.TILE_OVERRIDES, "fwd", (128, 256, 128))
    checkpoint = ref.state_dict()
    dla_fast.accelerate(fused)
    assert list(fused.state_dict()) == list(checkpoint)
    fused.load_state_dict(checkpoint, strict=True)
    assert all(isinstance(fused.get_submodule(n), FusedIDAUpAdd) for n in originals)
    counter = LaunchCounter(monkeypatch)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with dla_fast.use_backend("triton"):
            out = fused(x)[0]
        expected = ref(x)[0]
    for name in expected:
        assert_close(out[name], expected[name], 1e-5, f"eval head {name}")
    assert counter.names.count(FWD_KERNEL) == 2 * (1 + 2 + 3 + 2)  # proj + node of every IDA step
    assert "bn_apply_kernel" not in counter.names  # every DCN block ran folded, ReLU in the conv's epilogue
    dla_fast.restore(fused)
    assert all(fused.get_submodule(n) is m for n, m in originals.items())
    fused.load_state_dict(checkpoint, strict=True)


def test_standalone_dcn_block_and_torchvision_deform_conv_are_swapped(monkeypatch):
    """accelerate() swaps an IDAConv(deformable) outside an IDA step and a torchvision DeformConv2d; both equal the
    originals (output, gradients) and restore() puts the originals back."""
    model = nn.ModuleDict(dict(block=_perturb_dcn(IDAConv(4, 5, deformable=True)).eval(),
                               tv=torchvision.ops.DeformConv2d(4, 5, 3, padding=1, bias=True)))
    ref = copy.deepcopy(model)
    originals = dict(model.named_children())
    dla_fast.accelerate(model)
    assert isinstance(model["block"], FusedDCNBlock) and isinstance(model["tv"], FusedDeformConv2d)
    assert list(model.state_dict()) == list(ref.state_dict())
    assert model["tv"].weight is originals["tv"].weight

    x = torch.randn(2, 4, 5, 6)
    offset = torch.randn(2, 18, 5, 6) * 2.0
    mask = torch.rand(2, 9, 5, 6)
    inputs_ref = [t.clone().requires_grad_() for t in (x, offset, mask)]
    inputs = [t.clone().requires_grad_() for t in (x, offset, mask)]
    counter = LaunchCounter(monkeypatch)
    out_ref = ref["tv"](*inputs_ref)
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    with dla_fast.use_backend("triton"):
        out = model["tv"](*inputs)
        out.backward(grad)
        with torch.no_grad():
            block_out = model["block"](x)
    assert_close(out, out_ref, 1e-5, "DeformConv2d output")
    for name, a, b in zip(("input", "offset", "mask"), inputs, inputs_ref):
        assert_close(a.grad, b.grad, 1e-4, f"DeformConv2d grad of {name}")
    for name in ("weight", "bias"):
        assert_close(getattr(model["tv"], name).grad, getattr(ref["tv"], name).grad, 1e-4, f"grad of {name}")
    with torch.no_grad():
        assert_close(block_out, ref["block"](x), 1e-5, "standalone block, eval")
    assert counter.names.count(FWD_KERNEL) == 2 and BWD_KERNELS[0] in counter.names
    dla_fast.restore(model)
    assert all(model[n] is m for n, m in originals.items())


def test_standalone_block_follows_a_sync_batchnorm_conversion_after_accelerate(monkeypatch):
    """convert_sync_batchnorm after accelerate(): the block rebuilds its folded pair with the SyncBatchNorm and runs
    the fused kernels with it: a training step (outside a process group: plain batch statistics, as
    nn.SyncBatchNorm) equal to the eager block (output, gradients, running statistics), then eval folded (one
    deformable-conv kernel); restore() gives the SyncBatchNorm back."""
    model = nn.ModuleDict(dict(block=_perturb_dcn(IDAConv(4, 5, deformable=True)).eval()))
    ref = copy.deepcopy(model)
    dla_fast.accelerate(model)
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.train()
    ref.train()
    bn = model["block"].actf[0]
    assert isinstance(bn, nn.SyncBatchNorm) and [p.bn for p in model["block"].fold_pairs()] == [bn]
    x, grad = torch.randn(2, 4, 5, 6), torch.randn(2, 5, 5, 6)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    counter = LaunchCounter(monkeypatch)
    with dla_fast.use_backend("triton"):
        out = model["block"](x_fused)
        out.backward(grad)
    expected = ref["block"](x_ref)
    expected.backward(grad)
    assert_close(out, expected, 1e-5, "block with a SyncBatchNorm, training")
    assert_close(x_fused.grad, x_ref.grad, 1e-4, "grad of the input")
    _compare_grads(model, ref, "block with a SyncBatchNorm")
    assert_same_buffers(model, ref, "after one step")
    for kernel in (FWD_KERNEL, *BWD_KERNELS, "bn_apply_kernel", "bn_backward_apply_kernel"):
        assert kernel in counter.names, f"{kernel} did not run"
    model.eval()
    ref.eval()
    counter.names.clear()
    with dla_fast.use_backend("triton"), torch.no_grad():
        assert_close(model["block"](x), ref["block"](x), 1e-5, "block with a SyncBatchNorm, eval (folded)")
    assert counter.names == [FWD_KERNEL], counter.names
    dla_fast.restore(model)
    assert isinstance(model["block"], IDAConv) and isinstance(model["block"].actf[0], nn.SyncBatchNorm)


def test_replaced_normalization_runs_the_children_as_they_are(monkeypatch):
    """A normalization replaced after accelerate() by one the fused ops cannot take (a GroupNorm here; timm's
    freeze_batch_norm_2d does this with FrozenBatchNorm2d): the standalone block and the IDA step run their
    children eagerly, as accelerate() leaves such modules, on every backend; no deformable-conv kernel runs."""
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(block=IDAConv(4, 5, deformable=True), ida=IDAUpAdd(5, [5, 3], [1, 2],
                                                                                    deformable=True))).train()
    reference = copy.deepcopy(model)
    dla_fast.accelerate(model)
    for m in (model, reference):
        m["block"].actf[0] = nn.GroupNorm(1, 5)
        m["ida"].proj_1.actf[0] = nn.GroupNorm(1, 5)
        m["ida"].node_1.actf[0] = nn.GroupNorm(1, 5)
    model.load_state_dict(reference.state_dict())
    x, coarse = torch.randn(2, 4, 6, 8), torch.randn(2, 3, 3, 4)
    counter = LaunchCounter(monkeypatch)
    with dla_fast.use_backend("triton"):
        out = model["ida"]([model["block"](x), coarse])[-1]
    expected = reference["ida"]([reference["block"](x), coarse])[-1]
    assert_close(out, expected, 1e-5, "output")
    assert not any(name.startswith("deform_conv") for name in counter.names), counter.names


def test_block_rejects_bad_inputs_with_clear_errors():
    from dla_fast.ops.deform_conv.block import dcn_block

    x, weight, bias = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3), torch.randn(6)
    bn = [torch.rand(6) + 0.5, torch.randn(6), torch.randn(6), torch.rand(6) + 0.5]
    with pytest.raises(ValueError, match=r"offset_mask must have shape \(1, 27, 5, 5\)"):
        dcn_block(x, torch.randn(1, 18, 5, 5), weight, bias, *bn)
    with pytest.raises(ValueError, match="input has 3 channels"):
        dcn_block(x[:, :3], torch.randn(1, 27, 5, 5), weight, bias, *bn)
    with pytest.raises(TypeError, match="input must be a floating-point"):
        dcn_block(x.long(), torch.randn(1, 27, 5, 5), weight, bias, *bn)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(6,\)"):
        dcn_block(x, torch.randn(1, 27, 5, 5), weight, bias, bn[0], bn[1], torch.randn(5), bn[3])
    with dla_fast.use_backend("triton"), pytest.raises(dla_fast.BackendUnavailable, match="float64"):
        dcn_block(x.double(), torch.randn(1, 27, 5, 5).double(), weight.double(), bias.double(),
                  *(t.double() for t in bn))
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training"):  # every backend
        dcn_block(x, torch.randn(1, 27, 5, 5), weight, bias, *bn, training=True, eps=0.0)
