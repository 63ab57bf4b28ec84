"""Time a DLA model: latency, images/s and peak memory, for inference or a training step.

    python -m dla_fast bench                                  # dla34, best device, fp32, inference
    python -m dla_fast bench --model dla60x --dtype bf16 --channels-last --train --json out.json

A training step is forward + backward + SGD step (with a GradScaler under fp16, as AMP training does).
Each way of running the model is a `Provider`; a run times every provider on a fresh copy of the same
model and prints one table row (and one benchmark record, see dla_fast.cli.records) per provider, with its
speed against eager measured in the same run, the spread of that ratio and whether it is within noise.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import os
import re
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import dla_fast

from . import UsageError, distributed, end_to_end, memory
from .records import BenchRecord, device_name, make_record, markdown_table, significant, write_records
from .timing import PeakMemory, Ratio, Timing, time_iterations

AUTOCAST_DTYPES: Dict[str, Optional[torch.dtype]] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# Defaults per device type; the CPU ones keep a run short on 2 cores (2 + 10 steps of 2 images per provider).
DEFAULTS = {
    "cuda": dict(batch=32, size=224, warmup=10, iters=50),
    "cpu": dict(batch=2, size=224, warmup=2, iters=10),
}
DLA_STRIDE = 32
SGD_SETTINGS = dict(lr=1e-3, momentum=0.9)


@dataclasses.dataclass(frozen=True)
class Provider:
    """One way to run a model: `prepare(model, config)` turns the eager model (already on the device, in
    the chosen memory format) into the module to time. `baseline`: what a user gets without dla_fast;
    other providers' speedups are reported against it. `description(config)`: what runs, for that run's
    mode (inference or training), for the footnotes."""

    name: str
    prepare: Callable[[nn.Module, "BenchConfig"], nn.Module]
    baseline: bool
    description: Callable[["BenchConfig"], str]


def _prepare_eager(model: nn.Module, config: "BenchConfig") -> nn.Module:
    return model


def _prepare_compile(model: nn.Module, config: "BenchConfig") -> nn.Module:
    return torch.compile(model)


def _prepare_compile_graph(model: nn.Module, config: "BenchConfig") -> nn.Module:
    return torch.compile(model, mode="reduce-overhead")


def _prepare_dla_fast(model: nn.Module, config: "BenchConfig") -> nn.Module:
    return dla_fast.accelerate(model)


def _prepare_dla_fast_compile(model: nn.Module, config: "BenchConfig") -> nn.Module:
    return torch.compile(dla_fast.accelerate(model))


def _prepare_dla_fast_compile_graph(model: nn.Module, config: "BenchConfig") -> nn.Module:
    return torch.compile(dla_fast.accelerate(model), mode="reduce-overhead")


def _prepare_dla_fast_memory_efficient(model: nn.Module, config: "BenchConfig") -> nn.Module:
    return dla_fast.accelerate(model, memory_efficient=True)


def _prepare_dla_fast_conv_gemm(model: nn.Module, config: "BenchConfig") -> nn.Module:
    return dla_fast.accelerate(model, conv="triton")


def _cuda_graphed(model: nn.Module, config: "BenchConfig") -> nn.Module:
    """The model replayed from captured CUDA graphs: the forward (inference), or forward + backward (training)."""
    if config.train:
        return dla_fast.CUDAGraphTraining(model.train())
    return dla_fast.CUDAGraphInference(model.eval())


def _prepare_eager_graph(model: nn.Module, config: "BenchConfig") -> nn.Module:
    return _cuda_graphed(model, config)


def _prepare_dla_fast_graph(model: nn.Module, config: "BenchConfig") -> nn.Module:
    return _cuda_graphed(dla_fast.accelerate(model), config)


def _accelerated_description(config: "BenchConfig") -> str:
    """What dla_fast.accelerate(model) swaps in, in this run's mode (the backend footnote says which kernels)."""
    if config.train:
        return ("dla_fast.accelerate(model) in training: dla_fast's modules for the aggregation nodes and IDA "
                "steps (forward and backward), the blocks' conv + BatchNorm (+ residual) + ReLU as dla_fast's "
                "training modules")
    return ("dla_fast.accelerate(model): dla_fast's modules for the aggregation nodes and IDA steps, BatchNorm "
            "folded into the convs (conv + bias [+ residual] + ReLU in one call), channels_last")


