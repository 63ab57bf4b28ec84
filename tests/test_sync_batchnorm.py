"""SyncBatchNorm through the fused ops, and accelerated models under DistributedDataParallel (CPU, gloo).

Two worker processes (tests/sync_worker.py, TRITON_INTERPRET=1) run every distributed scenario once, with
unequal local batches (3 and 1); each test compares their results with one process on the whole batch with
plain nn.BatchNorm2d semantics (outputs concatenated, gradients of the weights summed over the ranks: the
whole batch's loss is the sum of the ranks' losses). nn.SyncBatchNorm itself refuses CPU tensors in a process
group, so the fused paths and their eager reference carry the SyncBatchNorm tests; DDP is tested with plain
BatchNorm2d, eager and under torch.compile (aot_eager on a quarter-width DLA-34, inductor on one tree level); the
SyncBatchNorm model under torch.compile without DDP. Behaviour outside a process group is tested in this process.
"""
import copy
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn as nn

import dla_fast
from dla_fast.ops.aggregate import aggregate_reference
from dla_fast.ops.batchnorm_act import batchnorm_act, batchnorm_act_reference
from dla_fast.nn import FusedRoot

import sync_worker as worker
from helpers import assert_close, rel_err

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_TIMEOUT_S = 1200  # the CI machine runs two stacks, two pytest workers each, on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(names, interpret: bool) -> dict:
    """{scenario: [rank 0 result, rank 1 result]} from one two-process run of the scenarios `names` (Triton's
    interpreter on CPU tensors when `interpret`, else the GPU)."""
    with tempfile.TemporaryDirectory() as out_dir:
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        port = _free_port()
        log_paths = [os.path.join(out_dir, f"worker_{rank}.log") for rank in range(2)]  # files: no pipe to fill
        procs = []
        try:
            for rank in range(2):
                with open(log_paths[rank], "w") as log:
                    procs.append(subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "sync_worker.py"),
                                                   str(rank), "2", str(port), out_dir, ",".join(names)], cwd=REPO,
                                                  env=env, stdout=log, stderr=subprocess.STDOUT))
            for p in procs:
                try:
                    p.wait(timeout=WORKER_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    break
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if not all(p.returncode == 0 for p in procs):
            logs = [open(path).read()[-20000:] for path in log_paths]
            raise AssertionError("a worker failed or timed out:\n" + "\n----\n".join(logs))
        results = {}
        for name in names:
            results[name] = [torch.load(os.path.join(out_dir, f"{name}_{rank}.pt"), weights_only=False)
                             for rank in range(2)]
            for rank, r in enumerate(results[name]):
                assert "exception" not in r, f"scenario {name} failed on rank {rank}:\n{r['exception']}"
        return results


# The scenarios under torch.compile (aot_eager, inductor): the slowest third of the two-process run, tested on the
# pinned stack only (`slow`); the GPU machine's stack runs the others (README, Tests).
COMPILED_SCENARIOS = ("ddp_compiled", "ddp_inductor", "sync_batchnorm_compiled")


@pytest.fixture(scope="module")
def runs():
    """{scenario: [rank 0 result, rank 1 result]} from one two-process run of every CPU scenario not compiled."""
    return _run_workers([name for name in worker.SCENARIOS if name not in COMPILED_SCENARIOS], interpret=True)


@pytest.fixture(scope="module")
def compiled_runs():
    """{scenario: [rank 0 result, rank 1 result]} from one two-process run of the compiled CPU scenarios."""
    return _run_workers(list(COMPILED_SCENARIOS), interpret=True)


def _cat(results, key):
    return torch.cat([r[key] for r in results])


def _summed(results, key):
    return sum(r[key] for r in results)


def _check_kernels(results, case, expected):
    """The Triton kernels ran on every rank in the Triton cases, none with the eager reference."""
    for rank, r in enumerate(results):
        if case == "torch":
            assert r["kernels"] == [], f"rank {rank} launched {r['kernels']} with backend torch"
        else:
            assert set(expected) <= set(r["kernels"]), f"rank {rank} launched only {r['kernels']}"


def _check_running(results, running_mean, running_var, tracked):
    for rank, r in enumerate(results):
        assert_close(r["running_mean"], running_mean, 1e-5, f"running_mean on rank {rank}")
        assert_close(r["running_var"], running_var, 1e-5, f"running_var on rank {rank}")
        assert int(r["tracked"]) == int(tracked), f"num_batches_tracked on rank {rank}"


def _reference_bn_params(params):
    weight, bias, running_mean, running_var = (p.double().clone() for p in params)
    return weight.requires_grad_(True), bias.requires_grad_(True), running_mean, running_var, torch.tensor(3)


def _batchnorm_act_reference(momentum, rows=None):
    """One process, fp64, plain BatchNorm: (out, grads, running stats) on the whole batch (or on `rows`)."""
    x, residual, grad, params = worker.batchnorm_act_inputs()
    if rows is not None:
        x, residual, grad = x[rows], residual[rows], grad[rows]
    x, residual = x.double().requires_grad_(True), residual.double().requires_grad_(True)
    weight, bias, running_mean, running_var, tracked = _reference_bn_params(params)
    out = batchnorm_act_reference(x, weight, bias, running_mean, running_var, tracked, True, momentum, 1e-5,
                                  residual, True)
    out.backward(grad.double())
    return dict(out=out, grad_x=x.grad, grad_residual=residual.grad, grad_weight=weight.grad, grad_bias=bias.grad,
                running=(running_mean, running_var, tracked))


@pytest.mark.parametrize("case, momentum", [("triton", 0.1), ("torch", 0.1), ("empty", None)])
def test_batchnorm_act_synchronized_equals_one_process(runs, case, momentum):
    """batchnorm_act (residual + ReLU) over 2 gloo ranks, local batches 3 and 1 (or 4 and 0: an empty rank
    still synchronizes), Triton kernels or the eager reference: as one process on the whole batch."""
    results = [r[f"batchnorm_act_{case}"] for r in runs["ops"]]
    _check_kernels(results[:1], case, ["channel_stats_partial_kernel", "bn_apply_kernel", "bn_backward_apply_kernel"])
    ref = _batchnorm_act_reference(momentum)
    assert_close(_cat(results, "out"), ref["out"], 1e-5, "output")
    for key in ("grad_x", "grad_residual"):
        assert_close(_cat(results, key), ref[key], 1e-4, key)
    for key in ("grad_weight", "grad_bias"):
        assert_close(_summed(results, key), ref[key], 1e-4, f"{key} summed over the ranks")
    _check_running(results, *ref["running"])


def test_batchnorm_act_in_a_one_rank_group_is_plain_batchnorm(runs):
    """process_group of rank 0 alone: both ranks normalize their own batch (rank 1 is not in the group), as
    nn.SyncBatchNorm does for a group of world size 1 / a rank outside it."""
    for rank, r in enumerate(runs["ops"]):
        local = r["batchnorm_act_alone"]
        ref = _batchnorm_act_reference(0.1, rows=slice(0, 3) if rank == 0 else slice(3, 4))
        assert_close(local["out"], ref["out"], 1e-5, f"rank {rank} output")
        assert_close(local["grad_x"], ref["grad_x"], 1e-4, f"rank {rank} grad_x")
        _check_running([local], *ref["running"])


@pytest.mark.parametrize("case", ["triton", "torch", "empty"])
def test_aggregate_synchronized_equals_one_process(runs, case):
    """The aggregation node (2 children, residual) over 2 gloo ranks as one process on the whole batch."""
    results = [r[f"aggregate_{case}"] for r in runs["ops"]]
    _check_kernels(results[:1], case, ["aggregate_fwd_kernel", "aggregate_grad_input_kernel"])
    children, conv_weight, grad, params = worker.aggregate_inputs()
    children = [c.double().requires_grad_(True) for c in children]
    conv_weight = conv_weight.double().requires_grad_(True)
    weight, bias, running_mean, running_var, tracked = _reference_bn_params(params)
    out = aggregate_reference(children, conv_weight, weight, bias, running_mean, running_var, True, 0.1, 1e-5,
                              True, tracked)
    out.backward(grad.double())
    assert_close(_cat(results, "out"), out, 1e-5, "output")
    for i, child in enumerate(children):
        assert_close(torch.cat([r["grad_children"][i] for r in results]), child.grad, 1e-4, f"grad of child {i}")
    for key, ref in (("grad_conv", conv_weight.grad), ("grad_weight", weight.grad), ("grad_bias", bias.grad)):
        assert_close(_summed(results, key), ref, 1e-4, f"{key} summed over the ranks")
    _check_running(results, running_mean, running_var, tracked)


DCN_KERNELS = ("deform_conv_fwd_kernel", "deform_conv_grad_sample_kernel", "deform_conv_grad_weight_kernel")


def _check_vanishing_or_close(summed, ref, scale, what):
    """A gradient that is mathematically zero (the deformable conv's bias before a training-mode BatchNorm: zero
    over the whole batch, not per rank) has no relative error: its sum over the ranks must vanish against the
    largest gradient `scale`; any other within 1e-4."""
    if ref.abs().max() <= 1e-9 * scale:
        assert summed.abs().max() <= 1e-5 * scale, f"{what} should vanish: {summed.abs().max():.3g}"
    else:
        assert_close(summed, ref, 1e-4, what)


@pytest.mark.parametrize("case, momentum", [("triton", 0.1), ("torch", 0.1), ("empty", None)])
def test_dcn_block_synchronized_equals_one_process(runs, case, momentum):
    """The fused DCN block (deformable conv + SyncBatchNorm + ReLU) over 2 gloo ranks, local batches 3 and 1 (or 4
    and 0), Triton kernels or the eager reference: as one process on the whole batch with plain BatchNorm2d
    (torchvision's deformable conv, fp64)."""
    torchvision = pytest.importorskip("torchvision")
    results = [r[f"dcn_block_{case}"] for r in runs["dcn"]]
    _check_kernels(results[:1], case, [*DCN_KERNELS, "bn_apply_kernel", "bn_backward_apply_kernel"])
    x, offset_mask, weight, bias, grad, params = worker.dcn_block_inputs()
    x, offset_mask, weight, bias = (t.double().requires_grad_(True) for t in (x, offset_mask, weight, bias))
    bn_weight, bn_bias, running_mean, running_var, tracked = _reference_bn_params(params)
    y = torchvision.ops.deform_conv2d(x, offset_mask[:, :18], weight, bias, padding=1,
                                      mask=torch.sigmoid(offset_mask[:, 18:]))
    out = batchnorm_act_reference(y, bn_weight, bn_bias, running_mean, running_var, tracked, True, momentum, 1e-5)
    out.backward(grad.double())
    assert_close(_cat(results, "out"), out, 1e-5, "output")
    for key, ref in (("grad_x", x.grad), ("grad_offset_mask", offset_mask.grad)):
        assert_close(_cat(results, key), ref, 1e-4, key)
    refs = dict(grad_conv=weight.grad, grad_conv_bias=bias.grad, grad_weight=bn_weight.grad, grad_bias=bn_bias.grad)
    scale = max(g.abs().max().item() for g in refs.values())
    for key, ref in refs.items():
        _check_vanishing_or_close(_summed(results, key), ref, scale, f"{key} summed over the ranks")
    _check_running(results, running_mean, running_var, tracked)


@pytest.mark.parametrize("case", ["before", "after", "torch"])
def test_dcn_modules_with_sync_batchnorm_equal_one_process(runs, case):
    """CenterNet's DCN block and a deformable IDA step converted to SyncBatchNorm before / after accelerate(): a
    training step over 2 gloo ranks (local batches 3 and 1) runs the fused DCN kernels for all three deformable
    convs (backend torch: none, the eager synchronized reference) and equals one process on the whole batch with
    plain BatchNorm2d (fp64 eager modules): outputs, gradients summed over the ranks, running statistics; then
    eval runs folded (one deformable-conv kernel each, no BatchNorm pass), and restore() gives the SyncBatchNorms
    back."""
    pytest.importorskip("torchvision")
    results = [r[f"modules_{case}"] for r in runs["dcn"]]
    ref = worker.build_dcn_modules().double().train()
    x, coarse, grad = worker.dcn_modules_inputs()
    x, coarse = x.double().requires_grad_(True), coarse.double()
    out = worker.dcn_modules_forward(ref, x, coarse)
    out.backward(grad.double())
    assert_close(_cat(results, "out"), out, 1e-5, "training output")
    assert_close(_cat(results, "grad_x"), x.grad, 1e-4, "grad of the input")
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n, g in ref_grads.items():
        _check_vanishing_or_close(sum(r["grads"][n] for r in results), g, scale, f"grad of {n} summed over ranks")
    for n, b in ref.named_buffers():
        for rank, r in enumerate(results):
            if b.dtype.is_floating_point:
                assert_close(r["buffers"][n], b, 1e-5, f"{n} on rank {rank}")
            else:
                assert int(r["buffers"][n]) == int(b), f"{n} on rank {rank}"
    ref.eval()
    with torch.no_grad():
        assert_close(_cat(results, "eval_out"), worker.dcn_modules_forward(ref, x, coarse), 1e-5, "eval output")
    syncs = sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    for rank, r in enumerate(results):
        assert r["fused"] == ("FusedDCNBlock", "FusedIDAUpAdd"), f"rank {rank}: {r['fused']}"
        assert r["restored"] == syncs, f"rank {rank}: restore() gives back {r['restored']} SyncBatchNorms"
        if case == "torch":
            assert r["train_kernels"] == {} and r["eval_kernels"] == {}, f"rank {rank} launched kernels"
            continue
        for kernel in DCN_KERNELS:  # the block, the IDA step's proj_1 and node_1
            assert r["train_kernels"].get(kernel) == 3, f"rank {rank}, training: {r['train_kernels']}"
        assert r["eval_kernels"].get(DCN_KERNELS[0]) == 3 and "bn_apply_kernel" not in r["eval_kernels"], \
            f"rank {rank}, eval: {r['eval_kernels']}"


def test_mismatched_channel_counts_raise_on_every_rank(runs):
    for rank, r in enumerate(runs["mismatched_channels"]):
        assert r["error"] is not None and "different numbers of channels" in r["error"], f"rank {rank}: {r}"


# --------------------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------------------
def _whole_batch_step(name, dtype, memory_format=torch.contiguous_format):
    """One process, plain nn.BatchNorm2d, whole batch: (outputs, weight gradients, buffers after the step)."""
    model = worker.build_model(name).to(dtype).train().to(memory_format=memory_format)
    x, seed = worker.model_batch()
    out = model(x.to(dtype).contiguous(memory_format=memory_format))
    worker.model_loss(out, seed, 0, (sum(worker.SPLIT),)).backward()
    return (worker.flat_outputs(out), {n: p.grad for n, p in model.named_parameters()},
            {n: b for n, b in model.named_buffers()})


def _check_against_whole_batch(name, results):
    """Fused fp32 on 2 ranks vs fp64 on the whole batch, each error at most twice eager fp32's own (GUIDE: a
    deep BatchNorm network in training is ill-conditioned) and within the fp32 parity bounds otherwise. Eager's
    own error is the larger of its two memory formats: both are eager fp32, summing in different orders, and at
    level 5's 1x1 per image (BatchNorm over 4 values) the two differ by up to 4x (CenterNet's ida_0 weight
    gradients: 2.3e-4 contiguous, 9.2e-4 channels_last, the fused ops 6.9e-4)."""
    ref_out, ref_grads, ref_buffers = _whole_batch_step(name, torch.float64)
    eager_runs = [_whole_batch_step(name, torch.float32, fmt) for fmt in (torch.contiguous_format,
                                                                           torch.channels_last)]
    eager_out = [run[0] for run in eager_runs]
    eager_grads = {n: [run[1][n] for run in eager_runs] for n in ref_grads}
    eager_buffers = {n: [run[2][n] for run in eager_runs] for n in ref_buffers}

    def check(value, ref, eager, floor, what):
        bound = max(2 * max(rel_err(e, ref) for e in eager), floor)
        assert rel_err(value, ref) <= bound, f"{what}: error {rel_err(value, ref):.3g} > {bound:.3g}"

    check(_cat(results, "out"), ref_out, eager_out, 1e-5, "outputs")
    for n, ref in ref_grads.items():
        check(sum(r["grads"][n] for r in results), ref, eager_grads[n], 1e-4, f"grad of {n} summed over ranks")
    for n, ref in ref_buffers.items():
        for rank, r in enumerate(results):
            if n.endswith("num_batches_tracked"):
                assert int(r["buffers"][n]) == int(ref), f"{n} on rank {rank}"
            else:
                check(r["buffers"][n], ref, eager_buffers[n], 1e-5, f"{n} on rank {rank}")
    _check_kernels(results, "triton", ["aggregate_fwd_kernel", "aggregate_grad_input_kernel", "bn_apply_kernel"])
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in worker.build_model(name).modules())
    for r in results:
        assert r["restored"] == (bns, 0), "restore() gives back the SyncBatchNorm modules"


