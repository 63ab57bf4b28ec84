"""One rank of the two-process gloo runs of tests/test_sync_batchnorm.py (started by its fixture, not by pytest).

    python tests/sync_worker.py RANK WORLD_SIZE PORT OUT_DIR

Joins a gloo process group on 127.0.0.1:PORT, runs every scenario of SCENARIOS in order (all ranks run the
same ones: their collectives must match) and saves each scenario's results, or the error it raised, to
OUT_DIR/<scenario>_<rank>.pt. Inputs are drawn from fixed seeds for the whole (global) batch; each rank takes
its slice (SPLIT: unequal local batches), so the test can compute the single-process reference on the whole
batch. Also imported by the test for those shared builders.
"""
from __future__ import annotations

import datetime
import functools
import os
import sys
import time
import traceback

import torch

SPLIT = (3, 1)          # local batch of rank 0 and rank 1
EMPTY_SPLIT = (4, 0)    # rank 1 has an empty batch
IMAGE = 32              # model input size: DLA-34's level 5 sees 1x1 per image


def rank_rows(t: torch.Tensor, rank: int, split=SPLIT) -> torch.Tensor:
    start = sum(split[:rank])
    return t[start:start + split[rank]]


def batchnorm_act_inputs():
    """Whole-batch inputs of the batchnorm_act scenarios: x, residual, output gradient (4, 5, 3, 3) and the
    module's (weight, bias, running_mean, running_var)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 5, 3, 3, generator=g) * 2 + 0.5
    residual = torch.randn(4, 5, 3, 3, generator=g)
    grad = torch.randn(4, 5, 3, 3, generator=g)
    params = (torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g) * 0.2,
              torch.randn(5, generator=g) * 0.2, torch.rand(5, generator=g) + 0.5)
    return x, residual, grad, params


def aggregate_inputs():
    """Whole-batch inputs of the aggregate scenarios: children (4, 6, 3, 3) and (4, 3, 3, 3) (residual root: child
    0 has the 6 output channels), conv weight (6, 9, 1, 1), output gradient, and (bn weight, bias, running mean,
    running var)."""
    g = torch.Generator().manual_seed(12)
    children = [torch.randn(4, 6, 3, 3, generator=g), torch.randn(4, 3, 3, 3, generator=g)]
    weight = torch.randn(6, 9, 1, 1, generator=g) * 0.3
    grad = torch.randn(4, 6, 3, 3, generator=g)
    params = (torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g) * 0.2,
              torch.randn(6, generator=g) * 0.2, torch.rand(6, generator=g) + 0.5)
    return children, weight, grad, params


def dcn_block_inputs():
    """Whole-batch inputs of the dcn_block scenarios: x (4, 3, 5, 7), offset-mask tensor (4, 27, 5, 7) (offsets of
    a few pixels, masks spread over (0, 1)), deformable-conv weight (4, 3, 3, 3) and bias (4,), output gradient
    (4, 4, 5, 7), and the BatchNorm's (weight, bias, running mean, running var)."""
    g = torch.Generator().manual_seed(15)
    x = torch.randn(4, 3, 5, 7, generator=g)
    offset_mask = torch.randn(4, 27, 5, 7, generator=g) * 1.5
    weight = torch.randn(4, 3, 3, 3, generator=g) * 0.3
    bias = torch.randn(4, generator=g) * 0.5
    grad = torch.randn(4, 4, 5, 7, generator=g)
    params = (torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g) * 0.2,
              torch.randn(4, generator=g) * 0.2, torch.rand(4, generator=g) + 0.5)
    return x, offset_mask, weight, bias, grad, params


def build_dcn_modules() -> torch.nn.Module:
    """CenterNet's DCN modules with fixed random weights (offset-mask convs moving the samples by a few pixels)
    and BatchNorms (plain nn.BatchNorm2d): `block` = IDAConv(3, 4, deformable) and `ida` = IDAUpAdd(4, [4, 3],
    [1, 2], deformable) (proj_1 and node_1 deformable); run by dcn_modules_forward."""
    from dla_fast.models.centernet import IDAConv, IDAUpAdd
    from helpers import randomize_bn

    torch.manual_seed(16)
    model = torch.nn.ModuleDict(dict(block=IDAConv(3, 4, deformable=True),
                                     ida=IDAUpAdd(4, [4, 3], [1, 2], deformable=True)))
    g = torch.Generator().manual_seed(17)
    randomize_offsets(model, g)
    return randomize_bn(model, g)


