"""Build script for dla_fast.

The pure-Python package (eager models, Triton kernels) installs everywhere. Install torch first and use
`--no-build-isolation`, so the build sees that torch and does not fetch a second one.

The compiled extension `dla_fast._C` (csrc/: C++ CPU kernels, CUDA kernels, ops registered with the torch
dispatcher as torch.ops.dla_fast_C.*) is built with torch.utils.cpp_extension (ninja) when a CUDA GPU is
visible and nvcc is found, or always with DLA_FAST_FORCE_CUDA=1; never otherwise, and torch is imported only
to decide that. Environment:

    DLA_FAST_FORCE_CUDA   1: build the extension, failing if nvcc is unusable; 0: never build it;
                          unset: build it when torch sees a CUDA GPU and nvcc is found.
    CUDA_HOME             the CUDA toolkit; when unset, /usr/local/cuda if it has bin/nvcc (an nvcc wrapper
                          elsewhere on PATH would make torch guess a wrong CUDA_HOME).
    TORCH_CUDA_ARCH_LIST  GPU architectures to compile for; default "8.0;9.0" (A100, H100).
    MAX_JOBS              parallel compile jobs; default: CPU count, at most one job per 4 GiB of memory.
"""
import glob
import os
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
FORCE_CUDA_ENV = "DLA_FAST_FORCE_CUDA"
DEFAULT_CUDA_HOME = "/usr/local/cuda"
DEFAULT_ARCH_LIST = "8.0;9.0"
GIB_PER_COMPILE_JOB = 4  # nvcc on a .cu file including the ATen headers peaks at a few GiB
# triton only where PyPI ships it (Linux x86_64 / aarch64)
TRITON_REQUIREMENT = 'triton; platform_system == "Linux" and (platform_machine == "x86_64" or platform_machine == "aarch64")'


def read_version():
    with open(os.path.join(ROOT, "dla_fast", "version.py")) as f:
        scope = {}
        exec(f.read(), scope)
        return scope["__version__"]


def build_mode():
    """'force', 'off' or 'auto', from DLA_FAST_FORCE_CUDA."""
    value = os.environ.get(FORCE_CUDA_ENV, "").strip()
    if value == "":
        return "auto"
    if value in ("0", "1"):
        return "force" if value == "1" else "off"
    raise SystemExit(f"{FORCE_CUDA_ENV}={value!r}: use 1 (build the CUDA extension), 0 (never build it) or unset")


def note(message):
    print(f"dla_fast setup: {message}", file=sys.stderr)


def memory_gib():
    """Physical memory, or the cgroup limit when lower (containers)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total / 2**30


def default_max_jobs():
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, int(memory_gib() // GIB_PER_COMPILE_JOB)))


def nvcc_problem(cuda_home):
    """Why nvcc under cuda_home cannot compile (None: it can)."""
    if not cuda_home:
        return (f"no CUDA toolkit found: set CUDA_HOME (no nvcc at {DEFAULT_CUDA_HOME}/bin/nvcc, and torch "
                "found none either)")
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        return f"CUDA_HOME={cuda_home} has no bin/nvcc"
    try:
        subprocess.run([nvcc, "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{nvcc} --version failed: {e}"
    return None


def extension_build():
    """(ext_modules, cmdclass) for dla_fast._C, or ([], {}) when it is not to be built."""
    mode = build_mode()
    if mode == "off":
        return [], {}
    try:
        import torch
    except ImportError:
        if mode == "force":
            raise SystemExit(f"{FORCE_CUDA_ENV}=1 needs torch installed first (and pip --no-build-isolation)")
        return [], {}
    if mode == "auto" and not torch.cuda.is_available():
        return [], {}

    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: settle it first.
    if not os.environ.get("CUDA_HOME") and os.path.isfile(os.path.join(DEFAULT_CUDA_HOME, "bin", "nvcc")):
        os.environ["CUDA_HOME"] = DEFAULT_CUDA_HOME
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build"
    else:
        problem = nvcc_problem(cpp_extension.CUDA_HOME)
    if problem is not None:
        if mode == "force":
            raise SystemExit(f"{FORCE_CUDA_ENV}=1 but the CUDA extension cannot be built: {problem}")
        note(f"skipping the CUDA extension dla_fast._C: {problem}")
        return [], {}

    sources = [os.path.relpath(path, ROOT)
               for pattern in ("*.cpp", "*.cu")
               for path in sorted(glob.glob(os.path.join(ROOT, "csrc", pattern)))]
    note(f"building dla_fast._C from {len(sources)} sources with CUDA_HOME={cpp_extension.CUDA_HOME}, "
         f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ['MAX_JOBS']}")
    extension = cpp_extension.CUDAExtension(
        name="dla_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            # -g0 overrides the -g of Python's CFLAGS: a third less compile time, objects 20x smaller.
            "cxx": ["-O3", "-g0", "-fopenmp", "-DWITH_CUDA"],
            "nvcc": ["-O3", "-DWITH_CUDA"],
        },
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

ext_modules, cmdclass = extension_build()

setup(
    name="dla_fast",
    version=read_version(),
    description="Fast, exact Deep Layer Aggregation (DLA) networks: reference models and fused Triton/CUDA kernels",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dla_fast", "dla_fast.*"]),
    python_requires=">=3.10",
    # triton only where PyPI ships it (Linux x86_64 / aarch64); elsewhere dla_fast runs its eager paths and
    # `python -m dla_fast info` says what is missing. torchvision (the deformable conv of CenterNet / CenterTrack
    # with dcn=True) is an extra, so that pip never swaps the installed torch for the one torchvision pins.
    install_requires=["torch>=2.11", TRITON_REQUIREMENT, "numpy", "tqdm"],
    extras_require={
        "dcn": ["torchvision"],
        "test": ["pytest", "pytest-xdist", "timm>=1.0", "torchvision", "safetensors", "onnx", "onnxscript",
                 "onnxruntime", "opencv-python-headless"],
        "build": ["ninja", "pybind11"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["dla-fast=dla_fast.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
