"""accelerate() on whole DLA models: same state_dict, outputs, gradients and BN statistics; reversible.

Whole-model outputs are compared directly in eval mode. Gradients, and everything in training mode, are
compared module by module: every fused module is replayed, from the state it had, on the inputs and output
gradients it really saw inside the model, against the eager module it replaced. Whole-model fp32 gradients of
a deep BatchNorm network are chaotic under any change of summation order (ReLU and max-pool ties, batch
statistics over few values): eager PyTorch itself, NCHW or channels_last, is 1e-3..1e-2 away from an fp64
run on these inputs, so a direct comparison would test the conditioning, not the kernels. Likewise a replay gives
no gradient to an output that is a ReLU tie (within the forward's tolerance of 0: rounding picks its side).
"""
import copy
import types

import pytest
import torch

import dla_fast
from dla_fast.nn import FusedIDAUp, FusedIDAUpAdd, FusedRoot
from dla_fast.nn import folded as folded_module
from dla_fast.nn.folded import FoldedBasicBlock, FoldedBottleneck, FoldedConvBNStack

from helpers import LaunchCounter, assert_close, assert_same_buffers, randomize_bn

timm = pytest.importorskip("timm")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED_TYPES = (FusedRoot, FusedIDAUp, FusedIDAUpAdd)
FOLDED_TYPES = (FoldedBasicBlock, FoldedBottleneck, FoldedConvBNStack)
BN_TRAINING_KERNELS = ("channel_stats_partial_kernel", "channel_stats_merge_kernel", "bn_apply_kernel",
                       "bn_backward_reduce_partial_kernel", "bn_backward_reduce_merge_kernel",
                       "bn_backward_apply_kernel")


def _flat(value):
    """The tensors of a module's input or output (tensors, lists, tuples), each once."""
    if isinstance(value, torch.Tensor):
        return [value]
    out = []
    for item in value:
        out += [t for t in _flat(item) if all(t is not o for o in out)]
    return out


def _rebuild(value, tensors):
    """`value` with its tensors replaced, in _flat order, by `tensors` (a tensor given twice, e.g. a block's input
    that is also its residual, is replaced by the same new tensor both times)."""
    replacement = {id(t): new for t, new in zip(_flat(value), tensors)}

    def walk(v):
        if isinstance(v, torch.Tensor):
            return replacement[id(v)]
        return type(v)(walk(x) for x in v)

    return walk(value)


class ModuleRecorder:
    """Records, for every fused module of a model in one step: its inputs, its state before the call, its outputs
    and the gradients that reached them."""

    def __init__(self, model, types=FUSED_TYPES):
        self.calls, self.handles = [], []
        for name, module in model.named_modules():
            if isinstance(module, types):
                self.handles.append(module.register_forward_pre_hook(self._before(name)))
                self.handles.append(module.register_forward_hook(self._after))

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def _before(self, name):
        def hook(module, args):
            self.calls.append(dict(name=name, module=module, args=args, inputs=[t.detach().clone() for t in _flat(args)],
                                   state={k: v.clone() for k, v in module.state_dict().items()}))
        return hook

    def _after(self, module, args, output):
        call = self.calls[-1]
        inputs = _flat(args)
        outs = [t for t in _flat(output) if all(t is not i for i in inputs)]  # IDAUpAdd passes layers[0] on
        call["outs"] = [t.detach().clone() for t in outs]
        call["grads"] = [None] * len(outs)
        for k, t in enumerate(outs):
            t.register_hook(lambda grad, k=k: call["grads"].__setitem__(k, grad.detach().clone()))


