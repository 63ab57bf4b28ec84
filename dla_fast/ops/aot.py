"""Ahead-of-time compile of the Triton kernels for Hopper (sm_90), no GPU needed.

Every ops module that launches Triton kernels lists, in `kernel_configurations()`, each (kernel, constexprs,
dtype signature, num_warps, num_stages) its launchers can pick, derived from the launchers' own tile/launch
choice functions. `compile_sm90(config)` compiles one with `triton.compile(..., target=GPUTarget("cuda", 90,
32))` and reads the cubin with the cuobjdump shipped in Triton's package: registers per thread, spill traffic
(LOCAL) and stack (STACK) bytes, and whether the SASS holds wgmma (HGMMA) instructions. tests/test_aot_sm90.py
compiles them in CI (failing on compile errors, spills, and 16-bit GEMM tiles without HGMMA); run

    python -m dla_fast.ops.aot [--all] [--jobs N] [--filter TEXT]

for the table (default: the CI selection, `ci_selection`; --all: every configuration). Compile in a process
without TRITON_INTERPRET=1: under the interpreter `triton.jit` gives interpreted functions, which do not compile.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence

TARGET_ARCH = 90
WARP_SIZE = 32


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    name: str                      # test id, e.g. "aggregate_fwd_kernel[bf16,BLOCK_M=128,...]"
    kernel: object                 # the @triton.jit function
    signature: dict                # arg name -> Triton type string ("*bf16", "*fp32", "i32", "fp32", "constexpr")
    constexprs: dict               # constexpr arg name -> value
    num_warps: int = 4
    num_stages: int = 3
    needs_wgmma: bool = False      # True for 16-bit tl.dot GEMM tiles (must show HGMMA in SASS on sm_90)
    # Arguments the JIT sees divisible by 16 for the models' shapes (pointers 16-byte aligned; integers such as
    # channel counts and row strides, multiples of 16 in every DLA / CenterNet layer): compiled with that
    # specialization (tt.divisibility = 16), as `@triton.jit` specializes at launch. Other shapes (odd channel
    # counts) run the generic variant, which is correct but may use more registers.
    aligned: tuple = ()


@dataclasses.dataclass(frozen=True)
class CompiledInfo:
    name: str
    registers: int                 # per thread
    spill_bytes: int               # LOCAL: per-thread local memory (register spills)
    stack_bytes: int               # STACK: per-thread stack frame (spills, dynamic arrays)
    shared_bytes: int
    has_hgmma: bool                # wgmma tensor-core instructions in the SASS
    seconds: float                 # compile + cuobjdump time

    @property
    def spills(self) -> bool:
        return self.spill_bytes > 0 or self.stack_bytes > 0


def make_config(kernel, args: Dict[str, str], constexprs: Dict[str, object], num_warps: int = 4,
                num_stages: int = 3, needs_wgmma: bool = False, label: str = "",
                aligned: Sequence[str] = ()) -> KernelConfig:
    """A KernelConfig for `kernel`: `args` gives the Triton type of each runtime argument (all of them), the
    constexprs their values; the signature is put in the kernel's parameter order (checked complete)."""
    fn = getattr(kernel, "fn", kernel)
    params = list(fn.__code__.co_varnames[:fn.__code__.co_argcount])
    types = dict(args, **{k: "constexpr" for k in constexprs})
    missing, extra = set(params) - set(types), set(types) - set(params)
    if missing or extra:
        raise ValueError(f"{fn.__name__}: signature misses {sorted(missing)}, has unknown {sorted(extra)}")
    flags = ",".join(f"{k}={v}" for k, v in constexprs.items())
    name = f"{fn.__name__}[{label + ',' if label else ''}{flags},w{num_warps},s{num_stages}]"
    unknown = set(aligned) - set(args)
    if unknown:
        raise ValueError(f"{fn.__name__}: aligned names unknown arguments {sorted(unknown)}")
    return KernelConfig(name, kernel, {p: types[p] for p in params}, dict(constexprs), num_warps, num_stages,
                        needs_wgmma, tuple(p for p in params if p in set(aligned)))


def triton_type(dtype) -> str:
    """Triton's name of a torch dtype: torch.bfloat16 -> 'bf16'."""
    import torch
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
            torch.int32: "i32"}[dtype]


