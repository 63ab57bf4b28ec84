"""`python -m dla_fast bench --end-to-end`: frames per second of a detector's whole inference pipeline.

    python -m dla_fast bench --model centernet_dla34 --end-to-end --dtype bf16         # batch 1 and 16 on a GPU
    python -m dla_fast bench --model centernet_dla34 --end-to-end --kind fairmot       # FairMOT's heads
    python -m dla_fast bench --model centertrack_dla34 --end-to-end

Three pipelines on the same weights and the same uint8 frames (random pixels, --image-size), each timed stage
by stage (the device synchronized after each stage, so the shares add up to the total):

- `peers_eager`: the peers' pipeline as they run it (dla_fast.detection.reference): OpenCV pre-processing of
  each image on the host (CenterNet's warpAffine + normalize, FairMOT's letterbox), the batch copied to the
  device, the eager network, their decode (sigmoid_, _nms, _topk, gathers) and their host post-processing
  (ctdet_post_process + merge_outputs; FairMOT's conf_thres and re-ID gather; CenterTrack's
  generic_post_process). The peers run one image at a time; batch B here stacks B pre-processed images.
- `dla_fast_network`: the same pre- and post-processing around dla_fast's network (accelerated; replayed from a
  CUDA graph on a GPU, except CenterTrack).
- `dla_fast`: dla_fast.Detector: one pre-processing kernel per batch, the same network, fused decoding, one
  copy of the results to the host.

CenterTrack's previous-frame inputs: the previous step's network input and a random heatmap in every pipeline
(rendering the heatmap from the tracks is the tracker's work, not timed).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

import dla_fast

from . import UsageError
from .records import device_name, markdown_table

STAGES = ("preprocess", "network", "decode")
DEFAULTS = {"cuda": dict(batches=(1, 16), size=512, warmup=10, iters=50),
            "cpu": dict(batches=(1, 2), size=64, warmup=1, iters=3)}
IMAGE_SIZES = {"fairmot": (1080, 1920), "centernet": (480, 640), "centertrack": (480, 640)}
FAIRMOT_HEADS = {"hm": 1, "wh": 4, "reg": 2, "id": 128}
AUTOCAST = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("end to end (--end-to-end)")
    group.add_argument("--end-to-end", action="store_true",
                       help="time the whole detection pipeline (pre-processing, network, decoding) of a CenterNet, "
                            "FairMOT or CenterTrack model against the peers' eager pipeline, with each stage's share")
    group.add_argument("--kind", choices=("centernet", "fairmot", "centertrack"),
                       help="pipeline (default: centertrack for centertrack_* models, else centernet; fairmot "
                            "builds the model with FairMOT's heads)")
    group.add_argument("--image-size", metavar="HxW",
                       help="size of the input frames (default 480x640; 1080x1920 for fairmot)")


def _parse_size(text: str) -> tuple:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--image-size {text!r}: expected HxW, e.g. 480x640") from None
    if h < 1 or w < 1:
        raise UsageError(f"--image-size {text}: sides must be positive")
    return h, w


def _kind(args: argparse.Namespace) -> str:
    if args.kind:
        return args.kind
    return "centertrack" if args.model.startswith("centertrack_") else "centernet"


def _build_model(args: argparse.Namespace, kind: str) -> torch.nn.Module:
    if not args.model.startswith(("centernet_", "centertrack_")):
        raise UsageError(f"--end-to-end: --model {args.model} is no detector; use a centernet_* or centertrack_* "
                         "model (e.g. centernet_dla34)")
    if kind == "centertrack" and not args.model.startswith("centertrack_"):
        raise UsageError(f"--kind centertrack needs a centertrack_* model; got {args.model}")
    kwargs = {"heads": FAIRMOT_HEADS} if kind == "fairmot" else {}
    try:
        model = dla_fast.create_model(args.model, **kwargs)
    except (ValueError, ImportError) as e:
        raise UsageError(f"--model {args.model}: {e}") from None
    if args.checkpoint:
        try:
            dla_fast.load_checkpoint(model, args.checkpoint)
        except (OSError, ValueError, RuntimeError) as e:
            raise UsageError(f"--checkpoint {args.checkpoint}: {e}") from None
    return model.eval()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeersPipeline:
    """The peers' pre-processing, their decode and host post-processing around `model`."""

    def __init__(self, model, kind: str, input_size: int, K: int, autocast: Callable, device: torch.device):
        from ..detection import reference

        self.ref, self.model, self.kind, self.size, self.K = reference, model, kind, input_size, K
        self.autocast, self.device = autocast, device
        self.num_classes = model.heads["hm"]
        self.previous: Optional[torch.Tensor] = None

    def preprocess(self, frames: List[np.ndarray]):
        if self.kind == "fairmot":
            items = [self.ref.fairmot_pre_process(f, self.size, self.size) for f in frames]
        else:
            items = [self.ref.centernet_pre_process(f, self.size, self.size) for f in frames]
        batch = torch.from_numpy(np.concatenate([i[0] for i in items])).to(self.device)
        return batch, [i[1] for i in items]

    def network(self, inputs):
        batch, metas = inputs
        with torch.no_grad(), self.autocast():
            if self.kind == "centertrack":
                pre = self.previous if self.previous is not None else batch
                pre_hm = torch.rand(batch.shape[0], 1, *batch.shape[2:], device=self.device)
                output = self.model(batch, pre, pre_hm)[-1]
                self.previous = batch
            else:
                output = self.model(batch)[-1]
        return output, metas

    def decode(self, inputs):
        output, metas = inputs
        ref = self.ref
        with torch.no_grad():
            hm = output["hm"].sigmoid_()
            c, s = [m["c"] for m in metas], [m["s"] for m in metas]
            h, w = metas[0]["out_height"], metas[0]["out_width"]
            if self.kind == "centertrack":
                dets = ref.generic_decode({"hm": hm, "wh": output["wh"], "reg": output["reg"],
                                           "tracking": output["tracking"]}, K=self.K)
                dets = {k: v.detach().cpu().numpy() for k, v in dets.items()}
                return ref.generic_post_process(dets, c, s, h, w, out_thresh=0.3)
            if self.kind == "fairmot":
                id_feature = torch.nn.functional.normalize(output["id"], dim=1)
                dets, inds = ref.mot_decode(hm, output["wh"], output["reg"], ltrb=True, K=self.K)
                id_feature = ref.gather_at(id_feature, inds).cpu().numpy()
            else:
                dets = ref.ctdet_decode(hm, output["wh"], output["reg"], K=self.K)
            dets = dets.detach().cpu().numpy()
        results = []
        for i in range(dets.shape[0]):
            per_class = ref.ctdet_post_process(dets[i:i + 1].copy(), [c[i]], [s[i]], h, w, self.num_classes)[0]
            for j in range(1, self.num_classes + 1):
                per_class[j] = np.array(per_class[j], dtype=np.float32).reshape(-1, 5)
            merged = ref.merge_outputs([per_class], self.num_classes)
            if self.kind == "fairmot":
                kept = merged[1][:, 4] > 0.4
                results.append((merged[1][kept], id_feature[i][kept[:len(id_feature[i])]]))
            else:
                results.append(merged)
        return results


