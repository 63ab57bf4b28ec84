"""Deploying plain and accelerated models (README "Deploying"): ONNX with the default (dynamo) exporter, opset 19,
run in onnxruntime; the TorchScript-based ONNX exporter and torch.jit.trace of accelerated models; torch.export
programs (train and eval) saved, loaded in a fresh process and run; AOTInductor packages loaded in a fresh
process that never imports dla_fast.

References: the eager model itself (plain, or accelerated with the same backend), or the plain eager model
where the accelerated one would run Triton's interpreter for minutes (the accelerated model equals it to 1e-5
in fp32: tests/test_accelerate.py). Inputs are small (64x64, batch 1; 32x32 where Triton's interpreter runs).
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dla_fast

from helpers import assert_close, randomize_bn, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5  # fp32 relative error against eager

# (name, create_model kwargs, number of image inputs: CenterTrack takes img, pre_img and pre_hm)
MODELS = [
    ("dla34", {}),
    ("dla34up", {"num_classes": 5}),
    ("centernet_dla34", {"heads": {"hm": 3, "wh": 2, "reg": 2}, "head_conv": 32, "dcn": True}),
    ("centernet_dla34", {"heads": {"hm": 3, "wh": 2, "reg": 2}, "head_conv": 32, "dcn": False}),
    ("centertrack_dla34", {"heads": {"hm": 3, "reg": 2, "wh": 2, "tracking": 2}, "head_conv": 32}),
]


def _id(case):
    name, kwargs = case
    return name + {True: "-dcn", False: "-conv"}.get(kwargs.get("dcn"), "") if "centernet" in name else name


def _model(name, kwargs, accelerated, train=False):
    if "dcn" in kwargs or name.startswith("centertrack"):
        pytest.importorskip("torchvision")
    model = randomize_bn(dla_fast.create_model(name, **kwargs)).train(train)
    return dla_fast.accelerate(model) if accelerated else model


def _inputs(name, size=64, batch=1):
    img = torch.randn(batch, 3, size, size)
    if name.startswith("centertrack"):
        return img, torch.randn(batch, 3, size, size), torch.rand(batch, 1, size, size)
    return (img,)


def _leaves(out):
    """A model's output tensors in a fixed order (CenterNet's [dict] flattened by head name order)."""
    return torch.utils._pytree.tree_leaves(out)


def _run_fresh(code: str, import_dla_fast: bool) -> None:
    """Run `code` in a fresh Python process: dla_fast importable only with import_dla_fast (the process then
    also runs Triton's interpreter, as the tests do); without it the code must not import dla_fast."""
    env = dict(os.environ)
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != ROOT]
    if import_dla_fast:
        path.insert(0, ROOT)
    env["PYTHONPATH"] = os.pathsep.join(path)
    check = "" if import_dla_fast else "\nimport sys\nassert 'dla_fast' not in sys.modules, 'dla_fast was imported'\n"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code) + check], env=env, cwd="/",
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