def all_configurations() -> List[KernelConfig]:
    """kernel_configurations() of every dla_fast.ops submodule (packages included), in module order."""
    from dla_fast import ops
    configs: List[KernelConfig] = []
    for info in pkgutil.iter_modules(ops.__path__):
        if info.name.startswith("_") or info.name == "aot":
            continue
        module = importlib.import_module(f"dla_fast.ops.{info.name}")
        if hasattr(module, "kernel_configurations"):
            configs += module.kernel_configurations()
    return configs


def _compile_key(config: KernelConfig) -> tuple:
    fn = getattr(config.kernel, "fn", config.kernel)
    return (fn.__module__, fn.__name__, tuple(config.signature.items()), tuple(sorted(config.constexprs.items())),
            config.num_warps, config.num_stages, config.aligned)


def deduplicate(configs: Iterable[KernelConfig]) -> List[KernelConfig]:
    """Drop configurations that compile to the same kernel (same function, signature, constexprs, options)."""
    seen, out = set(), []
    for config in configs:
        key = _compile_key(config)
        if key not in seen:
            seen.add(key)
            out.append(config)
    return out


def _tile_key(config: KernelConfig) -> tuple:
    fn = getattr(config.kernel, "fn", config.kernel)
    tiles = tuple(sorted((k, v) for k, v in config.constexprs.items() if k.startswith("BLOCK")))
    return fn.__name__, tiles, config.num_warps, config.num_stages


def _pointer_types(config: KernelConfig) -> tuple:
    return tuple(sorted({t for t in config.signature.values() if t.startswith("*")}))


def _weight(config: KernelConfig) -> tuple:
    """How much code a configuration enables: more true flags, more children / larger non-tile constants."""
    flags = sum(1 for v in config.constexprs.values() if v is True)
    sizes = sum(v for k, v in config.constexprs.items()
                if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("BLOCK"))
    return flags, sizes


def ci_selection(configs: Sequence[KernelConfig]) -> List[KernelConfig]:
    """A covering subset small enough for CI: per kernel, every tile shape (BLOCK_* constexprs, num_warps,
    num_stages) with its heaviest flags (the most code, the highest register pressure; the pointer dtypes
    rotated across tiles) — for the GEMM kernels (those with wgmma configurations) every tile shape, for the
    others the shapes with the most elements per tile — then every value of every constexpr (tile sizes
    included) and every pointer-dtype set at least once (see _features).
    All configurations: `python -m dla_fast.ops.aot --all`."""
    configs = deduplicate(configs)
    chosen: Dict[tuple, KernelConfig] = {}
    dtype_use: Counter = Counter()
    by_tile: Dict[tuple, List[KernelConfig]] = {}
    gemm_kernels = {_tile_key(c)[0] for c in configs if c.needs_wgmma}
    largest: Dict[str, int] = {}
    for config in configs:
        largest[_tile_key(config)[0]] = max(largest.get(_tile_key(config)[0], 0), _tile_elements(config))
    for config in configs:
        kernel = _tile_key(config)[0]
        if kernel in gemm_kernels or _tile_elements(config) == largest[kernel]:
            by_tile.setdefault(_tile_key(config), []).append(config)
    for key, group in by_tile.items():
        heaviest = max(_weight(c) for c in group)
        candidates = [c for c in group if _weight(c) == heaviest]
        pick = min(candidates, key=lambda c: dtype_use[(key[0], _pointer_types(c))])
        dtype_use[(key[0], _pointer_types(pick))] += 1
        chosen[_compile_key(pick)] = pick
    covered = set()
    for config in chosen.values():
        covered |= _features(config)
    missing = set().union(*(_features(c) for c in configs)) - covered
    while missing:  # greedy set cover: the configuration adding the most missing features, heaviest first
        best = max(configs, key=lambda c: (len(_features(c) & missing), _weight(c)))
        chosen.setdefault(_compile_key(best), best)
        missing -= _features(best)
    order = {_compile_key(c): i for i, c in enumerate(configs)}
    return sorted(chosen.values(), key=lambda c: order[_compile_key(c)])


def _features(config: KernelConfig) -> set:
    """What ci_selection must cover once per kernel: its pointer-dtype sets and the values of its non-tile
    constexprs. Counts named NUM_* (NUM_CHILDREN: a static loop over pointer slots, fewer is a prefix of the
    same code) are covered by their largest value, which the heaviest configurations have."""
    fn = getattr(config.kernel, "fn", config.kernel)
    features = {(fn.__name__, "pointers", _pointer_types(config))}
    features |= {(fn.__name__, k, v) for k, v in config.constexprs.items() if not k.startswith("NUM_")}
    return features