def test_accelerated_dla34_with_sync_batchnorm_equals_one_process(runs):
    _check_against_whole_batch("dla34", runs["dla34"])


@pytest.mark.parametrize("module", ["level0", "level1"])
def test_fused_stack_input_gradient_with_unequal_local_batches(runs, module):
    """The fused conv-BN-ReLU stacks of DLA-34 with SyncBatchNorm on local batches of 3 and 1 images: each
    rank's input gradient, concatenated, equals the module's nn.BatchNorm2d gradient on the whole batch (fp64,
    the recorded inputs and output gradients) within the fp32 gradient bound."""
    records = [r["modules"][module] for r in runs["dla34"]]
    reference = copy.deepcopy(getattr(worker.build_model("dla34"), module)).double().train()
    x = torch.cat([r["input"] for r in records]).double().requires_grad_(True)
    reference(x).backward(torch.cat([r["grad_out"] for r in records]).double())
    assert_close(torch.cat([r["grad_in"] for r in records]), x.grad, 1e-4, f"{module} input gradient")


def test_accelerated_centernet_converted_after_accelerate_equals_one_process(runs):
    _check_against_whole_batch("centernet", runs["centernet"])


@pytest.mark.cuda
def test_sync_batchnorm_under_ddp_on_gpu():
    """On the GPU (two ranks sharing CUDA device 0 over gloo): DLA-34 and CenterNet-DLA-34 with deformable convs,
    converted to nn.SyncBatchNorm, under DistributedDataParallel. Each accelerated run (every fused backend, fp32
    and bf16 autocast) against fp64 on the whole batch in one process, each error at most twice that of the eager
    model (nn.SyncBatchNorm under DDP) in the same dtype, within the fp32 parity bounds; the fused kernels ran."""
    results = _run_workers(list(worker.CUDA_SCENARIOS), interpret=False)["ddp_sync_batchnorm_cuda"]
    kernels = {"dla34": ["aggregate_fwd_kernel", "aggregate_grad_input_kernel"],
               "centernet_dcn": ["aggregate_fwd_kernel", "deform_conv_fwd_kernel", "deform_conv_grad_sample_kernel",
                                 "deform_conv_grad_weight_kernel"]}
    for name in kernels:
        ref_out, ref_grads, ref_buffers = _whole_batch_step(name, torch.float64)
        scale = max(g.abs().max().item() for g in ref_grads.values())
        providers = sorted({provider for (model, provider, _) in results[0] if model == name} - {"eager"})
        assert "triton" in providers, providers
        for dtype in ("fp32", "bf16"):
            floors = (1e-5, 1e-4) if dtype == "fp32" else (0.0, 0.0)
            vanishing_floor = 1e-5 if dtype == "fp32" else 2 ** -8  # relative to the largest gradient
            eager = results[0][name, "eager", dtype]
            eager_out = torch.cat([r[name, "eager", dtype]["out"] for r in results])
            # the bounds below are relative to eager's own error: eager itself must be close, or they check nothing
            sane = 1e-3 if dtype == "fp32" else 5e-2
            assert rel_err(eager_out, ref_out) <= sane, f"{name}, eager {dtype}: {rel_err(eager_out, ref_out):.3g}"
            for provider in providers:
                where = f"{name}, {provider}, {dtype}"
                runs_ = [r[name, provider, dtype] for r in results]

                def check(value, ref, eager_value, floor, what):
                    bound = max(2 * rel_err(eager_value, ref), floor)
                    assert rel_err(value, ref) <= bound, f"{where}, {what}: {rel_err(value, ref):.3g} > {bound:.3g}"

                check(torch.cat([r["out"] for r in runs_]), ref_out, eager_out, floors[0], "outputs")
                for n, ref in ref_grads.items():
                    value, eager_value = runs_[0]["grads"][n], eager["grads"][n]
                    if ref.abs().max() <= 1e-6 * scale:  # a conv bias feeding a training BatchNorm: zero but rounding
                        bound = max(2 * eager_value.abs().max().item(), vanishing_floor * scale)
                        assert value.abs().max() <= bound, f"{where}: grad of {n} should vanish"
                    else:
                        check(value, ref, eager_value, floors[1], f"grad of {n}")
                for rank, r in enumerate(runs_):
                    for n, ref in ref_buffers.items():
                        if n.endswith("num_batches_tracked"):
                            assert int(r["buffers"][n]) == int(ref), f"{where}: {n} on rank {rank}"
                        else:
                            check(r["buffers"][n], ref, eager["buffers"][n], floors[0], f"{n} on rank {rank}")
                    assert set(kernels[name]) <= set(r["kernels"]), f"{where}: rank {rank} launched {r['kernels']}"