def _replay(call, fused_path, training, kernels):
    """The recorded call's forward again, from the recorded state: the fused module, or the eager one it replaced.
    Returns (outputs, input leaves, module); _replay_backward runs the backward."""
    module = copy.deepcopy(call["module"] if fused_path else call["module"].original)
    module.load_state_dict(call["state"])
    module.train(training)
    leaves = [t.clone().requires_grad_() for t in call["inputs"]]
    with dla_fast.use_backend(kernels if fused_path else "torch"):
        output = module(*_rebuild(call["args"], leaves))
    return [t for t in _flat(output) if all(t is not leaf for leaf in leaves)], leaves, module


def _replay_backward(outs, grads, leaves, backend):
    """The replayed call's backward with the output gradients `grads`; the gradients of its inputs."""
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
    with dla_fast.use_backend(backend):
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return [leaf.grad for leaf in leaves]


def _without_relu_ties(grads, fused_outs, eager_outs):
    """The recorded output gradients, zeroed where an output is a ReLU tie: positive in either replay but within
    the forward's tolerance (1e-5 of the largest output) of 0. There rounding alone decides the ReLU's side, so
    the two fp32 replays (and an fp64 one) may disagree on the mask, and with it on a whole training-mode
    BatchNorm channel's sums and on that row's input gradient (dla169: a pre-ReLU value of 2.4e-7 beside conv
    outputs of 10 flipped one root's input gradients by 2e-2). With a zero gradient there the mask does not
    matter; elements that both replays set to 0 keep their gradient, so the mask is still tested (an output
    without a ReLU, a projection, only loses the gradient of its few smallest positive values)."""
    untied = []
    for g, a, b in zip(grads, fused_outs, eager_outs):
        if g is not None:
            band = 1e-5 * b.abs().max()
            ties = ((a > 0) & (a <= band)) | ((b > 0) & (b <= band))
            # ties are rare (dla169: 22 of 532,480); many mean a real mask bug, e.g. tiny positives written where
            # eager has zeros, which this rule must not hide
            assert int(ties.sum()) <= max(4, 1e-4 * g.numel()), f"{int(ties.sum())} of {g.numel()} outputs in (0, {band:.3g}]"
            g = g.masked_fill(ties, 0)
        untied.append(g)
    return untied


def _check_modules(recorder, training, types, kernels, in_model=True):
    """Every recorded fused module of `types` equals its eager original on what it saw: outputs (also the ones it
    produced inside the model, unless in_model=False: the call is replayed in another mode than recorded), input
    and parameter gradients, BatchNorm buffers after the call."""
    calls = [c for c in recorder.calls if isinstance(c["module"], types)]
    assert calls, "no fused module ran"
    for call in calls:
        where = f"{call['name']} ({'train' if training else 'eval'})"
        eager_outs, eager_leaves, eager = _replay(call, False, training, kernels)
        for k, (seen, expected) in enumerate(zip(call["outs"], eager_outs) if in_model else ()):
            assert_close(seen, expected, 1e-5, f"{where}: output {k} in the model")
        fused_outs, fused_leaves, fused = _replay(call, True, training, kernels)
        for k, (a, b) in enumerate(zip(fused_outs, eager_outs)):
            assert_close(a, b, 1e-5, f"{where}: output {k}")
        grads = _without_relu_ties(call["grads"], fused_outs, eager_outs)
        eager_grads = _replay_backward(eager_outs, grads, eager_leaves, "torch")
        fused_grads = _replay_backward(fused_outs, grads, fused_leaves, kernels)
        for k, (a, b) in enumerate(zip(fused_grads, eager_grads)):
            if b is not None:
                assert_close(a, b, 1e-4, f"{where}: grad of input {k}")
        eager_params = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
        scale = max(g.abs().max().item() for g in eager_params.values())
        for name, p in fused.named_parameters():
            if name not in eager_params:
                continue
            if eager_params[name].abs().max() <= 1e-6 * scale:
                # a conv bias feeding a training-mode BatchNorm has an exactly zero gradient: rounding only
                assert p.grad.abs().max() <= 1e-5 * scale, f"{where}: grad of {name} should vanish"
            else:
                assert_close(p.grad, eager_params[name], 1e-4, f"{where}: grad of {name}")
        assert_same_buffers(call["module"] if in_model else fused, eager, f"{where} after the call")