def _tile_elements(config: KernelConfig) -> int:
    """Elements of one tile: the product of the BLOCK_* constexprs."""
    product = 1
    for k, v in config.constexprs.items():
        if k.startswith("BLOCK") and isinstance(v, int):
            product *= v
    return product


def cuobjdump() -> str:
    """The cuobjdump shipped in Triton's package (no CUDA toolkit needed)."""
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def compile_sm90(config: KernelConfig) -> CompiledInfo:
    """Compile `config` for sm_90 and read its resource usage and SASS (raises on a compile error)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_sm90 needs a process without TRITON_INTERPRET=1 (kernels are interpreted "
                           "functions there); run python -m dla_fast.ops.aot")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    params = list(config.signature)
    attrs = {(params.index(name),): [["tt.divisibility", 16]] for name in config.aligned}
    source = ASTSource(fn=config.kernel, signature=config.signature, constexprs=config.constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", TARGET_ARCH, WARP_SIZE),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([cuobjdump(), "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    match = _USAGE.search(usage)
    if match is None:
        raise RuntimeError(f"{config.name}: no resource usage in cuobjdump's output:\n{usage}")
    registers, stack, shared, local = map(int, match.groups())
    return CompiledInfo(config.name, registers, local, stack, shared, "HGMMA" in sass,
                        time.perf_counter() - start)


def _compile_or_error(config: KernelConfig):
    try:
        return compile_sm90(config)
    except Exception as e:  # reported per configuration by the caller
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"


def compile_all(configs: Sequence[KernelConfig], jobs: int = 1) -> List[object]:
    """compile_sm90 of each configuration (CompiledInfo, or the error text), in `jobs` processes (fork)."""
    if jobs <= 1:
        return [_compile_or_error(c) for c in configs]
    import multiprocessing
    global _POOL_CONFIGS
    _POOL_CONFIGS = list(configs)
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_index, range(len(configs)), chunksize=1)


_POOL_CONFIGS: List[KernelConfig] = []


def _compile_index(i: int):
    return _compile_or_error(_POOL_CONFIGS[i])


def problems(config: KernelConfig, result) -> List[str]:
    """What is wrong with one compiled configuration ([] when nothing)."""
    if isinstance(result, str):
        return [f"does not compile for sm_90: {result}"]
    found = []
    if result.spills:
        found.append(f"spills: LOCAL {result.spill_bytes} B, STACK {result.stack_bytes} B per thread "
                     f"({result.registers} registers)")
    if config.needs_wgmma and not result.has_hgmma:
        found.append("a 16-bit GEMM tile without HGMMA (wgmma) in its SASS")
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every configuration, not the CI selection")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--filter", default="", help="only configurations whose name contains this text")
    parser.add_argument("--json", help="also write the results here (a list of records)")
    args = parser.parse_args(argv)
    configs = all_configurations()
    total = len(deduplicate(configs))
    configs = deduplicate(configs) if args.all else ci_selection(configs)
    configs = [c for c in configs if args.filter in c.name]
    start = time.perf_counter()
    results = compile_all(configs, args.jobs)
    print(f"{len(configs)} of {total} configurations, sm_{TARGET_ARCH}, {time.perf_counter() - start:.1f} s")
    print(f"{'configuration':<150} {'regs':>4} {'local':>5} {'stack':>5} {'hgmma':>5}  problems")
    failed = 0
    for config, result in zip(configs, results):
        found = problems(config, result)
        failed += bool(found)
        if isinstance(result, str):
            print(f"{config.name:<150} {'-':>4} {'-':>5} {'-':>5} {'-':>5}  {'; '.join(found)}")
        else:
            print(f"{config.name:<150} {result.registers:>4} {result.spill_bytes:>5} {result.stack_bytes:>5} "
                  f"{'yes' if result.has_hgmma else 'no':>5}  {'; '.join(found)}")
    print(f"{failed} with problems")
    if args.json:
        records = [dict(dataclasses.asdict(r) if not isinstance(r, str) else dict(error=r), name=c.name,
                        needs_wgmma=c.needs_wgmma, problems=problems(c, r))
                   for c, r in zip(configs, results)]
        with open(args.json, "w") as f:
            json.dump(dict(total=total, selected=len(configs), records=records), f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