def test_accelerated_dla34_under_ddp(runs):
    """DDP with plain BatchNorm2d, bucketed all-reduce, static graph over two SGD iterations (the update
    applied by the test on every rank), and gradient accumulation under no_sync(): the gradients are the average
    over the ranks of the same steps run locally without DDP."""
    results = runs["ddp"]

    def averaged(key):
        return {n: (results[0][key][n] + results[1][key][n]) / 2 for n in results[0][key]}

    step1, step2 = averaged("local_a"), averaged("local_step2")
    accumulated = {n: step1[n] + g for n, g in averaged("local_b").items()}
    for rank, r in enumerate(results):
        for n in step1:
            assert_close(r["static_step1"][n], step1[n], 1e-5, f"rank {rank}, static graph, step 1 grad of {n}")
            assert_close(r["static_step2"][n], step2[n], 1e-5, f"rank {rank}, static graph, step 2 grad of {n}")
            assert_close(r["no_sync"][n], r["local_a"][n], 1e-5, f"rank {rank}, no_sync(): local grad of {n}")
            assert_close(r["accumulated"][n], accumulated[n], 1e-5, f"rank {rank}, accumulated grad of {n}")
    sizes = results[0]["buckets"][0]  # after the first synced iteration, as the accumulation step used them
    assert sizes is not None and len(sizes.split(",")) > 4, f"gradient bucket sizes {sizes}"