def _first_tensor(output):
    """The output a test compares whole: logits, DLA-Up's log-probabilities, or CenterNet's heatmap."""
    if isinstance(output, tuple):
        return output[0]
    if isinstance(output, list):
        return output[0]["hm"]
    return output


def _check_accelerated(ref, fused, expected_kernels, monkeypatch, replayed=FUSED_TYPES, kernels="triton",
                       fused_blocks=False):
    """accelerate() keeps the state_dict; eval outputs equal; every fused module (of the `replayed` types)
    equals its original in an eval and a training step (forward and backward), and the listed Triton kernels
    ran in each step. fused_blocks: the blocks train through their fused path (conv + fused BatchNorm, whose
    kernels must run), so the roots are replayed on what fused blocks gave them, and in the training step one
    block of each kind is replayed too, the smallest (level 5: 8 values per channel; every block:
    test_accelerated_blocks_train_like_the_originals)."""
    keys_before = {k: v.clone() for k, v in fused.state_dict().items()}
    if not fused_blocks:
        # The blocks' own training path (conv + fused BatchNorm) is tested by test_accelerated_blocks_train_like_
        # the_originals (and by the fused_blocks case); here the blocks run their eager modules in training, as
        # before, so these tests check the fused roots and up-merges on the same inputs as ever and within the
        # interpreter's time.
        monkeypatch.setattr(folded_module, "fused_training_applies", lambda pairs, x: False)
    dla_fast.accelerate(fused)
    after = fused.state_dict()
    assert list(after) == list(keys_before)
    assert all(torch.equal(after[k], v) for k, v in keys_before.items())
    fused_names = [n for n in dla_fast.accelerated_modules(fused) if isinstance(fused.get_submodule(n), FUSED_TYPES)]

    counter = LaunchCounter(monkeypatch)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)  # level 5 sees 2x2x2 values per channel
    for training in (False, True):
        ref.train(training), fused.train(training)
        counter.names.clear()
        recorder = ModuleRecorder(fused, FUSED_TYPES + (FOLDED_TYPES if fused_blocks else ()))
        with dla_fast.use_backend(kernels):
            out = _first_tensor(fused(x))
            if not training:
                assert_close(out, _first_tensor(ref(x)), 1e-5, "eval output of the whole model")
            out.backward(torch.randn_like(out))
        recorder.remove()
        assert sorted({c["name"] for c in recorder.calls if isinstance(c["module"], FUSED_TYPES)}) == sorted(
            fused_names)
        for kernel in expected_kernels + (list(BN_TRAINING_KERNELS) if fused_blocks and training else []):
            assert kernel in counter.names, f"{kernel} did not run"
        if kernels == "cuda":  # the BatchNorm steps ran in the extension, not in Triton
            assert "bn_apply_kernel" not in counter.names and "bn_backward_reduce_partial_kernel" not in counter.names
        calls = [c for c in recorder.calls if isinstance(c["module"], replayed)]
        if fused_blocks and training:
            calls += _representative_calls([c for c in recorder.calls if isinstance(c["module"], FOLDED_TYPES)])
        _check_modules(types.SimpleNamespace(calls=calls), training, replayed + FOLDED_TYPES, kernels)
    return fused_names


EXTENSION_BUILT, EXTENSION_DETAIL = dla_fast.backend.extension_status()
WITH_EXTENSION = pytest.mark.skipif(not EXTENSION_BUILT, reason=f"the extension dla_fast._C is {EXTENSION_DETAIL}")