def _graph_description(config: "BenchConfig") -> str:
    if config.train:
        return "replayed from captured CUDA graphs of forward + backward (dla_fast.CUDAGraphTraining)"
    return "replayed from a captured CUDA graph of the forward (dla_fast.CUDAGraphInference)"


PROVIDERS: Dict[str, Provider] = {
    "eager": Provider("eager", _prepare_eager, baseline=True,
                      description=lambda config: "the reference model in eager PyTorch"),
    "compile": Provider("compile", _prepare_compile, baseline=True,
                        description=lambda config: "torch.compile (default mode) of the eager model"),
    "compile_graph": Provider("compile_graph", _prepare_compile_graph, baseline=True,
                              description=lambda config: "torch.compile(mode='reduce-overhead'): inductor kernels "
                                                         "replayed from CUDA graphs"),
    "dla_fast": Provider("dla_fast", _prepare_dla_fast, baseline=False, description=_accelerated_description),
    "dla_fast_memory_efficient": Provider("dla_fast_memory_efficient", _prepare_dla_fast_memory_efficient,
                                          baseline=False,
                                          description=lambda config: "dla_fast.accelerate(model, "
                                          "memory_efficient=True): the fused ops save their inputs and recompute "
                                          "their outputs in the backward (dla_fast.nn.memory)"),
    "dla_fast_conv_gemm": Provider("dla_fast_conv_gemm", _prepare_dla_fast_conv_gemm, baseline=False,
                                   description=lambda config: "dla_fast.accelerate(model, conv='triton'): in training "
                                   "the blocks', stacks' and DLA-Up nodes' convs (1 group, >= 16 input channels) run "
                                   "as dla_fast's implicit-GEMM Triton conv, BatchNorm + ReLU in its prologue, batch "
                                   "statistics in its epilogue (dla_fast.nn.conv_chain)"),
    "dla_fast_compile": Provider("dla_fast_compile", _prepare_dla_fast_compile, baseline=False,
                                 description=lambda config: "torch.compile of the accelerated model (dla_fast's "
                                                            "ops, the folded convs' cuDNN call included, stay custom "
                                                            "ops in inductor's graph)"),
    "dla_fast_compile_graph": Provider("dla_fast_compile_graph", _prepare_dla_fast_compile_graph, baseline=False,
                                       description=lambda config: "torch.compile(mode='reduce-overhead') of the "
                                                                  "accelerated model: replayed from CUDA graphs"),
    "eager_graph": Provider("eager_graph", _prepare_eager_graph, baseline=True,
                            description=lambda config: f"the eager model {_graph_description(config)}"),
    "dla_fast_graph": Provider("dla_fast_graph", _prepare_dla_fast_graph, baseline=False,
                               description=lambda config: f"the accelerated model {_graph_description(config)}"),
}
GRAPH_PROVIDERS = ("eager_graph", "dla_fast_graph")
DEFAULT_PROVIDERS = {"cuda": "eager,dla_fast,eager_graph,dla_fast_graph", "cuda_train": "eager,dla_fast",
                     "cpu": "eager,dla_fast"}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Everything one `bench` run measures, validated. `backends`: the dla_fast backends asked for (each dla_fast
    provider runs once per backend); `backend`: the one in force for the provider being timed."""

    model: str
    checkpoint: Optional[str]
    device: torch.device
    dtype: str
    batch: int
    size: int
    channels_last: bool
    train: bool
    warmup: int
    iters: int
    progress: bool
    defaults_note: Optional[str]
    providers: tuple = ("eager",)
    backend: str = "auto"
    backends: tuple = ("auto",)
    memory_budget_gb: Optional[float] = None

    @property
    def mode(self) -> str:
        return "train_step" if self.train else "inference"

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return AUTOCAST_DTYPES[self.dtype]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def input_shape(self) -> List[int]:
        return [self.batch, 3, self.size, self.size]

    def autocast(self) -> contextlib.AbstractContextManager:
        """AMP autocast in the chosen dtype; nothing for fp32."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="dla34", help=f"model name, one of: {', '.join(dla_fast.list_models())}")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="weights to load with dla_fast.load_checkpoint (default: random weights)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is present, else cpu)")
    parser.add_argument("--dtype", choices=list(AUTOCAST_DTYPES), default="fp32",
                        help="fp32, or AMP autocast in fp16 / bf16 (default fp32)")
    parser.add_argument("--batch", type=int, help="images per step (default 32 on GPU, 2 on CPU)")
    parser.add_argument("--size", type=int, help="image side, a multiple of 32 (default 224)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC (channels_last) model and input")
    parser.add_argument("--train", action="store_true", help="time a training step: forward + backward + SGD step")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 10 on GPU, 2 on CPU)")
    parser.add_argument("--iters", type=int, help="timed calls (default 50 on GPU, 10 on CPU)")
    parser.add_argument("--providers", help="comma-separated ways to run the model, from: "
                        f"{', '.join(PROVIDERS)} (default: {DEFAULT_PROVIDERS['cuda']} on GPU, "
                        f"{DEFAULT_PROVIDERS['cuda_train']} with --train; {DEFAULT_PROVIDERS['cpu']} on CPU, "
                        "where dla_fast runs the eager reference of its fused ops)")
    parser.add_argument("--backend", default="auto",
                        help="dla_fast backend for the dla_fast providers, from: "
                        f"{', '.join(dla_fast.backend.BACKENDS)} (default auto); several, comma-separated, time each "
                        "dla_fast provider once per backend (e.g. --train --backend auto,triton,cuda compares the "
                        "training paths)")
    parser.add_argument("--memory-budget", type=float, metavar="GB",
                        help="with --train: also print the largest batch whose training memory fits GB (10^9 bytes) "
                             "per provider (dla_fast.cli.memory)")
    parser.add_argument("--json", metavar="PATH", help="also write the benchmark records to this JSON file")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    distributed.add_arguments(parser)
    end_to_end.add_arguments(parser)