TRAINING_KERNELS = ["aggregate_fwd_kernel", "aggregate_grad_input_kernel", "channel_stats_partial_kernel",
                    "bn_apply_kernel", "bn_backward_apply_kernel"]


@pytest.mark.slow
def test_accelerated_dla34_under_ddp_compiled(runs, compiled_runs):
    """torch.compile with DDP (backend aot_eager): DDPOptimizer splits the graph at the gradient buckets, every
    piece keeps the fused custom ops and their Triton kernels run. torch.compile(DDP(model)): the first step's
    outputs, gradients and running statistics, then gradient accumulation under no_sync();
    DDP(torch.compile(model), static_graph=True): two SGD iterations. Equal to the same steps run locally
    without DDP or compile (scenario ddp), the gradients averaged over the ranks."""
    local, results = runs["ddp"], compiled_runs["ddp_compiled"]

    def averaged(key):
        return {n: (local[0][key][n] + local[1][key][n]) / 2 for n in local[0][key]}

    step1, step2 = averaged("local_a"), averaged("local_step2")
    accumulated = {n: step1[n] + g for n, g in averaged("local_b").items()}
    for rank, r in enumerate(results):
        assert_close(r["outer_out"], local[rank]["local_a_out"], 1e-5, f"rank {rank}, compiled DDP output")
        for n, b in r["outer_buffers"].items():
            ref = local[rank]["local_a_buffers"][n]
            if b.dtype.is_floating_point:
                assert_close(b, ref, 1e-5, f"rank {rank}, compiled DDP {n}")
            else:
                assert torch.equal(b, ref), f"rank {rank}, compiled DDP {n}"
        for n in step1:
            assert_close(r["outer_step1"][n], step1[n], 1e-5, f"rank {rank}, compiled DDP, grad of {n}")
            assert_close(r["no_sync"][n], local[rank]["local_a"][n], 1e-5, f"rank {rank}, no_sync(): grad of {n}")
            assert_close(r["accumulated"][n], accumulated[n], 1e-5, f"rank {rank}, accumulated grad of {n}")
            assert_close(r["static_step1"][n], step1[n], 1e-5, f"rank {rank}, static graph, step 1 grad of {n}")
            assert_close(r["static_step2"][n], step2[n], 1e-5, f"rank {rank}, static graph, step 2 grad of {n}")
        for order in ("outer", "inner"):
            graphs = r[f"{order}_graph_ops"]
            assert len(graphs) >= 3, f"rank {rank}, {order}: {len(graphs)} graph(s), not split at the buckets"
            assert all("dla_fast.aggregate_fwd" in ops for ops in graphs), f"rank {rank}, {order}: {graphs}"
            assert {"dla_fast.batchnorm_act_forward"} <= set().union(*graphs), f"rank {rank}, {order}: {graphs}"
            assert set(TRAINING_KERNELS) <= set(r[f"{order}_kernels"]), f"rank {rank} launched {r[f'{order}_kernels']}"


