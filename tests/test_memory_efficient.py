"""accelerate(model, memory_efficient=True): the fused ops save their inputs and recompute their outputs in the
backward (dla_fast.ops.recompute, dla_fast.nn.memory).

- The whole training step (two steps with an SGD update between them) equals the plain fused path bit for bit:
  outputs, input and parameter gradients, running statistics — the recomputation repeats the forward's own
  deterministic pointwise pass on the same bits.
- Module by module, every kind of fused module (blocks, conv stacks, roots, IDA steps, the DCN block), replayed
  inside the memory-efficient context on the inputs and output gradients it saw in the model, equals the eager
  module it replaced (tests/test_accelerate.py's replay and tolerances).
- It saves fewer bytes: the saved-activation bytes of a training forward (dla_fast.cli.memory) against eager.
"""
import copy

import pytest
import torch
import torch.utils.checkpoint

import dla_fast
from dla_fast.cli.memory import SavedBytes, largest_batch, measure_training_memory, memory_lines, saved_activation_bytes
from dla_fast.models import VARIANTS
from dla_fast.models.blocks import BasicBlock
from dla_fast.nn import FusedDCNBlock
from dla_fast.ops import recompute

from helpers import WIDE_DCN_TILES, assert_close, assert_same_buffers, randomize_bn
from test_accelerate import (FOLDED_TYPES, FUSED_TYPES, ModuleRecorder, _flat, _rebuild, _representative_calls,
                             _without_relu_ties)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPLAYED = FUSED_TYPES + FOLDED_TYPES + (FusedDCNBlock,)

MODELS = [
    ("dla34", dict(num_classes=10)),
    ("dla102x", dict(num_classes=10)),          # BottleneckX, residual roots
    ("dla34up", dict(num_classes=5)),           # DLA-Up: concat up-merges, 1x1 projections as one-child nodes
    ("centernet_dla34", dict(dcn=True, heads={"hm": 3, "wh": 2}, head_conv=16)),  # deformable IDA convs
]


def _outputs(output):
    """The output tensors of a backbone, DLA-Up or CenterNet, in a fixed order."""
    if isinstance(output, list):  # CenterNet: [dict(head -> tensor)]
        return [output[0][k] for k in sorted(output[0])]
    return list(output) if isinstance(output, tuple) else [output]


class RecipeCounter:
    """Counts what the saved-tensor hooks pack: tensors and recipes."""

    def __init__(self):
        self.tensors = self.recipes = 0

    def __call__(self, packed):
        if isinstance(packed, recompute.Recipe):
            self.recipes += 1
        else:
            self.tensors += 1


def _values_per_channel(call) -> int:
    """The fewest values per channel among a call's inputs and outputs (what its BatchNorms reduce over)."""
    return min(t.shape[0] * t.shape[2] * t.shape[3] for t in call["inputs"] + call["outs"] if t.dim() == 4)


def _training_step(model, x, grads, recorder_types=None):
    """One forward and backward (the outputs' gradients given): (outputs, grad of x, parameter grads, saved
    bytes of the forward, RecipeCounter of the forward, ModuleRecorder or None)."""
    leaf = x.clone().requires_grad_()
    recorder = ModuleRecorder(model, recorder_types) if recorder_types else None
    counter = RecipeCounter()
    with SavedBytes(model) as saved, recompute.observe_saved(counter):
        outs = _outputs(model(leaf))
    torch.autograd.backward(outs, grads)
    if recorder is not None:
        recorder.remove()
    params = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], leaf.grad, params, saved.bytes, counter, recorder