class DlaFastPipeline:
    """dla_fast.Detector's three stages."""

    def __init__(self, detector: "dla_fast.Detector"):
        self.detector = detector
        self.previous: Optional[torch.Tensor] = None

    def preprocess(self, frames):
        return self.detector.preprocess(frames)

    def network(self, inputs):
        batch, geometries = inputs
        if self.detector.kind == "centertrack":
            pre = self.previous if self.previous is not None else batch
            pre_hm = torch.rand(batch.shape[0], 1, *batch.shape[2:], device=batch.device)
            output = self.detector.network(batch, pre, pre_hm)
            self.previous = batch
            return output, geometries
        return self.detector.network(batch), geometries

    def decode(self, inputs):
        return self.detector.decode(*inputs)


def time_stages(pipeline, frames, device: torch.device, warmup: int, iters: int) -> Dict[str, List[float]]:
    """Per stage, the milliseconds of each timed call (the device synchronized after every stage)."""
    samples = {stage: [] for stage in STAGES}
    for step in range(warmup + iters):
        data = frames
        for stage in STAGES:
            begin = time.perf_counter()
            data = getattr(pipeline, stage)(data)
            _synchronize(device)
            if step >= warmup:
                samples[stage].append((time.perf_counter() - begin) * 1e3)
    return samples