# ----------------------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------------------
def _onnx_check(path, inputs, reference):
    """The ONNX file holds standard operators only (no dla_fast domain or custom node) and onnxruntime's outputs
    equal `reference` (a list of tensors)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    graph = onnx.load(path)
    domains = {node.domain for node in graph.graph.node} | {f.domain for f in graph.functions}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains {domains}"
    assert not [n.op_type for n in graph.graph.node if "dla_fast" in n.op_type.lower()]
    assert graph.opset_import[0].version >= 19 or any(o.version >= 19 for o in graph.opset_import)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs)}
    outputs = session.run(None, feeds)
    assert len(outputs) == len(reference)
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        assert_close(torch.from_numpy(out), ref, TOL, f"onnxruntime output {i}")
    return graph


@pytest.mark.slow
@pytest.mark.parametrize("accelerated", [False, True], ids=["plain", "accelerated"])
@pytest.mark.parametrize("case", MODELS, ids=_id)
def test_onnx_export_runs_in_onnxruntime(case, accelerated, tmp_path):
    """torch.onnx.export(model, ..., dynamo=True, opset 19) of the plain and the accelerated model (backend
    'auto': on CPU the folded convs run as conv_bias_act): standard ONNX, onnxruntime equals eager."""
    pytest.importorskip("onnxscript")
    name, kwargs = case
    model = _model(name, kwargs, accelerated)
    inputs = _inputs(name)
    with torch.no_grad():
        reference = _leaves(model(*inputs))
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(model, inputs, path, dynamo=True, opset_version=19)
    graph = _onnx_check(path, inputs, reference)
    ops = {n.op_type for n in graph.graph.node}
    if kwargs.get("dcn") or name.startswith("centertrack"):
        assert "DeformConv" in ops  # the standard opset-19 operator (TensorRT >= 10.1 parses it)
    if name != "dla34":
        assert "ConvTranspose" in ops  # the IDA up-merge's bilinear upsampling


@pytest.mark.slow
def test_onnx_export_ignores_a_kernel_backend(tmp_path):
    """With backend 'triton' (which the export would otherwise trace as dla_fast custom ops), the ONNX graph is
    the same standard one: every op runs its eager reference while torch.onnx.export traces."""
    pytest.importorskip("onnxscript")
    name, kwargs = MODELS[2]
    plain = _model(name, kwargs, accelerated=False)
    model = dla_fast.accelerate(copy.deepcopy(plain))
    inputs = _inputs(name)
    with torch.no_grad():
        reference = _leaves(plain(*inputs))
    path = str(tmp_path / "model.onnx")
    with dla_fast.use_backend("triton"):
        torch.onnx.export(model, inputs, path, dynamo=True, opset_version=19)
    _onnx_check(path, inputs, reference)


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_legacy_onnx_exporter_and_jit_trace_of_an_accelerated_model(train, tmp_path):
    """The TorchScript-based exporter (dynamo=False) and torch.jit.trace trace the eager reference of every op
    (backend 'triton' here, which would otherwise launch Triton kernels with traced sizes): both run and equal
    the plain eager model; in train mode the traced module updates the BatchNorm running statistics as eager."""
    plain = _model("dla34", {}, accelerated=False, train=train)
    model = dla_fast.accelerate(copy.deepcopy(plain))
    x = torch.randn(2, 3, 64, 64)
    with dla_fast.use_backend("triton"):
        traced = torch.jit.trace(model, (x,), check_trace=False)
    traced.load_state_dict(plain.state_dict())  # the tracing run counted a batch in train mode
    eager, fp64 = copy.deepcopy(plain), copy.deepcopy(plain).double()
    with torch.no_grad():
        out, ref, exact = traced(x), eager(x), fp64(x.double())
    # A whole BatchNorm network in fp32 is itself ~1e-5 from fp64 on small inputs (tests/helpers, GUIDE): the
    # traced module must be as close to the fp64 model as eager fp32 is (2x), and within 1e-5 when eager is.
    assert rel_err(out, exact) <= max(2 * rel_err(ref, exact), TOL), (rel_err(out, exact), rel_err(ref, exact))
    if train:
        mean = [b for n, b in traced.named_buffers() if n.endswith("running_mean")]
        ref = [b for n, b in eager.named_buffers() if n.endswith("running_mean")]
        assert len(mean) == len(ref) > 0
        for a, b in zip(mean, ref):
            assert_close(a, b, TOL, "running_mean after the traced call")
        return
    pytest.importorskip("onnx")
    path = str(tmp_path / "legacy.onnx")
    with dla_fast.use_backend("triton"):
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=19)
    with torch.no_grad():
        _onnx_check(path, (x,), [plain(x)])


# ----------------------------------------------------------------------------------------------------------
# torch.export: save, load in a fresh process, run
# ----------------------------------------------------------------------------------------------------------
def _export_round_trip(tmp_path, programs, import_dla_fast=True, import_torchvision=False):
    """Save each (tag, ExportedProgram, inputs) to tmp_path, load and run every one in one fresh process
    (importing torchvision first where a program calls torchvision::deform_conv2d); return
    {tag: (outputs, buffers after the call)}."""
    for tag, program, inputs in programs:
        torch.export.save(program, str(tmp_path / f"{tag}.pt2"))
        torch.save(inputs, str(tmp_path / f"{tag}.inputs"))
    tags = [tag for tag, _, _ in programs]
    _run_fresh(f"""
        import torch
        {"import dla_fast  # registers the dla_fast ops the programs call" if import_dla_fast else ""}
        {"import torchvision  # registers torchvision::deform_conv2d" if import_torchvision else ""}
        for tag in {tags!r}:
            program = torch.export.load("{tmp_path}/" + tag + ".pt2")
            module = program.module()
            out = module(*torch.load("{tmp_path}/" + tag + ".inputs"))
            torch.save((out, dict(module.named_buffers())), "{tmp_path}/" + tag + ".out")
    """, import_dla_fast)
    return {tag: torch.load(str(tmp_path / f"{tag}.out")) for tag in tags}


def _assert_program_equals_eager(loaded, eager_out, eager_model, what):
    out, buffers = loaded
    for i, (a, b) in enumerate(zip(_leaves(out), _leaves(eager_out))):
        assert_close(a, b, TOL, f"{what} output {i}")
    for name, ref in eager_model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            assert_close(buffers[name], ref, TOL, f"{what} {name}")
        elif name.endswith("num_batches_tracked"):
            assert torch.equal(buffers[name], ref), f"{what} {name}"


@pytest.mark.slow
@pytest.mark.parametrize("case", MODELS, ids=_id)
def test_torch_export_train_and_eval_save_load_in_a_fresh_process(case, tmp_path):
    """torch.export of the plain and the accelerated model (backend 'auto') in eval and in train mode: saved,
    loaded in one fresh process, the same outputs (and, in train mode, running statistics) as the eager model."""
    name, kwargs = case
    programs, eager = [], {}
    for accelerated in (False, True):
        for mode in ("eval", "train"):
            tag = f"{'accelerated' if accelerated else 'plain'}-{mode}"
            model = _model(name, kwargs, accelerated, train=mode == "train")
            inputs = _inputs(name, batch=2)
            programs.append((tag, torch.export.export(copy.deepcopy(model), inputs), inputs))
            eager[tag] = (model(*inputs), model)
    loaded = _export_round_trip(tmp_path, programs,
                                import_torchvision=kwargs.get("dcn", name.startswith("centertrack")))
    for tag, (out, model) in eager.items():
        _assert_program_equals_eager(loaded[tag], out, model, f"{tag} program")


@pytest.mark.slow
@pytest.mark.interpreter
def test_torch_export_with_kernel_custom_ops_save_load_in_a_fresh_process(tmp_path):
    """Backend 'triton' (Triton's interpreter on CPU): the exported programs call the dla_fast custom ops
    (aggregate, BN + ReLU, upsample-merge, folded conv); the train-mode program loads back (it did not: a
    torch.no_grad() region in the running-statistics update) and both equal the eager accelerated model."""
    name, kwargs = "dla34up", {"num_classes": 3}
    programs, eager = [], {}
    with dla_fast.use_backend("triton"):
        for mode in ("eval", "train"):
            model = _model(name, kwargs, accelerated=True, train=mode == "train")
            inputs = _inputs(name, size=32, batch=2)
            program = torch.export.export(copy.deepcopy(model), inputs)
            called = {str(n.target) for n in program.graph.nodes if str(n.target).startswith("dla_fast.")}
            assert {"dla_fast.aggregate_fwd.default", "dla_fast.upsample_merge_fwd.default"} <= called, called
            programs.append((mode, program, inputs))
            eager[mode] = (model(*inputs), model)
    loaded = _export_round_trip(tmp_path, programs)
    for mode, (out, model) in eager.items():
        _assert_program_equals_eager(loaded[mode], out, model, f"{mode} program")


@pytest.mark.interpreter
def test_traced_backend_that_cannot_run_says_why(monkeypatch):
    """An op traced with a backend this process cannot run (here: 'triton' on CPU tensors once the interpreter
    is off) raises BackendUnavailable naming the traced backend, not an error inside a kernel launch."""
    model = _model("dla34", {}, accelerated=True).base_layer
    x = torch.randn(1, 3, 32, 32)
    with dla_fast.use_backend("triton"):
        program = torch.export.export(model, (x,))
    assert any(str(n.target).startswith("dla_fast.") for n in program.graph.nodes)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(dla_fast.BackendUnavailable, match="traced with backend 'triton'"):
        program.module()(x)


# ----------------------------------------------------------------------------------------------------------
# AOTInductor
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", [MODELS[0], MODELS[2]], ids=_id)
def test_aoti_package_runs_in_a_fresh_process_without_dla_fast(case, tmp_path):
    """An AOTInductor package of the accelerated model (eval, backend 'auto': on CPU every op lowers to aten
    ops that Inductor compiles to C++) loads with torch._inductor.aoti_load_package in a process that never
    imports dla_fast (torchvision only, for CenterNet's deformable conv) and equals the eager model."""
    name, kwargs = case
    model = _model(name, kwargs, accelerated=True)
    inputs = _inputs(name)
    with torch.no_grad():
        reference = _leaves(model(*inputs))
        program = torch.export.export(model, inputs)
    assert not [n for n in program.graph.nodes if str(n.target).startswith("dla_fast.")]
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    torch.save(inputs, str(tmp_path / "inputs"))
    _run_fresh(f"""
        import torch
        {"import torchvision  # registers torchvision::deform_conv2d" if kwargs.get("dcn") else ""}
        runner = torch._inductor.aoti_load_package("{package}")
        out = runner(*torch.load("{tmp_path}/inputs"))
        torch.save(out, "{tmp_path}/out")
    """, import_dla_fast=False)
    out = torch.load(str(tmp_path / "out"))
    for i, (a, b) in enumerate(zip(_leaves(out), reference)):
        assert_close(a, b, TOL, f"AOTInductor output {i}")


# ----------------------------------------------------------------------------------------------------------
# Tuple outputs for tracing CenterNet-style models
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case,accelerated", [(MODELS[3], True), (MODELS[4], False)], ids=["centernet-accelerated",
                                                                                          "centertrack-plain"])