@pytest.mark.slow
def test_accelerated_tree_under_ddp_inductor(compiled_runs):
    """torch.compile(DDP(model)) with inductor on one accelerated DLA tree level: outputs, running statistics
    and the gradients averaged over the ranks as the same step run locally without DDP or compile; the fused
    kernels ran inside the compiled step."""
    results = compiled_runs["ddp_inductor"]
    for rank, r in enumerate(results):
        compiled, local = r["compiled"], r["local"]
        assert_close(compiled["out"], local["out"], 1e-5, f"rank {rank}, output")
        for n, g in compiled["grads"].items():
            averaged = (results[0]["local"]["grads"][n] + results[1]["local"]["grads"][n]) / 2
            assert_close(g, averaged, 1e-4, f"rank {rank}, grad of {n}")
        for n, b in compiled["buffers"].items():
            if b.dtype.is_floating_point:
                assert_close(b, local["buffers"][n], 1e-5, f"rank {rank}, {n}")
            else:
                assert torch.equal(b, local["buffers"][n]), f"rank {rank}, {n}"
        assert set(TRAINING_KERNELS) <= set(compiled["kernels"]), f"rank {rank} launched {compiled['kernels']}"


@pytest.mark.slow
def test_sync_batchnorm_accelerated_model_compiled(compiled_runs):
    """A DLA-34 (narrow) converted to SyncBatchNorm, accelerated and torch.compile'd (aot_eager): the synchronized
    fused ops break the graph (they run eagerly, by design) and the step equals the uncompiled synchronized one
    (outputs, gradients summed over the ranks, running statistics on every rank). The synchronized step itself is
    compared with one process on the whole batch by the DLA-34 (full width) test above; this narrow model's fp32
    error is close to the 2x-eager bound there (8.6e-5 against 7.5e-5 in one run), so it is not repeated here."""
    results = compiled_runs["sync_batchnorm_compiled"]
    compiled, eager = [r["compiled"] for r in results], [r["eager"] for r in results]
    assert_close(_cat(compiled, "out"), _cat(eager, "out"), 1e-5, "output")
    for n in eager[0]["grads"]:
        assert_close(sum(r["grads"][n] for r in compiled), sum(r["grads"][n] for r in eager), 1e-4,
                     f"grad of {n} summed over the ranks")
    for rank, (c, e) in enumerate(zip(compiled, eager)):
        for n, b in c["buffers"].items():
            if b.dtype.is_floating_point:
                assert_close(b, e["buffers"][n], 1e-5, f"rank {rank}, {n}")
            else:
                assert torch.equal(b, e["buffers"][n]), f"rank {rank}, {n}"
        assert len(c["graph_ops"]) > 1, f"rank {rank}: {len(c['graph_ops'])} graph(s), no graph break"
        assert set(TRAINING_KERNELS) <= set(c["kernels"]), f"rank {rank} launched only {c['kernels']}"