def _resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name!r}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is available here (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: choose cpu, cuda or cuda:N")
    return device


def _cpu_autocast_works(dtype: torch.dtype) -> bool:
    """Whether CPU autocast really computes a convolution in `dtype` (older torch silently disables it)."""
    x, weight = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    try:
        with torch.autocast("cpu", dtype=dtype):
            return F.conv2d(x, weight).dtype == dtype
    except RuntimeError:
        return False


def _check_dtype(dtype: str, device: torch.device) -> None:
    amp_dtype = AUTOCAST_DTYPES[dtype]
    if amp_dtype is None:
        return
    if device.type == "cpu" and not _cpu_autocast_works(amp_dtype):
        raise UsageError(f"--dtype {dtype}: this PyTorch ({torch.__version__}) has no CPU autocast for {amp_dtype}; "
                         "use fp32 or bf16 on the CPU")
    if device.type == "cuda" and amp_dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--dtype bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; use fp16")


def _positive(value: int, option: str, minimum: int = 1) -> int:
    if value < minimum:
        raise UsageError(f"{option} must be at least {minimum}; got {value}")
    return value


def check_output_path(path: str, option: str) -> None:
    """UsageError unless a file can be written at `path` (missing folders are created when writing): checked
    before a run, so that the results are not lost at its end."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a folder; give a file name, e.g. {os.path.join(path, 'bench.json')}")
    if os.path.exists(path):
        try:
            open(path, "a").close()
        except OSError as e:
            raise UsageError(f"{option} {path}: the file cannot be written ({e.strerror})") from None
        return
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        if os.path.exists(folder):
            raise UsageError(f"{option} {path}: {folder} is a file, not a folder")
        folder = os.path.dirname(folder)
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot create files in {folder} ({e.strerror})") from None


def _resolve_backends(value: str, device: torch.device, used: bool) -> tuple:
    """The backends of `--backend` (comma-separated), each known and, when a dla_fast provider runs, usable."""
    backends = tuple(dict.fromkeys(b.strip().lower() for b in value.split(",") if b.strip()))
    unknown = [b for b in backends if b not in dla_fast.backend.BACKENDS]
    if unknown or not backends:
        raise UsageError(f"--backend: unknown {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(dla_fast.backend.BACKENDS)}, or several separated by commas")
    for name in backends if used else ():
        reason = dla_fast.backend.unavailable_reason(name, device)
        if reason:
            raise UsageError(f"--backend {name} cannot run on {device}: {reason}")
    return backends


def resolve_config(args: argparse.Namespace) -> BenchConfig:
    """Validate the options and fill in the per-device defaults; UsageError on a bad value."""
    if args.model not in dla_fast.list_models():
        try:
            dla_fast.create_model(args.model)
        except ValueError as e:  # the registry's message lists the known models
            raise UsageError(str(e)) from None
    device = _resolve_device(args.device)
    defaults = DEFAULTS[device.type]
    chosen = {key: getattr(args, key) for key in defaults}
    taken = [key for key, value in chosen.items() if value is None]
    values = {key: defaults[key] if chosen[key] is None else chosen[key] for key in defaults}
    _positive(values["batch"], "--batch")
    _positive(values["iters"], "--iters")
    _positive(values["warmup"], "--warmup", minimum=0)
    size = _positive(values["size"], "--size", minimum=DLA_STRIDE)
    if size % DLA_STRIDE:
        lower, upper = size // DLA_STRIDE * DLA_STRIDE, -(-size // DLA_STRIDE) * DLA_STRIDE
        raise UsageError(f"--size {size}: DLA needs image sides divisible by {DLA_STRIDE} (its total stride); "
                         f"try {lower} or {upper}")
    if args.train and values["batch"] * (size // DLA_STRIDE) ** 2 == 1:
        raise UsageError(f"--train with --batch 1 --size {size}: BatchNorm in training needs more than one value per "
                         f"channel, and the last level (stride {DLA_STRIDE}) is 1x1 at this size; use --batch 2 or "
                         f"more, or --size {2 * DLA_STRIDE} or more")
    _check_dtype(args.dtype, device)
    default = DEFAULT_PROVIDERS["cuda_train" if device.type == "cuda" and args.train else device.type]
    providers = tuple(p for p in (args.providers or default).split(",") if p)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown or not providers:
        raise UsageError(f"--providers: unknown {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(PROVIDERS)}")
    graphed = [p for p in providers if p in GRAPH_PROVIDERS]
    if graphed and device.type != "cuda":
        raise UsageError(f"--providers {','.join(graphed)}: CUDA-graph replay needs a CUDA GPU (the device is "
                         f"{device})")
    backends = _resolve_backends(args.backend, device, any(p.startswith("dla_fast") for p in providers))
    if args.memory_budget is not None and (not args.train or not args.memory_budget > 0):
        raise UsageError(f"--memory-budget {args.memory_budget}: give a positive number of GB, with --train")
    if args.json:
        check_output_path(args.json, "--json")
    note = None
    if device.type == "cpu" and taken:
        why = "no CUDA GPU found" if args.device is None else "--device cpu"
        note = (f"{why}: small CPU defaults for " + ", ".join(f"{key} {values[key]}" for key in taken)
                + " (set --batch/--size/--warmup/--iters to change)")
    return BenchConfig(model=args.model, checkpoint=args.checkpoint, device=device, dtype=args.dtype,
                       channels_last=args.channels_last, train=args.train, progress=args.progress,
                       defaults_note=note, providers=providers, backend=backends[0], backends=backends,
                       memory_budget_gb=args.memory_budget, **values)


def build_model(config: BenchConfig) -> nn.Module:
    """The eager model on the CPU, random or from `--checkpoint`; UsageError when it cannot be built or the file
    cannot be read or does not fit."""
    try:
        model = dla_fast.create_model(config.model)
    except ImportError as e:  # e.g. the deformable convs of CenterNet need torchvision
        raise UsageError(f"--model {config.model}: {e}") from None
    if config.checkpoint:
        try:
            dla_fast.load_checkpoint(model, config.checkpoint)
        except (OSError, ValueError, RuntimeError, ImportError) as e:
            raise UsageError(f"--checkpoint {config.checkpoint}: {e}") from None
    return model


def training_loss(output: Any) -> torch.Tensor:
    """Cross-entropy against fixed labels for classifier logits (N, classes); for other outputs
    (segmentation maps, detection head dicts) the sum of the means of all their tensors."""
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        labels = torch.arange(output.shape[0], device=output.device) % output.shape[1]
        return F.cross_entropy(output.float(), labels)
    if isinstance(output, torch.Tensor):
        return output.float().mean()
    parts = output.values() if isinstance(output, dict) else output
    return sum(training_loss(part) for part in parts)


def make_step(model: nn.Module, example: torch.Tensor, config: BenchConfig) -> Callable[[], None]:
    """The call to time: an inference forward, or a full training step with its own SGD optimizer."""
    if not config.train:
        model.eval()

        def inference_step() -> None:
            with torch.inference_mode(), config.autocast():
                model(example)

        return inference_step

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), **SGD_SETTINGS)
    scaler = torch.amp.GradScaler(config.device.type, enabled=config.autocast_dtype is torch.float16)

    def training_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with config.autocast():
            loss = training_loss(model(example))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return training_step


def count_step_flops(model: nn.Module, config: BenchConfig) -> int:
    """FLOPs of one step of the eager model: the convolutions and matmuls of the forward (and, for a
    training step, of the backward), counted by torch.utils.flop_counter on a copy on the meta device
    (no compute, no memory; the count is the same in every dtype and layout)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta_model = copy.deepcopy(model).to("meta").train(config.train)
    example = torch.empty(config.input_shape, device="meta")
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(config.train):
        output = meta_model(example)
        if config.train:
            training_loss(output).backward()
    return counter.get_total_flops()


def _progress_bar(config: BenchConfig, label: str):
    """A tqdm bar over warm-up and timed calls on stderr, and the `on_step` callback that advances it."""
    from tqdm import tqdm

    bar = tqdm(total=config.warmup + config.iters, desc=label, unit="step", leave=False, file=sys.stderr,
               disable=not config.progress)
    phase_shown = ["warm-up" if config.warmup else "timed"]
    bar.set_postfix_str(phase_shown[0])  # shown during the first call too, which may compile kernels

    def on_step(phase: str) -> None:
        if phase_shown[-1:] != [phase]:
            phase_shown.append(phase)
            bar.set_postfix_str(phase)
        bar.update(1)

    return bar, on_step


def provider_label(provider: Provider, config: BenchConfig) -> str:
    """The provider's name in the table and records: `dla_fast[triton]_channels_last` for a dla_fast provider
    under a backend other than auto, with `_channels_last` for NHWC runs."""
    backend = f"[{config.backend}]" if provider.name.startswith("dla_fast") and config.backend != "auto" else ""
    return provider.name + backend + ("_channels_last" if config.channels_last else "")


def bench_provider(provider: Provider, eager_model: nn.Module, config: BenchConfig,
                   step_flops: Optional[int]) -> BenchRecord:
    """Time one provider on a fresh copy of `eager_model` and return its record."""
    model = copy.deepcopy(eager_model).to(config.device, memory_format=config.memory_format)
    example = torch.randn(config.input_shape, device=config.device).contiguous(memory_format=config.memory_format)
    model = provider.prepare(model, config)
    step = make_step(model, example, config)
    label = provider_label(provider, config)
    bar, on_step = _progress_bar(config, f"{config.model} {label} {config.mode}")
    with bar, PeakMemory(config.device) as memory:
        timing: Timing = time_iterations(step, config.device, config.warmup, config.iters, on_step)
    extra = dict(batch=config.batch, image_size=config.size, images_per_s=config.batch / (timing.ms_p50 / 1e3),
                 peak_mem_mb=memory.mb, peak_mem_kind=memory.kind,
                 layout="channels_last" if config.channels_last else "nchw",
                 weights=config.checkpoint or "random", warmup=config.warmup, iters=config.iters)
    if provider.name.startswith("dla_fast"):
        extra["backend"] = config.backend
    if config.device.type == "cpu":
        extra["cpu_threads"] = torch.get_num_threads()
    if config.train:
        extra["training_memory"] = dataclasses.asdict(_training_memory(model, config))
    return make_record(config.model, label, config.mode, config.dtype, config.input_shape, timing, config.device,
                       min_flops=step_flops, baseline=provider.baseline, extra=extra)


def _training_memory(model: nn.Module, config: BenchConfig) -> memory.TrainingMemory:
    """The provider's training memory at config.batch and the largest batch within --memory-budget."""
    def make_example(batch: int) -> torch.Tensor:
        shape = [batch] + config.input_shape[1:]
        return torch.randn(shape, device=config.device).contiguous(memory_format=config.memory_format)

    budget = None if config.memory_budget_gb is None else int(config.memory_budget_gb * 1e9)
    return memory.measure_training_memory(model, make_example, lambda b: make_step(model, make_example(b), config),
                                          config.batch, config.device, budget, config.autocast)


def run_benchmarks(config: BenchConfig, providers: List[Provider]) -> List[BenchRecord]:
    """One record per provider (per backend of `config.backends` for the dla_fast providers), all on the same
    weights and input shape.

    The eager model stays on the CPU; each provider times its own copy on the device, so the peak memory
    of a row holds that provider's model only."""
    eager_model = build_model(config)
    step_flops = count_step_flops(eager_model, config)
    records = []
    for provider in providers:
        backends = config.backends if provider.name.startswith("dla_fast") else config.backends[:1]
        for backend in backends:
            with dla_fast.use_backend(backend):
                records.append(bench_provider(provider, eager_model, dataclasses.replace(config, backend=backend),
                                              step_flops))
    return records


def reference_record(records: List[BenchRecord]) -> BenchRecord:
    """The row the others are compared with: eager when it ran, else the first baseline, else the first row."""
    eager = [r for r in records if r.provider in ("eager", "eager_channels_last")]
    baselines = [r for r in records if r.baseline]
    return (eager or baselines or records)[0]


def _ratio(row: BenchRecord, reference: BenchRecord) -> Ratio:
    counts = [r.extra.get("iters") for r in (row, reference)]
    return Ratio.of(row, reference, samples=None if None in counts else min(counts))


def format_table(records: List[BenchRecord]) -> str:
    """The records as an aligned markdown table (one row per record), with each row's speed against the
    reference row (`reference_record`) when there are several rows."""
    reference = reference_record(records)
    compare = len(records) > 1
    headers = ["model", "provider", "device", "dtype", "batch", "size", "mode", "ms p50", "ms p20-p80",
               "images/s", "TFLOP/s", "peak MB"] + ([f"vs {reference.provider}"] if compare else [])
    rows = []
    for r in records:
        rows.append([r.op, r.provider, r.device, r.dtype, r.extra["batch"], r.extra["image_size"],
                     r.mode.replace("_", " "), significant(r.ms_p50, 4),
                     f"{significant(r.ms_p20, 4)}-{significant(r.ms_p80, 4)}",
                     significant(r.extra["images_per_s"]), significant(r.tflops),
                     significant(r.extra["peak_mem_mb"], digits=1)]
                    + ([("reference" if r is reference else str(_ratio(r, reference)))] if compare else []))
    return markdown_table(headers, rows, right_align=[False] * 4 + [True] * 2 + [False] + [True] * 6)


def _footnotes(records: List[BenchRecord], config: BenchConfig, providers: List[Provider]) -> List[str]:
    first = records[0]
    flops = "n/a" if first.min_flops is None else f"{first.min_flops / 1e9:.1f} GFLOP per step"
    notes = [f"latency: median (p20-p80) per step; {first.timing}"]
    if len(records) > 1:
        reference = reference_record(records).provider
        notes.append(f"vs {reference}: {reference}'s median time / the row's (above 1: the row is faster), in "
                     f"brackets the ratio's range over both rows' p20-p80 ranges; 'within noise' when those ranges "
                     f"overlap (the difference is not shown by this run: more --iters, or run again)")
    notes += [f"peak MB: {first.extra['peak_mem_kind']} during warm-up and timed steps",
              f"TFLOP/s: conv + matmul FLOPs of the eager model ({flops}, torch.utils.flop_counter) / median time"]
    notes += [f"provider {p.name}: {p.description(config)}" for p in providers]
    if any(p.name.startswith("dla_fast") for p in providers):
        notes += [f"backend {name}: {_backend_note(dataclasses.replace(config, backend=name))}"
                  for name in config.backends]
    if config.autocast_dtype is not None:
        notes.append(f"dtype {config.dtype}: AMP autocast")
    return notes


def _backend_note(config: BenchConfig) -> str:
    """What runs inside dla_fast's modules under `config.backend` on the run's device and mode."""
    from dla_fast.backend import AUTO_CHOICE

    if config.backend == "torch" or (config.backend == "auto" and config.device.type != "cuda"):
        where = "on the CPU, auto runs" if config.backend == "auto" else "runs"
        return (f"{where} the eager reference of dla_fast's modules (plain PyTorch, no fused kernels: expect "
                "eager's speed; the fused kernels need a GPU, or TRITON_INTERPRET=1 with --backend triton)")
    if config.backend == "auto":
        note = "dla_fast's fused kernels (Triton, and the extension's where built and faster)"
        if config.train and AUTO_CHOICE.get("batchnorm_act_training") == "torch":
            note += ("; the blocks' training BatchNorm + ReLU stay eager under auto (dla_fast.backend.AUTO_CHOICE: "
                     "--backend triton or cuda forces the fused training BatchNorm)")
        return note
    return f"every fused op of dla_fast runs the {config.backend!r} kernels" + (
        ", the blocks' training BatchNorm + ReLU included" if config.train else "")


def run(args: argparse.Namespace) -> int:
    if args.end_to_end:  # the whole detection pipeline (dla_fast.cli.end_to_end)
        return end_to_end.run(args)
    config = resolve_config(args)
    weights = f"checkpoint {config.checkpoint}" if config.checkpoint else "random weights"
    print(f"dla_fast bench: {config.model} ({weights}) on {config.device} [{device_name(config.device)}]")
    if config.defaults_note:
        print(f"note: {config.defaults_note}")
    providers = [PROVIDERS[name] for name in config.providers]
    if distributed.launched():  # torchrun: the data-parallel training step (dla_fast.cli.distributed)
        if len(config.backends) > 1:
            raise UsageError(f"--backend {','.join(config.backends)}: under torchrun, give one backend per run")
        config = dataclasses.replace(config, device=distributed.rank_device(config.device))
        with dla_fast.use_backend(config.backend):
            return distributed.run(args, config, providers, build_model, count_step_flops, make_step, write_records)
    if args.sync_bn:
        raise UsageError("--sync-bn is for data-parallel runs: start bench with torchrun --nproc-per-node N")
    try:
        records = run_benchmarks(config, providers)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise UsageError(out_of_memory_message(e, config)) from None
    print(format_table(records))
    for line in _footnotes(records, config, providers):
        print(line)
    for line in memory.memory_lines([(r.provider, memory.TrainingMemory(**r.extra["training_memory"]))
                                     for r in records if "training_memory" in r.extra]):
        print(line)
    if args.json:
        try:
            write_records(args.json, records)
        except OSError as e:
            raise UsageError(f"--json {args.json}: could not write the records ({e}); the table above holds "
                             "the results") from None
        print(f"wrote {len(records)} record(s) to {args.json}")
    return 0


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# How the allocators word a failed allocation: the CPU's DefaultCPUAllocator ("you tried to allocate 60211200000000
# bytes"), the CUDA caching allocator ("Tried to allocate 2.00 GiB").
_CPU_ALLOCATION = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
_CUDA_ALLOCATION = re.compile(r"Tried to allocate ([\d.]+ [KMGTP]?i?B)")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation failure (torch raises plain RuntimeError for the CPU allocator's)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return bool(_CPU_ALLOCATION.search(text)) or "out of memory" in text.lower()


def format_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'; 60211200000000 -> '54.8 TiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def out_of_memory_message(error: BaseException, config: BenchConfig) -> str:
    """One line: where memory ran out, the allocation that failed (from the allocator's message), the size of
    the input batch alone, and what to change."""
    where = "GPU memory" if config.device.type == "cuda" else "memory"
    cpu = _CPU_ALLOCATION.search(str(error))
    cuda = _CUDA_ALLOCATION.search(str(error))
    if cpu:
        failed = f"an allocation of {format_bytes(int(cpu.group(1)))} failed"
    elif cuda:
        failed = f"an allocation of {cuda.group(1)} failed"
    else:
        failed = _first_line(error)
    input_bytes = 4 * math.prod(config.input_shape)  # the fp32 input the step is timed on
    return (f"out of {where} at --batch {config.batch} --size {config.size}: {failed} (the fp32 input batch alone "
            f"is {format_bytes(input_bytes)}); try a smaller --batch or --size")