def test_head_tuple_traces_centernet_style_models(case, accelerated):
    """dla_fast.models.HeadTuple returns the heads as a tuple in `heads` order: torch.jit.trace (strict, no
    dict outputs) records it and the traced module equals the eager model, CenterTrack's three inputs included."""
    name, kwargs = case
    model = _model(name, kwargs, accelerated)
    wrapped = dla_fast.models.HeadTuple(model)
    assert wrapped.names == tuple(kwargs["heads"])
    inputs = _inputs(name)
    traced = torch.jit.trace(wrapped, inputs, check_trace=False)
    with torch.no_grad():
        ref = model(*inputs)[-1]
        out = traced(*inputs)
    assert isinstance(out, tuple) and len(out) == len(ref)
    for head, tensor in zip(wrapped.names, out):
        assert_close(tensor, ref[head], TOL, f"head {head}")


def test_head_tuple_needs_heads():
    with pytest.raises(ValueError, match="heads"):
        dla_fast.models.HeadTuple(dla_fast.create_model("dla34"))


# ----------------------------------------------------------------------------------------------------------
# TorchScript of the plain backbones
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", [("dla34", {}), ("dla34", {"features_only": True, "out_indices": (2, 4)}),
                                         ("dla102x", {}), ("dla60_res2net", {})],
                         ids=["dla34", "dla34-features", "dla102x", "dla60_res2net"])