# --------------------------------------------------------------------------------------------------------
# Outside a process group (this process: torch.distributed not initialized)
# --------------------------------------------------------------------------------------------------------
def test_sync_batchnorm_outside_a_process_group_runs_as_nn_sync_batchnorm():
    """Without an initialized process group nn.SyncBatchNorm normalizes with the local batch (torch 2.14); so
    do the fused modules and ops given sync=True: outputs, gradients and running statistics."""
    from dla_fast.models import Root

    assert not torch.distributed.is_initialized()
    ref = nn.SyncBatchNorm.convert_sync_batchnorm(nn.ModuleDict(dict(root=Root(10, 6, residual=True)))).train()
    fused = dla_fast.accelerate(copy.deepcopy(ref))
    assert isinstance(fused["root"], FusedRoot) and isinstance(fused["root"].bn, nn.SyncBatchNorm)
    children = [torch.randn(3, 6, 5, 5, requires_grad=True), torch.randn(3, 4, 5, 5, requires_grad=True)]
    grad = torch.randn(3, 6, 5, 5)
    out_ref = ref["root"](children)
    out_ref.backward(grad)
    ref_grads = [c.grad.clone() for c in children]
    for c in children:
        c.grad = None
    with dla_fast.use_backend("triton"):
        out = fused["root"](children)
        out.backward(grad)
    assert_close(out, out_ref, 1e-5)
    for c, g in zip(children, ref_grads):
        assert_close(c.grad, g, 1e-4, "input gradient")
    assert_close(fused["root"].bn.running_var, ref["root"].bn.running_var, 1e-5, "running_var")
    assert_close(fused["root"].bn.weight.grad, ref["root"].bn.weight.grad, 1e-4, "bn weight gradient")
    dla_fast.restore(fused)
    assert isinstance(fused["root"].bn, nn.SyncBatchNorm)

    x = torch.randn(2, 5, 3, 3)
    weight, bias = torch.rand(5) + 0.5, torch.randn(5)
    with dla_fast.use_backend("triton"):
        synced = batchnorm_act(x, weight, bias, None, None, None, True, sync=True)
    assert_close(synced, batchnorm_act_reference(x, weight, bias, None, None, None, True), 1e-5)