def _replay_memory_efficient(call):
    """The recorded fused call inside recompute_activations() and its eager original: equal outputs, input and
    parameter gradients, BatchNorm buffers. Returns how many recipes the fused replay saved."""
    where = call["name"]
    runs, counter = [], RecipeCounter()
    for fused_path in (True, False):
        module = copy.deepcopy(call["module"] if fused_path else call["module"].original)
        module.load_state_dict(call["state"])
        module.train(True)
        leaves = [t.clone().requires_grad_() for t in call["inputs"]]
        with dla_fast.use_backend("triton" if fused_path else "torch"):
            if fused_path:
                with recompute.observe_saved(counter), recompute.recompute_activations():
                    output = module(*_rebuild(call["args"], leaves))
            else:
                output = module(*_rebuild(call["args"], leaves))
        runs.append(([t for t in _flat(output) if all(t is not leaf for leaf in leaves)], leaves, module))
    (fused_outs, fused_leaves, fused), (eager_outs, eager_leaves, eager) = runs
    for k, (a, b) in enumerate(zip(fused_outs, eager_outs)):
        assert_close(a, b, 1e-5, f"{where}: output {k}")
    grads = _without_relu_ties(call["grads"], fused_outs, eager_outs)
    for outs, leaves, backend in ((fused_outs, fused_leaves, "triton"), (eager_outs, eager_leaves, "torch")):
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        with dla_fast.use_backend(backend):
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    for k, (a, b) in enumerate(zip(fused_leaves, eager_leaves)):
        if b.grad is not None:
            assert_close(a.grad, b.grad, 1e-4, f"{where}: grad of input {k}")
    eager_params = dict(eager.named_parameters())
    scale = max(p.grad.abs().max().item() for p in eager_params.values() if p.grad is not None)
    for name, p in fused.named_parameters():
        expected = eager_params[name].grad
        if expected is None:
            continue
        if expected.abs().max() <= 1e-6 * scale:  # a conv bias before a training-mode BatchNorm: zero up to rounding
            assert p.grad.abs().max() <= 1e-5 * scale, f"{where}: grad of {name} should vanish"
        else:
            assert_close(p.grad, expected, 1e-4, f"{where}: grad of {name}")
    assert_same_buffers(fused, eager, f"{where} after the call")
    return counter.recipes