@pytest.mark.interpreter
@pytest.mark.parametrize("name, source, roots, kernels, fused_blocks", [
    ("dla34", "timm", 6, "triton", False),          # plain roots
    pytest.param("dla102", "timm", 14, "triton", False, marks=pytest.mark.slow),  # residual roots (and below)
    # DLA-169's layout (roots with up to 7 children, residual roots, Bottleneck blocks) at a quarter of its widths
    # (its full widths: 7 minutes in the interpreter); the blocks train fused
    pytest.param("dla169", "narrow", 23, "triton", True, marks=pytest.mark.slow),
    pytest.param("dla34", "timm", 6, "cuda", False, marks=WITH_EXTENSION, id="dla34-extension"),  # BN steps in _C
])
def test_accelerated_backbone_equals_original(name, source, roots, kernels, fused_blocks, monkeypatch):
    if source == "narrow":
        from dla_fast.models.dla import DLA, VARIANTS

        levels, channels, block, kwargs = VARIANTS[name]
        ref = randomize_bn(DLA(levels, [c // 4 for c in channels], block, num_classes=10, **kwargs))
    else:
        ref = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10))
    if source in ("timm", "narrow"):
        fused = copy.deepcopy(ref)
    else:
        fused = dla_fast.create_model(name, num_classes=10)
        fused.load_state_dict(ref.state_dict())
    names = _check_accelerated(ref.to(DEVICE), fused.to(DEVICE),
                               ["aggregate_fwd_kernel", "aggregate_grad_input_kernel"], monkeypatch, kernels=kernels,
                               fused_blocks=fused_blocks)
    assert len(names) == roots
    assert sum(isinstance(m, FusedRoot) for m in fused.modules()) == roots


@pytest.mark.interpreter
@pytest.mark.parametrize("name, kwargs, fused_ida", [
    pytest.param("dla34up", dict(num_classes=5), 4, marks=pytest.mark.slow),
    pytest.param("centernet_dla34", dict(dcn=False, heads={"hm": 3, "wh": 2}, head_conv=16), 4,
                 marks=pytest.mark.slow),
])
def test_accelerated_up_path_equals_original(name, kwargs, fused_ida, monkeypatch):
    """DLA-Up (concat merge) and CenterNet (add merge, plain convs): the IDA steps run fused. CenterNet with
    deformable convs: tests/test_dcn_block.py (the whole model in eval, the fused block and IDA step in training;
    replaying the whole DCN model here in the interpreter takes over 10 minutes)."""
    ref = randomize_bn(dla_fast.create_model(name, **kwargs)).to(DEVICE)
    fused = copy.deepcopy(ref)
    names = _check_accelerated(ref, fused, ["aggregate_fwd_kernel", "upsample_merge_fwd_kernel"], monkeypatch,
                               replayed=(FusedIDAUp, FusedIDAUpAdd))  # the backbone's roots: tests above
    assert sum(isinstance(m, (FusedIDAUp, FusedIDAUpAdd)) for m in fused.modules()) == fused_ida
    assert len(names) == 6 + fused_ida


@pytest.mark.interpreter
def test_restore_undoes_accelerate():
    model = dla_fast.create_model("dla34up", num_classes=3)
    swapped = {name: m for name, m in model.named_modules() if type(m).__name__ in ("Root", "IDAUp")}
    dla_fast.accelerate(model)
    assert all(isinstance(model.get_submodule(n), FUSED_TYPES) for n in swapped)
    assert model.base.level2.root.conv is swapped["base.level2.root"].conv
    assert model.dla_up.ida_0.node_1 is swapped["dla_up.ida_0"].node_1
    assert model.base.base_layer[0].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="already accelerated"):
        dla_fast.accelerate(model)
    dla_fast.restore(model)
    assert all(model.get_submodule(n) is m for n, m in swapped.items())
    assert model.base.base_layer[0].weight.is_contiguous()
    assert dla_fast.accelerated_modules(model) == []
    with pytest.raises(RuntimeError, match="not accelerated"):
        dla_fast.restore(model)