def run(args: argparse.Namespace) -> int:
    if args.train:
        raise UsageError("--end-to-end times inference; drop --train")
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA GPU is available here")
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    batches = (args.batch,) if args.batch else defaults["batches"]
    size = args.size or defaults["size"]
    if size % 32:
        raise UsageError(f"--size {size}: DLA needs image sides divisible by 32")
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    iters = defaults["iters"] if args.iters is None else args.iters
    kind = _kind(args)
    image_size = _parse_size(args.image_size) if args.image_size else IMAGE_SIZES[kind]
    if kind == "fairmot" and min(image_size) < size:
        raise UsageError(f"--image-size {image_size[0]}x{image_size[1]}: FairMOT's letterbox downscales; frames "
                         f"must be at least --size {size} on each side")
    amp = AUTOCAST[args.dtype]
    if args.json:
        from .bench import check_output_path  # (bench imports this module)
        check_output_path(args.json, "--json")

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    out_side = size // 4
    K = min(500 if kind == "fairmot" else 100, out_side * out_side)
    try:
        import cv2  # noqa: F401  (the peers' pipeline)
    except ImportError:
        raise UsageError("--end-to-end: the peers' pipeline needs OpenCV: pip install opencv-python-headless") from None
    model = _build_model(args, kind)
    eager = copy.deepcopy(model).to(device)
    graphed = device.type == "cuda" and kind != "centertrack"
    with dla_fast.use_backend(args.backend):
        detector = dla_fast.Detector(copy.deepcopy(model).to(device), kind=kind, input_size=(size, size), K=K,
                                     accelerate=True, cuda_graph=graphed, amp_dtype=amp)
        pipelines = {
            "peers_eager": PeersPipeline(eager, kind, size, K, autocast, device),
            "dla_fast_network": PeersPipeline(detector.model, kind, size, K, autocast, device),
            "dla_fast": DlaFastPipeline(detector),
        }
        print(f"dla_fast bench --end-to-end: {args.model} ({kind}) on {device} [{device_name(device)}], {args.dtype}, "
              f"input {size}x{size}, frames {image_size[0]}x{image_size[1]} uint8, K {K}")
        rng = np.random.default_rng(0)
        rows, records = [], []
        for batch in batches:
            frames = [rng.integers(0, 256, (*image_size, 3), dtype=np.uint8) for _ in range(batch)]
            baseline = None
            for name, pipeline in pipelines.items():
                samples = time_stages(pipeline, frames, device, warmup, iters)
                stage_ms = {stage: float(np.median(samples[stage])) for stage in STAGES}
                total = float(np.median([sum(v) for v in zip(*samples.values())]))
                fps = batch / (total / 1e3)
                baseline = baseline or fps
                rows.append([name, batch, f"{total:.2f}", f"{fps:.1f}", f"{fps / baseline:.2f}x"]
                            + [f"{stage_ms[s]:.2f} ({100 * stage_ms[s] / total:.0f}%)" for s in STAGES])
                records.append(dict(pipeline=name, model=args.model, kind=kind, batch=batch, input_size=size,
                                    image_size=list(image_size), dtype=args.dtype, device=device_name(device),
                                    ms_p50=total, frames_per_s=fps, stage_ms_p50=stage_ms, warmup=warmup,
                                    iters=iters, torch=torch.__version__))
    headers = ["pipeline", "batch", "ms p50", "frames/s", "vs peers"] + [f"{s} ms (share)" for s in STAGES]
    print(markdown_table(headers, rows, right_align=[False] + [True] * 7))
    print(f"ms p50: median of {iters} timed batches after {warmup} warm-up, wall clock, the device synchronized "
          "after each stage (the shares add up to the total); frames/s = batch / ms p50")
    print("peers_eager: OpenCV pre-processing per image on the host, eager network, the peers' decode and host "
          "post-processing; dla_fast_network: the same around dla_fast's accelerated network"
          + (" replayed from a CUDA graph" if graphed else "")
          + "; dla_fast: dla_fast.Detector (one pre-processing kernel per batch, fused decoding)")
    if device.type == "cpu":
        print("note: on the CPU dla_fast runs its eager twins (the kernels need a GPU): these numbers show the "
              "pipeline works, not its speed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {len(records)} record(s) to {args.json}")
    return 0