@pytest.fixture
def narrow_variants(monkeypatch):
    """dla34's and dla102x's structure at a quarter of their widths (the interpreter's time goes with them)."""
    for variant in ("dla34", "dla102x"):
        levels, channels, block, extra = VARIANTS[variant]
        monkeypatch.setitem(VARIANTS, variant, (levels, tuple(c // 4 for c in channels), block, extra))


@pytest.mark.interpreter
@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_memory_efficient_training_equals_fused_path_and_eager(name, kwargs, narrow_variants, monkeypatch):
    """Backend triton (the blocks train through conv + fused BatchNorm-act): a training step of the
    memory-efficient model equals the plain accelerated model's bit for bit (outputs, input and parameter
    gradients, running statistics) while saving recipes and fewer bytes; one fused module of each kind, replayed
    inside the memory-efficient context, equals its eager original."""
    if kwargs.get("dcn") and DEVICE == "cpu":  # wide DCN tiles: the interpreter's cost is per K-chunk loop step
        from dla_fast.ops.deform_conv import launch
        for kernel, tiles in WIDE_DCN_TILES.items():
            monkeypatch.setitem(launch.TILE_OVERRIDES, kernel, tiles)
    ref = randomize_bn(dla_fast.create_model(name, **kwargs)).to(DEVICE).train()
    plain, efficient = copy.deepcopy(ref), copy.deepcopy(ref)
    dla_fast.accelerate(plain)
    dla_fast.accelerate(efficient, memory_efficient=True)
    x = torch.randn(2, 3, 32, 32, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        grads = [torch.randn_like(o) for o in _outputs(copy.deepcopy(ref).eval()(x))]
    with dla_fast.use_backend("triton"):
        outs, x_grad, params, plain_bytes, plain_counter, _ = _training_step(plain, x, grads)
        got_outs, got_x_grad, got_params, efficient_bytes, counter, recorder = _training_step(
            efficient, x, grads, recorder_types=REPLAYED)
    assert plain_counter.recipes == 0 and counter.recipes > 0
    assert efficient_bytes < 0.75 * plain_bytes, (efficient_bytes, plain_bytes)
    for k, (a, b) in enumerate(zip(got_outs, outs)):
        assert torch.equal(a, b), f"output {k} differs from the fused path's"
    assert torch.equal(got_x_grad, x_grad), "the input gradient differs from the fused path's"
    assert got_params.keys() == params.keys()
    for p_name, g in got_params.items():
        assert torch.equal(g, params[p_name]), f"grad of {p_name} differs from the fused path's"
    for (b_name, a), (_, b) in zip(efficient.named_buffers(), plain.named_buffers()):
        assert torch.equal(a, b), f"{b_name} differs from the fused path's"
    # level 5 sees 2 values per channel at 32x32 (BatchNorm over 2 values: fp32 rounding alone moves outputs and
    # gradients by 1e-5..1e-4 there); the replays take the smallest call of each kind with 8 or more
    representatives = _representative_calls([c for c in recorder.calls if _values_per_channel(c) >= 8])
    kinds = {type(c["module"]) for c in representatives}
    assert kinds & set(FOLDED_TYPES) and kinds & (set(FUSED_TYPES) | {FusedDCNBlock}), kinds
    assert sum(_replay_memory_efficient(call) for call in representatives) > 0, "no replay saved a recipe"


def test_memory_efficient_mode_is_reversible_and_idle_without_gradients():
    """Inside the model's forward the context is open when gradients are enabled, not otherwise; a deep copy keeps
    the mode; restore() removes the hooks."""
    model = dla_fast.create_model("dla34", num_classes=10)
    dla_fast.accelerate(model, memory_efficient=True)
    seen = []
    model.level0[0].register_forward_pre_hook(lambda m, a: seen.append(recompute.active()))  # kept by restore()
    with dla_fast.use_backend("torch"):
        model(torch.randn(2, 3, 32, 32))
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, 32, 32))
    assert seen == [True, False] and not recompute.active()
    twin = copy.deepcopy(model)  # an EMA copy keeps the mode
    with dla_fast.use_backend("torch"):
        twin.train()(torch.randn(2, 3, 32, 32))
    assert seen[-1] is True
    dla_fast.restore(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
    model(torch.randn(1, 3, 32, 32))
    assert seen[-1] is False


def test_context_is_left_when_the_forward_raises():
    model = dla_fast.create_model("dla34", num_classes=10)
    dla_fast.accelerate(model, memory_efficient=True)
    with pytest.raises(ValueError):
        model(torch.randn(1, 3, 33, 33))  # sides must be divisible by 32
    assert not recompute.active()


@pytest.mark.interpreter
@pytest.mark.parametrize("name, kwargs, size, batch, ratio", [
    ("dla34", dict(num_classes=1000), 224, 2, 0.6),
    ("centernet_dla34", dict(heads={"hm": 80, "wh": 2, "reg": 2}, head_conv=256, dcn=True), 256, 1, 0.65),
])
def test_memory_efficient_mode_saves_at_most_this_fraction_of_eager(name, kwargs, size, batch, ratio, monkeypatch):
    """Saved-activation bytes of one fp32 training forward, memory_efficient (with and without conv="triton") vs
    eager, backend triton. What autograd
    saves depends on shapes, not values, so every Triton launch is skipped (outputs stay uninitialized; the eager
    convs run): the interpreter would take many minutes at these sizes (benchmarks/saved_memory.py --check shows
    the counts equal with and without the kernels; README: the numbers at 512x512 for CenterNet)."""
    from triton.runtime.interpreter import InterpretedFunction

    model = dla_fast.create_model(name, **kwargs).train()
    x = torch.randn(batch, 3, size, size)
    eager_bytes = saved_activation_bytes(model, x)
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)
    saved = {}
    for options in (dict(), dict(memory_efficient=True), dict(conv="triton"),
                    dict(memory_efficient=True, conv="triton")):
        accelerated = dla_fast.accelerate(copy.deepcopy(model), **options)
        with dla_fast.use_backend("triton"):
            saved[tuple(options.items())] = saved_activation_bytes(accelerated, x.contiguous(
                memory_format=torch.channels_last)) / eager_bytes
    plain, efficient, conv_chain, both = saved.values()
    assert efficient <= ratio and both <= ratio, saved
    # the implicit-GEMM conv chains (BatchNorm + ReLU in the next conv's prologue) save less than the plain
    # accelerated model: no normalized activation is kept (dla34 224²: 0.81x against 0.90x)
    assert conv_chain < plain - 0.03, saved


def test_training_memory_and_largest_batch():
    """CPU: the saved-activation bytes per image and the parameters' three copies give the batch within a
    budget; the budget arithmetic itself; bench's --memory-budget needs --train."""
    model = dla_fast.create_model("dla34", num_classes=10).train()
    report = measure_training_memory(model, lambda b: torch.randn(b, 3, 32, 32), None, 2, torch.device("cpu"),
                                     budget_bytes=10**9)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert report.peak_bytes == 2 * report.bytes_per_image > 0 and report.fixed_bytes == 3 * params
    assert report.largest_batch == int((10**9 - 3 * params) // report.bytes_per_image)
    assert largest_batch(100, 30, 1000) == 30 and largest_batch(2000, 30, 1000) == 0
    with pytest.raises(ValueError, match="bytes_per_image"):
        largest_batch(0, 0, 1000)
    assert "training memory" in memory_lines([("eager", report)])[0]
    assert "largest batch within 1 GB" in memory_lines([("eager", report)])[1]
    from dla_fast.cli import main
    assert main(["bench", "--memory-budget", "1", "--device", "cpu"]) == 2  # a usage error: --train missing


@pytest.mark.interpreter
def test_memory_efficient_mode_under_checkpointed_stages():
    """Stages wrapped in torch.utils.checkpoint (what timm's set_grad_checkpointing does; both variants) inside a
    memory-efficient model, backend triton (blocks through conv + fused BatchNorm-act): the checkpoint's hooks take
    over inside those stages, the mode's recipes serve the rest, and outputs, gradients and running statistics
    equal the plain accelerated model's with the same checkpoints (whose recomputed forwards update the running
    statistics a second time, as any checkpointed BatchNorm does)."""
    results = []
    for memory_efficient in (False, True):
        for use_reentrant in (False, True):
            torch.manual_seed(0)
            stem = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
                                       torch.nn.ReLU(inplace=True))
            model = torch.nn.Sequential(stem, CheckpointedStage(torch.nn.Sequential(
                BasicBlock(4, 4), BasicBlock(4, 4)), use_reentrant), BasicBlock(4, 4)).train()
            randomize_bn(model)
            dla_fast.accelerate(model, memory_efficient=memory_efficient)
            x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
            counter = RecipeCounter()
            with dla_fast.use_backend("triton"), recompute.observe_saved(counter):
                out = model(x)
            with dla_fast.use_backend("triton"):
                out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
            assert (counter.recipes > 0) == memory_efficient
            results.append((out.detach(), x.grad, [p.grad for p in model.parameters()],
                            [b.clone() for b in model.buffers()]))
    for out, x_grad, grads, buffers in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(x_grad, results[0][1])
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][2]))
        assert all(torch.equal(a, b) for a, b in zip(buffers, results[0][3]))


class CheckpointedStage(torch.nn.Module):
    """`stage` under torch.utils.checkpoint."""

    def __init__(self, stage, use_reentrant):
        super().__init__()
        self.stage, self.use_reentrant = stage, use_reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.stage, x, use_reentrant=self.use_reentrant)


def test_blocks_train_through_the_fused_op_in_the_mode_under_auto(monkeypatch):
    """Under `auto` on CUDA the blocks' training BatchNorm stays eager (AUTO_CHOICE['batchnorm_act_training']),
    which saves what eager saves; inside the memory-efficient mode they take the fused op's choice instead (a GPU
    stands in: `resolve` answers as it does for CUDA tensors under auto)."""
    from dla_fast.nn import folded

    model = dla_fast.accelerate(dla_fast.create_model("dla34", num_classes=10))
    pairs, x = model.level2.tree1.pairs, torch.randn(2, 32, 8, 8)
    monkeypatch.setattr(dla_fast.backend, "resolve",
                        lambda device, op="", dtype=None: dla_fast.backend.AUTO_CHOICE.get(op, "triton"))
    assert not folded.fused_training_applies(pairs, x)
    with recompute.recompute_activations():
        assert folded.fused_training_applies(pairs, x)
