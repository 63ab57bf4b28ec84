"""Data-parallel training benchmark: `torchrun --nproc-per-node N -m dla_fast bench --train ...`.

Under torchrun (WORLD_SIZE > 1 in the environment) `bench` joins the process group torchrun set up (NCCL on
GPUs, one GPU per process: cuda:LOCAL_RANK; gloo on the CPU) and, for every provider:
1. times the training step of one process alone (rank 0, without DistributedDataParallel, its SyncBatchNorms
   in a group of its own; the other ranks wait), the single-process reference;
2. times the same step on every rank, the model wrapped in DistributedDataParallel (bucketed gradient
   all-reduce), `--batch` images per rank.
Rank 0 prints per-rank and total images/s and the scaling efficiency
    total images/s / (N * single-process images/s),
and writes the records (`--json`). The total is N * batch / the slowest rank's median step time (synchronous
data parallelism runs at the pace of its slowest rank). With `--sync-bn` the model's BatchNorms are converted
with nn.SyncBatchNorm.convert_sync_batchnorm first (the dla_fast providers synchronize them in the fused ops;
GPUs only: DistributedDataParallel refuses SyncBatchNorm layers in CPU modules). On the CPU each process uses the threads
torchrun gives it (OMP_NUM_THREADS, 1 by default), the single-process reference too.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
from typing import List

import torch
import torch.distributed as dist
import torch.nn as nn

from . import UsageError
from .records import BenchRecord, make_record
from .timing import Timing, time_iterations


# What torch.distributed's env:// rendezvous reads besides WORLD_SIZE (torchrun sets them all).
RENDEZVOUS_VARIABLES = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several ranks."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value) > 1
    except ValueError:
        raise UsageError(f"environment variable WORLD_SIZE={value!r}: not a number of processes (torchrun sets "
                         "it; unset it for a single-process run)") from None


def check_rendezvous_environment() -> None:
    """UsageError naming the missing variables when WORLD_SIZE asks for several ranks but the rest of what
    torch.distributed needs to find them is not set (a WORLD_SIZE left in the environment, or a hand-made
    launch)."""
    missing = [name for name in RENDEZVOUS_VARIABLES if not os.environ.get(name)]
    if missing:
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for a data-parallel run, but "
                         f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: start it with "
                         "torchrun --nproc-per-node N -m dla_fast bench --train ... (torchrun sets them), or unset "
                         "WORLD_SIZE for a single-process run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sync-bn", action="store_true",
                        help="under torchrun: convert the BatchNorms to nn.SyncBatchNorm before timing")


def rank_device(requested: torch.device) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when the run is on GPUs, else the CPU."""
    if requested.type != "cuda":
        return requested
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise UsageError(f"LOCAL_RANK {local_rank}: only {torch.cuda.device_count()} CUDA device(s) here; start "
                         "at most one process per GPU")
    return torch.device("cuda", local_rank)


def _prepare(provider, eager_model: nn.Module, config, sync_bn: bool, process_group=None) -> nn.Module:
    model = copy.deepcopy(eager_model)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    model = model.to(config.device, memory_format=config.memory_format)
    return provider.prepare(model, config)


def _time_step(model: nn.Module, config, make_step) -> Timing:
    example = torch.randn(config.input_shape, device=config.device).contiguous(memory_format=config.memory_format)
    return time_iterations(make_step(model, example, config), config.device, config.warmup, config.iters)


def _images_per_s(config, timing: Timing) -> float:
    return config.batch / (timing.ms_p50 / 1e3)