@torch.no_grad()
def randomize_offsets(model: torch.nn.Module, g: torch.Generator) -> None:
    """Random offset-mask convs (samples moved by a few pixels, fractional: bilinear between pixels) and biases
    for every deformable conv of `model` (CenterNet initializes the offset-mask convs to zero)."""
    for m in model.modules():
        if hasattr(m, "conv_offset_mask"):
            m.conv_offset_mask.weight.copy_(torch.randn(m.conv_offset_mask.weight.shape, generator=g) * 0.4)
            m.conv_offset_mask.bias.copy_(torch.randn(27, generator=g))
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)


def dcn_modules_inputs():
    """Whole-batch inputs of build_dcn_modules: x (4, 3, 6, 8) for the block, the coarser IDA level (4, 3, 3, 4),
    and the output gradient (4, 4, 6, 8)."""
    g = torch.Generator().manual_seed(18)
    return (torch.randn(4, 3, 6, 8, generator=g), torch.randn(4, 3, 3, 4, generator=g),
            torch.randn(4, 4, 6, 8, generator=g))


def dcn_modules_forward(model, x, coarse):
    """The IDA step's last output on [block(x), coarse]."""
    return model["ida"]([model["block"](x), coarse])[-1]


def build_model(name: str) -> torch.nn.Module:
    """The model of a scenario with fixed random weights and BatchNorm statistics (plain nn.BatchNorm2d)."""
    import timm

    import dla_fast
    from helpers import randomize_bn

    torch.manual_seed(5)
    if name == "dla34":
        model = timm.create_model("dla34", pretrained=False, num_classes=7)
    elif name == "dla34_narrow":  # DLA-34's layout (levels, blocks, roots) at 1/4 of its widths
        from dla_fast.models.blocks import BasicBlock
        from dla_fast.models.dla import DLA

        model = DLA((1, 1, 1, 2, 2, 1), (4, 8, 16, 32, 64, 128), BasicBlock, num_classes=7)
    elif name == "tree":  # one DLA tree level: projection, two BasicBlocks, a residual Root; input (N, 4, 10, 10)
        from dla_fast.models.blocks import BasicBlock
        from dla_fast.models.dla import Tree

        model = Tree(1, BasicBlock, 4, 6, stride=2, root_residual=True)
    else:  # "centernet" (plain convs) or "centernet_dcn" (deformable convs, random offset-mask convs)
        model = dla_fast.create_model("centernet_dla34", dcn=name == "centernet_dcn", heads={"hm": 3, "wh": 2},
                                      head_conv=8)
        if name == "centernet_dcn":
            randomize_offsets(model, torch.Generator().manual_seed(7))
    return randomize_bn(model, torch.Generator().manual_seed(6))


def model_batch():
    """(input (4, 3, IMAGE, IMAGE), seed of the output gradients)."""
    g = torch.Generator().manual_seed(13)
    return torch.randn(4, 3, IMAGE, IMAGE, generator=g), 14


def model_loss(out, seed: int, rank: int, split=SPLIT) -> torch.Tensor:
    """sum(out * G) with a fixed whole-batch G (one per output tensor): the whole batch's loss is the sum of the
    ranks' losses. out: a tensor, or CenterNet's [dict of heads]."""
    tensors = [out] if isinstance(out, torch.Tensor) else [out[0][k] for k in sorted(out[0])]
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for t in tensors:
        whole = torch.randn((sum(split),) + tuple(t.shape[1:]), generator=g)
        loss = loss + (t.float() * rank_rows(whole, rank, split).to(t.device)).sum()
    return loss


LAUNCHES: list = []  # names of the Triton kernels launched (interpreter), reset per run