def test_accelerate_takes_sync_batchnorm_and_names_real_reasons():
    """A SyncBatchNorm root is fused (not skipped as 'without affine parameters'); the warnings name the real
    reason: a non-affine BatchNorm, or a normalization that is no BatchNorm."""
    from dla_fast.models import Root

    model = nn.ModuleDict(dict(a=Root(8, 4), b=Root(8, 4), c=Root(8, 4)))
    model["a"] = nn.SyncBatchNorm.convert_sync_batchnorm(model["a"])
    model["b"].bn = nn.SyncBatchNorm(4, affine=False)
    model["c"].bn = nn.GroupNorm(2, 4)
    with pytest.warns(UserWarning) as record:
        dla_fast.accelerate(model)
    message = "\n".join(str(w.message) for w in record)
    assert isinstance(model["a"], FusedRoot)
    assert "b: SyncBatchNorm without affine parameters" in message
    assert "c: its normalization is a GroupNorm, not nn.BatchNorm2d or nn.SyncBatchNorm" in message
    assert "a:" not in message


def test_torchrun_bench_trains_data_parallel_on_cpu(tmp_path):
    """`torchrun --nproc-per-node 2 -m dla_fast bench --train` on the CPU (gloo), smoke: per-rank and total
    images/s and the scaling efficiency against one process, in the table and the JSON records."""
    out = tmp_path / "records.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "dla_fast", "bench", "--train", "--device", "cpu", "--model", "dla34", "--batch", "2", "--size", "32",
               "--warmup", "0", "--iters", "1", "--providers", "eager,dla_fast", "--no-progress", "--json", str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "data parallel: 2 processes, gloo, 2 images per rank" in done.stdout
    assert "dla_fast_ddp2" in done.stdout and "scaling" in done.stdout
    import json

    records = json.loads(out.read_text())["records"]
    assert [r["provider"] for r in records] == ["eager_ddp2", "dla_fast_ddp2"]
    for r in records:
        extra = r["extra"]
        assert extra["world_size"] == 2 and extra["process_group_backend"] == "gloo"
        assert len(extra["images_per_s_per_rank"]) == 2 and all(v > 0 for v in extra["images_per_s_per_rank"])
        assert extra["images_per_s"] > 0 and extra["single_process_images_per_s"] > 0
        assert abs(extra["scaling_efficiency"] - extra["images_per_s"] / (2 * extra["single_process_images_per_s"])) < 1e-9