def bench_data_parallel(provider, eager_model: nn.Module, config, step_flops, make_step, sync_bn: bool
                        ) -> BenchRecord:
    """One provider: rank 0 alone, then every rank under DistributedDataParallel; the record (on every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    alone = dist.new_group([0]) if sync_bn else None  # rank 0's SyncBatchNorms sync with nobody (every rank calls)
    single = None
    if rank == 0:
        single = _time_step(_prepare(provider, eager_model, config, sync_bn, alone), config, make_step)
    dist.barrier()
    model = _prepare(provider, eager_model, config, sync_bn)
    device_ids = [config.device.index] if config.device.type == "cuda" else None
    # CenterTrack's previous-frame branches get no input here (bench feeds the image only): their parameters
    # take no gradient, which DDP must be told
    unused = bool(getattr(eager_model, "takes_pre_img", False) or getattr(eager_model, "takes_pre_hm", False))
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)
    timing = _time_step(ddp, config, make_step)
    timings: List[Timing] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(timings, timing)
    single = [single]
    dist.broadcast_object_list(single, src=0)
    single = single[0]
    slowest = max(timings, key=lambda t: t.ms_p50)
    per_rank = [_images_per_s(config, t) for t in timings]
    total = world * config.batch / (slowest.ms_p50 / 1e3)
    single_rate = _images_per_s(config, single)
    label = provider.name + ("_channels_last" if config.channels_last else "") + f"_ddp{world}"
    extra = dict(batch=config.batch, image_size=config.size, images_per_s=total, world_size=world,
                 process_group_backend=dist.get_backend(), images_per_s_per_rank=per_rank,
                 single_process_images_per_s=single_rate, single_process_ms_p50=single.ms_p50,
                 scaling_efficiency=total / (world * single_rate), sync_batchnorm=sync_bn,
                 layout="channels_last" if config.channels_last else "nchw", weights=config.checkpoint or "random",
                 warmup=config.warmup, iters=config.iters, peak_mem_mb=None, peak_mem_kind="not measured")
    if config.device.type == "cpu":
        extra["cpu_threads"] = torch.get_num_threads()
    return make_record(config.model, label, config.mode, config.dtype, config.input_shape, slowest, config.device,
                       min_flops=step_flops * world if step_flops else None, baseline=provider.baseline,
                       extra=extra)


def format_table(records: List[BenchRecord]) -> str:
    from .records import markdown_table, significant

    headers = ["model", "provider", "device", "dtype", "batch/rank", "size", "ranks", "ms p50 (slowest)",
               "images/s per rank", "total images/s", "1 process images/s", "scaling"]
    rows = [[r.op, r.provider, r.device, r.dtype, r.extra["batch"], r.extra["image_size"], r.extra["world_size"],
             significant(r.ms_p50, 4), " / ".join(significant(v) for v in r.extra["images_per_s_per_rank"]),
             significant(r.extra["images_per_s"]), significant(r.extra["single_process_images_per_s"]),
             f"{100 * r.extra['scaling_efficiency']:.0f}%"] for r in records]
    return markdown_table(headers, rows, right_align=[False] * 4 + [True] * 8)


def run(args: argparse.Namespace, config, providers, build_model, count_step_flops, make_step, write_records) -> int:
    """The bench command under torchrun (see the module docstring); the helpers come from dla_fast.cli.bench."""
    if not config.train:
        raise UsageError("under torchrun, bench times the data-parallel training step: add --train")
    if args.sync_bn and config.device.type == "cpu":
        raise UsageError("--sync-bn needs GPUs: DistributedDataParallel refuses SyncBatchNorm layers in CPU modules")
    check_rendezvous_environment()
    backend = "nccl" if config.device.type == "cuda" else "gloo"
    if config.device.type == "cuda":
        torch.cuda.set_device(config.device)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    except (ValueError, RuntimeError) as e:  # bad rendezvous values, the master unreachable (DistNetworkError)
        raise UsageError(f"could not join the {backend} process group at "
                         f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} as rank {os.environ['RANK']} of "
                         f"{os.environ['WORLD_SIZE']}: {e}") from None
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if rank == 0:
            print(f"data parallel: {world} processes, {backend}, {config.batch} images per rank"
                  + (", SyncBatchNorm" if args.sync_bn else ""))
        eager_model = build_model(config)
        step_flops = count_step_flops(eager_model, config)
        records = [bench_data_parallel(p, eager_model, config, step_flops, make_step, args.sync_bn)
                   for p in providers]
        if rank == 0:
            print(format_table(records))
            print(f"latency: median per step of the slowest rank; {records[0].timing}")
            print("scaling: total images/s / (processes x images/s of one process alone, same batch per process)")
            if args.json:
                write_records(args.json, records)
                print(f"wrote {len(records)} record(s) to {args.json}")
    finally:
        dist.destroy_process_group()
    return 0