def test_accelerate_rejects_a_model_without_dla_nodes():
    with pytest.raises(ValueError, match="nothing to fuse"):
        dla_fast.accelerate(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))


def test_non_1x1_roots_stay_eager_with_a_warning():
    from dla_fast.models import Root

    model = torch.nn.ModuleDict(dict(a=Root(8, 4, kernel_size=1), b=Root(8, 4, kernel_size=3)))
    with pytest.warns(UserWarning, match=r"b: kernel_size \(3, 3\)"):
        dla_fast.accelerate(model)
    assert isinstance(model["a"], FusedRoot) and isinstance(model["b"], Root)


def test_accelerated_model_on_cpu_with_auto_backend_runs_eager():
    """backend auto on CPU tensors: the eager reference, identical to the original model."""
    ref = randomize_bn(dla_fast.create_model("dla46_c")).eval()
    fused = dla_fast.accelerate(copy.deepcopy(ref))
    x = torch.randn(1, 3, 32, 32)
    with dla_fast.use_backend("auto"), torch.no_grad():
        assert_close(fused(x), ref(x), 1e-5)


def test_roots_the_kernel_cannot_take_stay_eager_and_restore_keeps_the_layout():
    """A root conv with a bias stays eager (named in the warning); a model that was channels_last before
    accelerate() is still channels_last after restore()."""
    from dla_fast.models import Root

    model = torch.nn.ModuleDict(dict(a=Root(8, 4), b=Root(8, 4)))
    model["b"].conv = torch.nn.Conv2d(8, 4, 1, bias=True)
    model.to(memory_format=torch.channels_last)
    with pytest.warns(UserWarning, match=r"b: a 1x1 conv with .* bias True"):
        dla_fast.accelerate(model)
    assert isinstance(model["a"], FusedRoot) and isinstance(model["b"], Root)
    dla_fast.restore(model)
    assert model["a"].conv.weight.is_contiguous(memory_format=torch.channels_last)


def _check_training_steps(call, momentum, kernels, counter, steps=2):
    """The recorded module, fused and eager, trained side by side for `steps` steps from its recorded state
    (every BatchNorm given `momentum`; each step's input a fresh scaling of the recorded one, the recorded
    output gradient): equal outputs, input and accumulated parameter gradients, and BatchNorm buffers
    (running statistics, num_batches_tracked) after every step; the fused BatchNorm kernels ran each step."""
    where = f"{call['name']} (momentum={momentum})"
    modules = []
    for fused_path in (True, False):
        module = copy.deepcopy(call["module"] if fused_path else call["module"].original)
        module.load_state_dict(call["state"])
        module.train(True)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = momentum
        modules.append(module)
    fused, eager = modules
    for step in range(steps):
        scale = 1.0 + 0.25 * step
        results = []
        for module, kernels_used in ((fused, kernels), (eager, "torch")):
            leaves = [(t * scale).requires_grad_() for t in call["inputs"]]
            counter.names.clear()
            with dla_fast.use_backend(kernels_used):
                output = module(*_rebuild(call["args"], leaves))
                outs = [t for t in _flat(output) if all(t is not leaf for leaf in leaves)]
                torch.autograd.backward(outs, [g for g in call["grads"]])
            if module is fused:
                for kernel in BN_TRAINING_KERNELS:
                    assert kernel in counter.names, f"{where}: {kernel} did not run in step {step}"
            results.append((outs, [leaf.grad for leaf in leaves]))
        (fused_outs, fused_grads), (eager_outs, eager_grads) = results
        for k, (a, b) in enumerate(zip(fused_outs, eager_outs)):
            assert_close(a, b, 1e-5, f"{where}: output {k}, step {step}")
        for k, (a, b) in enumerate(zip(fused_grads, eager_grads)):
            assert_close(a, b, 1e-4, f"{where}: grad of input {k}, step {step}")
        eager_params = dict(eager.named_parameters())
        for name, p in fused.named_parameters():
            if p.grad is not None and eager_params[name].grad.abs().max() > 0:
                assert_close(p.grad, eager_params[name].grad, 1e-4, f"{where}: grad of {name}, step {step}")
        assert_same_buffers(fused, eager, f"{where} after step {step}")