def test_torchscript_of_a_plain_backbone_equals_eager(name, kwargs, tmp_path):
    """torch.jit.script of a plain DLA (BasicBlock; Bottleneck X with residual roots; Res2Net; the classifier
    and features_only forms), saved and loaded back: the same outputs as the eager model."""
    model = _model(name, kwargs, accelerated=False)
    scripted = torch.jit.script(model)
    torch.jit.save(scripted, str(tmp_path / "model.pt"))
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = _leaves(model(x))
        out = _leaves(loaded(x))
    assert len(out) == len(ref)
    for i, (a, b) in enumerate(zip(out, ref)):
        assert_close(a, b, TOL, f"scripted output {i}")


# ----------------------------------------------------------------------------------------------------------
# TorchScript of DLA-Up, CenterNet and CenterTrack (dla_fast.models.scripting)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", MODELS[1:], ids=_id)
def test_torchscript_of_up_path_models_equals_eager(case, tmp_path):
    """torch.jit.script of DLA-Up, CenterNet (deformable and plain IDA convs) and CenterTrack, saved and
    loaded back: the eager model's outputs exactly (the scripted form runs the same submodules in the same
    order); the eager model keeps its modules and state_dict keys."""
    name, kwargs = case
    model = _model(name, kwargs, accelerated=False)
    keys, kinds = list(model.state_dict()), [type(m) for m in model.modules()]
    torch.jit.save(torch.jit.script(model), str(tmp_path / "model.pt"))
    assert list(model.state_dict()) == keys and [type(m) for m in model.modules()] == kinds
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    inputs = _inputs(name)
    with torch.no_grad():
        ref, out = _leaves(model(*inputs)), _leaves(loaded(*inputs))
    assert len(out) == len(ref) > 0
    for i, (a, b) in enumerate(zip(out, ref)):
        assert torch.equal(a, b), f"scripted output {i}: {rel_err(a, b):.3g} off eager"
    if name.startswith("centernet"):
        assert list(loaded(*inputs)[0]) == list(kwargs["heads"]), "the heads in their order"


@pytest.mark.slow
def test_scripted_centertrack_refuses_a_previous_frame_input_it_has_no_branch_for():
    model = dla_fast.create_model("centertrack_dla34", heads={"hm": 3, "wh": 2}, head_conv=0, dcn=False,
                                  pre_hm=False).eval()
    scripted = torch.jit.script(model)
    img, pre_img, pre_hm = _inputs("centertrack_dla34")
    with torch.no_grad():
        assert torch.equal(scripted(img, pre_img)[0]["hm"], model(img, pre_img)[0]["hm"])
        with pytest.raises(Exception, match="pre_hm was given, but this model was built without its branch"):
            scripted(img, pre_img, pre_hm)