def test_convert_sync_batchnorm_after_accelerate_is_followed():
    """convert_sync_batchnorm after accelerate(): the replaced block folds and runs with the new SyncBatchNorms
    (their mode, not the stale BatchNorm2d's), in training (synchronized path, here outside a process group)
    and in eval (folded), and restore() gives them back."""
    from dla_fast.models.blocks import BasicBlock
    from helpers import randomize_bn

    model = randomize_bn(nn.ModuleDict(dict(block=BasicBlock(4, 4)))).train()
    reference = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    dla_fast.accelerate(model)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    fused = model["block"]
    assert all(isinstance(pair.bn, nn.SyncBatchNorm) for pair in fused.pairs)
    x = torch.randn(2, 4, 5, 5)
    with dla_fast.use_backend("triton"):
        out = fused(x)
        model.eval()
        with torch.no_grad():
            folded = fused(x)
    assert all(pair.cached() for pair in fused.pairs), "the eval call did not fold"
    assert_close(out, reference["block"](x), 1e-5, "training output")
    assert_close(fused.bn1.running_var, reference["block"].bn1.running_var, 1e-5, "running_var")
    reference.eval()
    with torch.no_grad():
        assert_close(folded, reference["block"](x), 1e-5, "eval output (folded)")
    dla_fast.restore(model)
    assert isinstance(model["block"], BasicBlock) and isinstance(model["block"].bn2, nn.SyncBatchNorm)
    assert not model["block"].bn2.training
