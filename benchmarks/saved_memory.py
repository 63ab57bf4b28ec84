"""Saved-activation bytes of one training forward: eager vs accelerate() [memory_efficient=True] [conv="triton"].

    TRITON_INTERPRET=1 python benchmarks/saved_memory.py --model dla34 --size 224 --batch 2
    TRITON_INTERPRET=1 python benchmarks/saved_memory.py --model centernet_dla34 --size 512 --batch 1 --skip-kernels

Counts autograd's saved tensors of one forward in training mode (dla_fast.cli.memory.SavedBytes: each storage
once, parameters and buffers excluded), fp32, backend triton (on CPU through Triton's interpreter), channels_last
for the accelerated models. What is saved depends on shapes and on which ops run, not on values: --skip-kernels
makes every Triton launch a no-op (the interpreter's InterpretedFunction.run), so the fused ops allocate and save
exactly what they would while their outputs stay uninitialized — the interpreter at 512² takes hours otherwise.
The eager convs still run. Prints one line per mode and the ratios to eager; --check runs a small size both ways
first and fails if the byte counts differ.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import dla_fast  # noqa: E402
from dla_fast.cli.memory import saved_activation_bytes  # noqa: E402

# mode -> accelerate()'s keyword arguments (None: the eager model)
MODES = {"eager": None, "accelerate": {}, "accelerate(memory_efficient=True)": dict(memory_efficient=True),
         "accelerate(conv='triton')": dict(conv="triton"),
         "accelerate(memory_efficient=True, conv='triton')": dict(memory_efficient=True, conv="triton")}


def _model_kwargs(name: str) -> dict:
    if name.startswith("centernet"):
        return dict(heads={"hm": 80, "wh": 2, "reg": 2}, head_conv=256, dcn=True)
    return {}


@contextlib.contextmanager
def _kernels_skipped(skip: bool):
    if not skip:
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction
    original = InterpretedFunction.run
    InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        InterpretedFunction.run = original


def measure(name: str, size: int, batch: int, skip_kernels: bool) -> dict:
    """{mode: saved bytes} for one fresh model of `name`."""
    torch.manual_seed(0)
    base = dla_fast.create_model(name, **_model_kwargs(name)).train()
    x = torch.randn(batch, 3, size, size)
    result = {}
    for mode, options in MODES.items():
        model, inp = copy.deepcopy(base), x
        if options is not None:
            dla_fast.accelerate(model, **options)
            inp = x.contiguous(memory_format=torch.channels_last)
        with dla_fast.use_backend("triton" if mode != "eager" else "torch"), _kernels_skipped(skip_kernels):
            result[mode] = saved_activation_bytes(model, inp)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dla34")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--check", action="store_true",
                        help="first compare --skip-kernels with real kernels at 64x64, batch 2")
    args = parser.parse_args()
    if args.check:
        real, skipped = measure(args.model, 64, 2, False), measure(args.model, 64, 2, True)
        assert real == skipped, (real, skipped)
        print(f"check: 64x64 batch 2, kernels run and skipped save the same bytes: {real}")
    result = measure(args.model, args.size, args.batch, args.skip_kernels)
    print(f"{args.model} {args.size}x{args.size} batch {args.batch} fp32, backend triton"
          f"{' (kernels skipped)' if args.skip_kernels else ''}; torch {torch.__version__}")
    for mode, saved in result.items():
        print(f"  {mode:50s} {saved / 2**20:9.2f} MiB  {saved / result['eager']:.3f}x eager")


if __name__ == "__main__":
    main()