def _representative_calls(calls):
    """One call of each replaced type (blocks: one with and one without a separate residual input), the one with
    the fewest input values (the interpreter's time goes with the size)."""
    chosen = {}
    for call in calls:
        key = (type(call["module"]).__name__, len(call["inputs"]) > 1)
        size = sum(t.numel() for t in call["inputs"])
        if key not in chosen or size < chosen[key][0]:
            chosen[key] = (size, call)
    return [call for _, call in chosen.values()]


@pytest.mark.interpreter
@pytest.mark.parametrize("name, replaced, whole_model", [
    ("dla34", (FoldedBasicBlock, FoldedConvBNStack), True),
    pytest.param("dla60", (FoldedBottleneck, FoldedConvBNStack), False,  # Bottleneck (timm's DlaBottleneck)
                 marks=pytest.mark.slow),
    pytest.param("dla102x", (FoldedBottleneck, FoldedConvBNStack), False,  # BottleneckX: grouped 3x3
                 marks=pytest.mark.slow),
])
def test_accelerated_blocks_train_like_the_originals(name, replaced, whole_model, monkeypatch):
    """Every residual block and conv-BN-ReLU stack accelerate() replaced, with backend triton, runs its convs plus
    the fused BatchNorm [+ residual] + ReLU kernels and equals the module it replaced on the inputs and output
    gradients it saw inside the model: outputs, input and parameter gradients, running statistics, in training
    (one step, then several steps with momentum 0.1 and None) and in eval with gradients wanted.

    dla34: the whole training step runs with backend triton and every replaced module is replayed. dla60/dla102x:
    the step is recorded eagerly (the same inputs and gradients; the interpreter's time is the limit) and one
    module of each replaced type is replayed (blocks: with and without a separate residual input)."""
    model = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10)).to(DEVICE)
    dla_fast.accelerate(model)
    folded_names = [n for n in dla_fast.accelerated_modules(model)
                    if isinstance(model.get_submodule(n), FOLDED_TYPES)]
    assert {type(model.get_submodule(n)) for n in folded_names} == set(replaced)
    counter = LaunchCounter(monkeypatch)
    model.train()
    recorder = ModuleRecorder(model, FOLDED_TYPES)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)  # level 5 sees 2x2x2 values per channel
    with dla_fast.use_backend("triton" if whole_model else "torch"):
        out = model(x)
        out.backward(torch.randn_like(out))
    recorder.remove()
    assert sorted({c["name"] for c in recorder.calls}) == sorted(folded_names)
    if whole_model:
        for kernel in BN_TRAINING_KERNELS:
            assert kernel in counter.names, f"{kernel} did not run"
    representatives = _representative_calls(recorder.calls)
    assert {type(c["module"]) for c in representatives} == set(replaced)
    _check_modules(types.SimpleNamespace(calls=recorder.calls if whole_model else representatives), True,
                   FOLDED_TYPES, "triton")
    _check_modules(types.SimpleNamespace(calls=representatives), False, FOLDED_TYPES, "triton",
                   in_model=False)  # eval mode with gradients wanted: the running statistics normalize
    for call in representatives:
        _check_training_steps(call, 0.1, "triton", counter, steps=2)
        _check_training_steps(call, None, "triton", counter, steps=2)


def test_auto_backend_keeps_the_eager_training_path():
    """backend auto: the blocks' training path stays eager (AUTO_CHOICE) until a GPU measurement says otherwise."""
    assert dla_fast.backend.AUTO_CHOICE["batchnorm_act_training"] == "torch"
    assert dla_fast.backend.resolve(torch.device("cuda"), "batchnorm_act_training") == "torch"