def _count_launches() -> None:
    """Record every Triton launch (the interpreter's, or the JIT's on a GPU)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime.interpreter import InterpretedFunction as launcher
    else:
        from triton.runtime.jit import JITFunction as launcher

    original = launcher.run

    def counting_run(self, *args, **kwargs):
        LAUNCHES.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    launcher.run = counting_run


def _launched() -> list:
    names = sorted(set(LAUNCHES))
    LAUNCHES.clear()
    return names


def _launch_counts() -> dict:
    """{kernel name: launches} since the last reset, then reset."""
    counts = {name: LAUNCHES.count(name) for name in set(LAUNCHES)}
    LAUNCHES.clear()
    return counts


def flat_outputs(out) -> torch.Tensor:
    tensors = [out] if isinstance(out, torch.Tensor) else [out[0][k] for k in sorted(out[0])]
    return torch.cat([t.detach().reshape(t.shape[0], -1) for t in tensors], 1)


# --------------------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------------------
def _bn_args(params):
    weight, bias, running_mean, running_var = (p.clone() for p in params)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    return weight, bias, running_mean, running_var, torch.tensor(3)


def _run_batchnorm_act(rank, backend_name, split, group, momentum):
    import dla_fast
    from dla_fast.ops.batchnorm_act import batchnorm_act

    x, residual, grad, params = batchnorm_act_inputs()
    x = rank_rows(x, rank, split).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    residual = rank_rows(residual, rank, split).clone().requires_grad_(True)
    weight, bias, running_mean, running_var, tracked = _bn_args(params)
    with dla_fast.use_backend(backend_name):
        out = batchnorm_act(x, weight, bias, running_mean, running_var, tracked, True, momentum, 1e-5, residual,
                            True, sync=True, process_group=group)
        out.backward(rank_rows(grad, rank, split))
    return dict(out=out.detach(), grad_x=x.grad, grad_residual=residual.grad, grad_weight=weight.grad,
                grad_bias=bias.grad, running_mean=running_mean, running_var=running_var, tracked=tracked,
                kernels=_launched())


def _run_aggregate(rank, backend_name, split, group):
    import dla_fast
    from dla_fast.ops.aggregate import aggregate

    children, conv_weight, grad, params = aggregate_inputs()
    children = [rank_rows(c, rank, split).contiguous(memory_format=torch.channels_last).requires_grad_(True)
                for c in children]
    conv_weight = conv_weight.clone().requires_grad_(True)
    weight, bias, running_mean, running_var, tracked = _bn_args(params)
    with dla_fast.use_backend(backend_name):
        out = aggregate(children, conv_weight, weight, bias, running_mean, running_var, tracked, True, 0.1, 1e-5,
                        True, sync=True, process_group=group)
        out.backward(rank_rows(grad, rank, split))
    return dict(out=out.detach(), grad_children=[c.grad for c in children], grad_conv=conv_weight.grad,
                grad_weight=weight.grad, grad_bias=bias.grad, running_mean=running_mean, running_var=running_var,
                tracked=tracked, kernels=_launched())


def _run_dcn_block(rank, backend_name, split, group, momentum):
    import dla_fast
    from dla_fast.ops.deform_conv.block import dcn_block

    x, offset_mask, weight, bias, grad, params = dcn_block_inputs()
    x = rank_rows(x, rank, split).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    offset_mask = rank_rows(offset_mask, rank, split).clone().requires_grad_(True)
    weight, bias = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    bn_weight, bn_bias, running_mean, running_var, tracked = _bn_args(params)
    with dla_fast.use_backend(backend_name):
        out = dcn_block(x, offset_mask, weight, bias, bn_weight, bn_bias, running_mean, running_var, tracked, True,
                        momentum, 1e-5, sync=True, process_group=group)
        out.backward(rank_rows(grad, rank, split))
    return dict(out=out.detach(), grad_x=x.grad, grad_offset_mask=offset_mask.grad, grad_conv=weight.grad,
                grad_conv_bias=bias.grad, grad_weight=bn_weight.grad, grad_bias=bn_bias.grad,
                running_mean=running_mean, running_var=running_var, tracked=tracked, kernels=_launched())


def scenario_dcn(rank):
    """The fused DCN block with SyncBatchNorm: the op over an explicit group of both ranks in Triton (interpreter)
    and the eager reference, and with an empty local batch (whole world, momentum=None); then CenterNet's DCN
    modules (a standalone block and a deformable IDA step) converted to SyncBatchNorm before / after accelerate(),
    one training step (Triton, or backend torch: the eager synchronized reference) and one eval call (folded)."""
    import torch.distributed as dist

    import dla_fast

    both = dist.new_group([0, 1])
    results = {f"dcn_block_{name}": _run_dcn_block(rank, name, SPLIT, both, 0.1) for name in ("triton", "torch")}
    results["dcn_block_empty"] = _run_dcn_block(rank, "triton", EMPTY_SPLIT, None, None)
    x, coarse, grad = dcn_modules_inputs()
    x = rank_rows(x, rank).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    coarse = rank_rows(coarse, rank).contiguous(memory_format=torch.channels_last)
    for case, backend_name, convert_first in (("before", "triton", True), ("after", "triton", False),
                                              ("torch", "torch", True)):
        model = accelerated_sync_batchnorm(build_dcn_modules().train(), convert_first)
        fused = tuple(type(model[name]).__name__ for name in ("block", "ida"))
        x.grad = None
        with dla_fast.use_backend(backend_name):
            model_out = dcn_modules_forward(model, x, coarse)
            model_out.backward(rank_rows(grad, rank))
            train_kernels = _launch_counts()
            model.eval()
            with torch.no_grad():
                eval_out = dcn_modules_forward(model, x, coarse)
            eval_kernels = _launch_counts()
        dla_fast.restore(model)
        results[f"modules_{case}"] = dict(
            out=model_out.detach(), grad_x=x.grad.clone(), grads={n: p.grad for n, p in model.named_parameters()},
            buffers={n: b for n, b in model.named_buffers()}, eval_out=eval_out, fused=fused,
            train_kernels=train_kernels, eval_kernels=eval_kernels,
            restored=sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()))
    return results


def scenario_ops(rank):
    """The two ops with SyncBatchNorm over an explicit group of both ranks, in Triton (interpreter) and the
    eager reference; an empty local batch; a one-rank group (plain BatchNorm, as nn.SyncBatchNorm)."""
    import torch.distributed as dist

    both = dist.new_group([0, 1])
    alone = dist.new_group([0])  # every rank must call new_group; rank 1 is not a member
    results = {}
    for backend_name in ("triton", "torch"):
        results[f"batchnorm_act_{backend_name}"] = _run_batchnorm_act(rank, backend_name, SPLIT, both, 0.1)
        results[f"aggregate_{backend_name}"] = _run_aggregate(rank, backend_name, SPLIT, both)
    results["batchnorm_act_empty"] = _run_batchnorm_act(rank, "triton", EMPTY_SPLIT, None, None)
    results["aggregate_empty"] = _run_aggregate(rank, "triton", EMPTY_SPLIT, None)
    results["batchnorm_act_alone"] = _run_batchnorm_act(rank, "triton", SPLIT, alone, 0.1)
    return results


class GraphRecorder:
    """A torch.compile backend that runs each graph as backend="aot_eager" does (dynamo, AOT autograd, no
    compiler: the fused custom ops run their real kernels) and records, per graph it is handed, the dla_fast
    custom ops in it ('dla_fast.<op>'). Under DistributedDataParallel dynamo's DDPOptimizer hands it one graph per
    gradient bucket; graph breaks (the synchronized BatchNorm steps) also give one graph per piece."""

    def __init__(self):
        self.graph_ops = []

    def __call__(self, gm, example_inputs):
        self.graph_ops.append(sorted({str(node.target).split(".default")[0] for node in gm.graph.nodes
                                      if node.op == "call_function" and str(node.target).startswith("dla_fast.")}))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def accelerated_sync_batchnorm(model, convert_first: bool):
    """`model` converted to nn.SyncBatchNorm and accelerated, the conversion before accelerate() or after it."""
    import dla_fast

    if convert_first:
        return dla_fast.accelerate(torch.nn.SyncBatchNorm.convert_sync_batchnorm(model))
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(dla_fast.accelerate(model))


def record_module_gradients(model, names) -> dict:
    """Hooks recording, for each named child, its input, its output's gradient and its input's gradient
    ({name: {"input", "grad_out", "grad_in"}}, filled by the forward and backward that follow)."""
    records = {name: {} for name in names}

    def hook(name):
        def forward_hook(module, inputs, output):
            record = records[name]
            record["input"] = inputs[0].detach().clone()
            if inputs[0].requires_grad:
                inputs[0].register_hook(lambda g: record.__setitem__("grad_in", g.detach().clone()))
            output.register_hook(lambda g: record.__setitem__("grad_out", g.detach().clone()))
        return forward_hook

    for name in names:
        getattr(model, name).register_forward_hook(hook(name))
    return records


def _model_step(rank, name, convert_first, compiled=False, recorded=()):
    import dla_fast

    model = accelerated_sync_batchnorm(build_model(name).train(), convert_first)
    records = record_module_gradients(model, recorded)
    recorder = GraphRecorder()
    run = torch.compile(model, backend=recorder) if compiled else model
    x, seed = model_batch()
    _launched()
    with dla_fast.use_backend("triton"):
        out = run(rank_rows(x, rank).contiguous(memory_format=torch.channels_last))
        model_loss(out, seed, rank).backward()
    kernels = _launched()
    dla_fast.restore(model)
    sync_bns = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    plain_bns = sum(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    return dict(out=flat_outputs(out), grads={n: p.grad for n, p in model.named_parameters()},
                buffers={n: b for n, b in model.named_buffers()}, restored=(sync_bns, plain_bns), kernels=kernels,
                graph_ops=recorder.graph_ops, modules=records)


def scenario_dla34(rank):
    """DLA-34 converted to SyncBatchNorm, then accelerated: one training step in Triton (interpreter), recording
    the fused conv-BN-ReLU stacks level0 and level1 (input, output gradient, input gradient)."""
    return _model_step(rank, "dla34", convert_first=True, recorded=("level0", "level1"))


def scenario_centernet(rank):
    """CenterNet DLA-34 (plain convs) accelerated, then converted to SyncBatchNorm: one training step."""
    return _model_step(rank, "centernet", convert_first=False)


def scenario_sync_batchnorm_compiled(rank):
    """DLA-34 (narrow) converted to SyncBatchNorm, accelerated, then torch.compile'd (fullgraph=False, backend
    aot_eager through GraphRecorder; the synchronized fused ops run eagerly through torch.compiler.disable: graph
    breaks), one training step in Triton (interpreter); and the same step uncompiled."""
    return dict(compiled=_model_step(rank, "dla34_narrow", convert_first=True, compiled=True),
                eager=_model_step(rank, "dla34_narrow", convert_first=True))


def ddp_micro_batches(rank):
    """([micro-batch 0, micro-batch 1] of this rank (2 images each, channels_last), output-gradient seed) of the DDP
    scenarios."""
    x, seed = model_batch()
    micro = [rank_rows(x, rank, (2, 2)).contiguous(memory_format=torch.channels_last)]
    return micro + [micro[0].flip(0)], seed


def parameter_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def ddp_step(model, inputs, step_seed, rank):
    """Forward and backward of one DDP-scenario step (model_loss on the (2, 2) split); returns the output."""
    out = model(inputs)
    model_loss(out, step_seed, rank, (2, 2)).backward()
    return out


def two_sgd_steps(wrapped, model, micro, seed, rank):
    """(gradients of step 1, of step 2): `wrapped` (DDP / compiled `model`) on micro-batch 0, an SGD update of
    `model` (lr 0.1, applied by hand), then micro-batch 1."""
    ddp_step(wrapped, micro[0], seed, rank)
    first = parameter_grads(model)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
            p.grad = None
    ddp_step(wrapped, micro[1], seed + 1, rank)
    return first, parameter_grads(model)


def accumulate_two_micro_batches(ddp, wrapped, model, micro, seed, rank):
    """(gradients after micro-batch 0 under ddp.no_sync(), after micro-batch 1 synced), from zero gradients;
    `wrapped` is `ddp` itself or the compiled DDP module around `model`."""
    for p in model.parameters():
        p.grad = None
    with ddp.no_sync():
        ddp_step(wrapped, micro[0], seed, rank)
    local = parameter_grads(model)
    ddp_step(wrapped, micro[1], seed + 1, rank)
    return local, parameter_grads(model)


def scenario_ddp(rank):
    """Accelerated DLA-34s (narrow: DDP's semantics do not depend on the widths) with plain BatchNorm2d under
    DistributedDataParallel, 4 KB gradient buckets: one with static_graph=True for two SGD iterations, one
    that after a first iteration accumulates two micro-batches, the first under no_sync(); and the same steps on a local copy without DDP
    (the reference: DDP averages the ranks' gradients). PyTorch's static_graph=True together with no_sync() is
    broken (pytorch/pytorch#143580), hence two wrappers."""
    import dla_fast
    from torch.nn.parallel import DistributedDataParallel

    micro, seed = ddp_micro_batches(rank)
    grads = parameter_grads
    step = functools.partial(ddp_step, rank=rank)

    static_model, accumulating_model, local_model = (dla_fast.accelerate(build_model("dla34_narrow").train())
                                                     for _ in range(3))
    static = DistributedDataParallel(static_model, bucket_cap_mb=0.004, static_graph=True)
    accumulating = DistributedDataParallel(accumulating_model, bucket_cap_mb=0.004)
    results = {}
    with dla_fast.use_backend("triton"):
        results["static_step1"], results["static_step2"] = two_sgd_steps(static, static_model, micro, seed, rank)

        step(accumulating, micro[1], seed + 1)  # a first synced iteration: DDP then rebuilds its buckets
        results["no_sync"], results["accumulated"] = accumulate_two_micro_batches(
            accumulating, accumulating, accumulating_model, micro, seed, rank)

        results["local_a_out"] = flat_outputs(step(local_model, micro[0], seed))
        results["local_a"] = grads(local_model)
        results["local_a_buffers"] = {n: b.clone() for n, b in local_model.named_buffers()}
        for p in local_model.parameters():
            p.grad = None
        step(local_model, micro[1], seed + 1)
        results["local_b"] = grads(local_model)
        with torch.no_grad():
            for n, p in local_model.named_parameters():
                p.copy_(dict(static_model.named_parameters())[n])
                p.grad = None
        step(local_model, micro[1], seed + 1)
        results["local_step2"] = grads(local_model)
    logged = accumulating._get_ddp_logging_data()
    results["buckets"] = (logged.get("rebuilt_bucket_sizes"),)
    return results


def scenario_ddp_compiled(rank):
    """scenario_ddp's steps under torch.compile (backend aot_eager through GraphRecorder: dynamo's DDPOptimizer
    splits the graph at the gradient buckets, the fused custom ops run their Triton kernels), in both orders:
    torch.compile(DDP(model)) (the documented one) for a first step, then gradient accumulation (micro-batch 0
    under no_sync(), micro-batch 1 synced); DDP(torch.compile(model), static_graph=True) for two SGD
    iterations. 1 MB buckets: DDPOptimizer refuses buckets smaller than DDP's first one (1 MB). The test
    compares them with scenario_ddp's local runs (the same models, inputs and seeds)."""
    import dla_fast
    from torch.nn.parallel import DistributedDataParallel

    micro, seed = ddp_micro_batches(rank)
    grads = parameter_grads
    step = functools.partial(ddp_step, rank=rank)

    outer_model, inner_model = (dla_fast.accelerate(build_model("dla34_narrow").train()) for _ in range(2))
    outer_recorder, inner_recorder = GraphRecorder(), GraphRecorder()
    outer_ddp = DistributedDataParallel(outer_model, bucket_cap_mb=1)
    outer = torch.compile(outer_ddp, backend=outer_recorder)
    inner = DistributedDataParallel(torch.compile(inner_model, backend=inner_recorder), bucket_cap_mb=1,
                                    static_graph=True)
    results = {}
    _launched()
    with dla_fast.use_backend("triton"):
        results["outer_out"] = flat_outputs(step(outer, micro[0], seed))
        results["outer_step1"] = grads(outer_model)
        results["outer_buffers"] = {n: b.clone() for n, b in outer_model.named_buffers()}
        results["no_sync"], results["accumulated"] = accumulate_two_micro_batches(outer_ddp, outer, outer_model,
                                                                                  micro, seed, rank)
        results["outer_kernels"] = _launched()

        results["static_step1"], results["static_step2"] = two_sgd_steps(inner, inner_model, micro, seed, rank)
        results["inner_kernels"] = _launched()
    results["outer_graph_ops"], results["inner_graph_ops"] = outer_recorder.graph_ops, inner_recorder.graph_ops
    return results


def scenario_ddp_inductor(rank):
    """One accelerated DLA tree level (plain BatchNorm2d) in torch.compile(DDP(model)) with inductor (its C++
    CPU kernels around the fused custom ops, which run their Triton kernels): one training step on local
    batches of 2 (10x10 images: 5x5 after the stride), and the same step on a local copy without DDP or compile."""
    import dla_fast
    from torch.nn.parallel import DistributedDataParallel

    g = torch.Generator().manual_seed(15)
    x = rank_rows(torch.randn(4, 4, 10, 10, generator=g), rank, (2, 2)).contiguous(memory_format=torch.channels_last)
    model, local = (dla_fast.accelerate(build_model("tree").train()) for _ in range(2))
    compiled = torch.compile(DistributedDataParallel(model))
    results = {}
    _launched()
    with dla_fast.use_backend("triton"):
        for key, run, module in (("compiled", compiled, model), ("local", local, local)):
            out = run(x)
            model_loss(out, 16, rank, (2, 2)).backward()
            results[key] = dict(out=out.detach(), grads={n: p.grad for n, p in module.named_parameters()},
                                buffers={n: b for n, b in module.named_buffers()}, kernels=_launched())
    return results


def scenario_mismatched_channels(rank):
    """Rank 0 normalizes 4 channels, rank 1 five: both must raise (not hang)."""
    from dla_fast.ops.batchnorm_act import batchnorm_act

    c = 4 + rank
    x = torch.randn(2, c, 3, 3)
    try:
        batchnorm_act(x, torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c), None, True, sync=True)
    except ValueError as error:
        return dict(error=str(error))
    return dict(error=None)


def scenario_ddp_sync_batchnorm_cuda(rank):
    """GPU only (CUDA_SCENARIOS): both ranks on CUDA device 0 (gloo carries CUDA tensors; NCCL refuses two ranks
    on one GPU). DLA-34 and CenterNet-DLA-34 with its deformable convs, converted to nn.SyncBatchNorm, under
    DistributedDataParallel: one training step of the eager model (nn.SyncBatchNorm itself) and of the
    accelerated one with each fused backend, fp32 (TF32 off) and bf16 autocast. DDP averages the gradients; they
    are returned summed over the ranks (x world size) like the other scenarios'."""
    import dla_fast

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    backends = ["triton"] + (["cuda"] if dla_fast.backend.unavailable_reason("cuda", device) is None else [])
    return ddp_sync_batchnorm_steps(rank, device, ("dla34", "centernet_dcn"), ["eager"] + backends, ("fp32", "bf16"))


def ddp_sync_batchnorm_steps(rank, device, names, providers, dtypes) -> dict:
    """{(model name, provider, dtype): result} of scenario_ddp_sync_batchnorm_cuda on `device`; provider "eager"
    (the model as it is) or a dla_fast backend (accelerated)."""
    import dla_fast
    from torch.nn.parallel import DistributedDataParallel

    x, seed = model_batch()
    local = rank_rows(x, rank).to(device).contiguous(memory_format=torch.channels_last)
    results = {}
    for name in names:
        for provider in providers:
            for dtype in dtypes:
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model(name).train())
                if provider != "eager":
                    dla_fast.accelerate(model)
                ddp = DistributedDataParallel(model.to(device), device_ids=[device.index] if device.type == "cuda"
                                              else None)
                _launched()
                with dla_fast.use_backend("torch" if provider == "eager" else provider), \
                        torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bf16"):
                    out = ddp(local)
                    model_loss(out, seed, rank).backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                results[name, provider, dtype] = dict(
                    out=flat_outputs(out).float().cpu(), kernels=_launched(),
                    grads={n: p.grad.double().cpu() * 2 for n, p in model.named_parameters()},
                    buffers={n: b.cpu() for n, b in model.named_buffers()})
    return results


SCENARIOS = {"ops": scenario_ops, "dcn": scenario_dcn, "dla34": scenario_dla34, "centernet": scenario_centernet,
             "ddp": scenario_ddp, "ddp_compiled": scenario_ddp_compiled, "ddp_inductor": scenario_ddp_inductor,
             "sync_batchnorm_compiled": scenario_sync_batchnorm_compiled,
             "mismatched_channels": scenario_mismatched_channels}
CUDA_SCENARIOS = {"ddp_sync_batchnorm_cuda": scenario_ddp_sync_batchnorm_cuda}


def main(argv):
    import torch.distributed as dist

    rank, world, port, out_dir = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    names = argv[5].split(",") if len(argv) > 5 else list(SCENARIOS)
    torch.set_num_threads(1)
    _count_launches()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        for name in names:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                result = {**SCENARIOS, **CUDA_SCENARIOS}[name](rank)
            except Exception:  # recorded for the test to show; the other rank may then time out
                result = dict(exception=traceback.format_exc())
            torch.save(result, os.path.join(out_dir, f"{name}_{rank}.pt"))
            print(f"rank {rank} {name}: {time.perf_counter() - start:.1f} s, {time.process_time() - cpu:.1f} s CPU",
                  flush=True)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv)
