"""Which implementation runs the fused ops: eager PyTorch, Triton kernels, or the CUDA extension.

The choice comes from `set_backend(name)` / `use_backend(name)`, else the environment variable
`DLA_FAST_BACKEND`, else `auto`:

- `torch`:  the eager reference of every op (plain PyTorch, any device).
- `triton`: the Triton kernels. CUDA tensors, or CPU tensors when `TRITON_INTERPRET=1` was set before
  dla_fast imported its kernels (how CI runs them without a GPU).
- `cuda`:   the hand-written kernels of the extension `dla_fast._C` for the memory-bound steps; the
  GEMM-shaped parts (the aggregation node's 1x1 conv) stay in Triton.
- `auto`:   fused kernels for CUDA tensors, the eager path for CPU tensors and for dtypes the kernels do
  not take (fp64; explicit `triton` / `cuda` refuse those with BackendUnavailable). Without the package
  `triton` every op runs eager under `auto`, with one RuntimeWarning saying so.

Asking for a backend that cannot run on the tensors at hand raises `BackendUnavailable`; nothing falls
back silently.

While a model is exported to a portable format — `torch.onnx.export` (the dynamo-based and the TorchScript-based
exporter) or `torch.jit.trace` — every op runs its eager reference whatever the backend (`exporting_portable`):
the exported graph then holds standard operators only (conv, BatchNorm, add, ReLU, transposed conv,
torchvision's deformable conv -> ONNX DeformConv), which onnxruntime, TensorRT and TorchScript run.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "DLA_FAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (no Triton, no GPU, extension not built, ...)."""


_state = threading.local()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown dla_fast backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name.lower()


def _env_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto")
    try:
        return _check_name(value)
    except ValueError as e:
        raise ValueError(f"environment variable {ENV_VAR}={value!r}: {e}") from None


def get_backend() -> str:
    """The backend name in force: the innermost `use_backend`, else `set_backend`, else the environment."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    chosen = getattr(_state, "chosen", None)
    return chosen if chosen is not None else _env_backend()


def set_backend(name: str | None) -> None:
    """Set the backend for this thread; `None` goes back to the environment variable (default `auto`)."""
    _state.chosen = None if name is None else _check_name(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed code with backend `name`."""
    name = _check_name(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels are interpreted on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    """Why `import triton` fails here (None: it imports); looked up once per process."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # dla_fast.ops then uses stand-ins (dla_fast/ops/_triton.py)
        return f"triton is not importable ({e})"
    return None


def _triton_reason(device: torch.device | None) -> str | None:
    error = _triton_import_error()
    if error is not None:
        return error
    if device is None:
        if torch.cuda.is_available() or triton_interpreter_enabled():
            return None
        return "no CUDA GPU, and TRITON_INTERPRET=1 is not set"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreter_enabled():
        return None
    return f"Triton kernels need CUDA tensors (got {device.type}); on CPU set TRITON_INTERPRET=1 before importing dla_fast"


_EXTENSION_STATUS: list = []


def extension_status() -> tuple[bool, str]:
    """(built, detail) for the compiled extension dla_fast._C (looked up once per process)."""
    if not _EXTENSION_STATUS:
        try:
            from dla_fast import _C
        except ImportError as e:
            _EXTENSION_STATUS.append((False, f"not built ({e})", False))
        else:
            has_cuda = bool(getattr(_C, "has_cuda", lambda: False)())
            _EXTENSION_STATUS.append((True, "built with CUDA kernels" if has_cuda else "built (CPU kernels only)",
                                      has_cuda))
    built, detail, _ = _EXTENSION_STATUS[0]
    return built, detail


def _cuda_reason(device: torch.device | None) -> str | None:
    built, detail = extension_status()
    if not built:
        return f"the extension dla_fast._C is {detail}"
    has_cuda = _EXTENSION_STATUS[0][2]
    if device is None:
        return None
    if device.type == "cuda":
        return None if has_cuda else "dla_fast._C was built without CUDA kernels"
    if device.type == "cpu":
        return None
    return f"the extension has no kernels for {device.type} tensors"


def unavailable_reason(name: str, device: torch.device | None = None) -> str | None:
    """Why backend `name` cannot run on `device` (None: it can). `device=None` asks about this machine."""
    name = _check_name(name)
    if name in ("torch", "auto"):
        return None
    if name == "triton":
        return _triton_reason(device)
    return _cuda_reason(device)


def require_traced(impl: str, device: torch.device, op: str) -> None:
    """BackendUnavailable unless backend `impl` ('triton' or 'cuda'), which a traced graph (torch.compile,
    torch.export, a saved ExportedProgram) passed to op `op` as chosen while tracing, can run on `device` here:
    a program exported where the extension was built and loaded where it is not, or exported with the Triton
    interpreter and run without it, says so instead of failing inside a kernel launch."""
    reason = unavailable_reason(impl, device)
    if reason is not None:
        raise BackendUnavailable(
            f"dla_fast op {op!r} was traced with backend {impl!r} (torch.compile and torch.export choose the backend "
            f"while tracing and keep it in the graph), which cannot run here: {reason}. Export again on this "
            "machine, or under dla_fast.use_backend() naming a backend it can run")


def available_backends() -> dict[str, str | None]:
    """Each backend name mapped to None (usable on this machine) or the reason it is not."""
    return {name: unavailable_reason(name) for name in BACKENDS}


# The dtypes the fused kernels take (accumulating in fp32); others (fp64) run the eager reference under `auto`.
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _warn_eager_without_triton() -> None:
    """Once per process: `auto` runs the eager reference on CUDA tensors because Triton is missing."""
    warnings.warn(f"dla_fast backend 'auto' runs every op as eager PyTorch: {_triton_import_error()}; the fused "
                  "kernels (Triton, and the extension, whose GEMM and statistics steps are Triton kernels) need "
                  "the package 'triton'", RuntimeWarning, stacklevel=3)


def exporting_portable() -> bool:
    """Whether a portable export is being traced: torch.onnx.export (either exporter) or torch.jit.trace. The
    fused kernels are not ONNX or TorchScript operators, so every op then runs its eager reference. Cheap on
    the eager path (one C call): the TorchScript-based exporter traces with torch.jit's tracer, and the
    dynamo-based one through torch.export, where torch.compiler.is_compiling() is true."""
    if torch._C._is_tracing():
        return True
    return torch.compiler.is_compiling() and torch.onnx.is_in_onnx_export()


@torch.compiler.assume_constant_result
def resolve(device: torch.device, op: str = "", dtype: torch.dtype | None = None) -> str:
    """The concrete implementation ('torch', 'triton' or 'cuda') to run `op` on tensors of `device` and `dtype`.

    `auto` picks the fused kernels for CUDA tensors of a dtype they take (FUSED_DTYPES; per op, from
    `AUTO_CHOICE`) and eager for the rest (CPU tensors, fp64; every tensor when Triton is not importable, with
    one RuntimeWarning per process). An explicit backend that cannot run (not
    available here, or a dtype its kernels do not take) raises BackendUnavailable naming the reason. Under
    torch.compile the answer is taken once, while tracing, and kept by the compiled graph. While exporting to
    ONNX or tracing with torch.jit (`exporting_portable`): 'torch', whatever the backend.
    """
    if exporting_portable():
        return "torch"
    name = get_backend()
    fused_dtype = dtype is None or dtype in FUSED_DTYPES
    if name == "auto":
        if device.type != "cuda" or not fused_dtype:
            return "torch"
        if _triton_import_error() is not None:  # every fused path needs Triton (the extension's too)
            _warn_eager_without_triton()
            return "torch"
        choice = AUTO_CHOICE.get(op, "triton")
        if choice == "cuda" and unavailable_reason("cuda", device) is not None:
            choice = "triton"
        return choice
    reason = unavailable_reason(name, device)
    if reason is None and name != "torch" and not fused_dtype:
        reason = (f"its kernels take {', '.join(str(t) for t in FUSED_DTYPES)} tensors, not {dtype} (backends "
                  "'auto' and 'torch' run the eager reference for it)")
    if reason is not None:
        where = f" for op {op!r}" if op else ""
        raise BackendUnavailable(f"dla_fast backend {name!r} cannot run{where}: {reason}")
    return name


# What `auto` runs per op on CUDA tensors (when the extension is built; Triton otherwise), from the H100
# measurements in benchmarks/results/nvidia-h100-80gb-hbm3/ (benchmarks/NOTES.md, "Backend choice"): the
# extension's kernels were faster for BN+ReLU (geometric-mean speedup 1.36x over Triton, 14 of 18 cases) and
# the upsample-merge (1.10x, 9 of 16). Ops not listed use Triton (the aggregation node: a tie, 1.00x).
# "batchnorm_act_training" is the residual blocks' and conv-BN-ReLU stacks' unfolded path (training, or gradients
# wanted: cuDNN conv + fused BatchNorm [+ residual] + ReLU, dla_fast.nn.folded): `auto` keeps the eager modules
# ("torch") there, because the only recorded measurement (H100, benchmarks/NOTES.md) had the fused BN + ReLU
# training forward + backward at 0.4-1.0x eager and the reworked kernels are not yet measured on a GPU; switch it
# to "cuda"/"triton" once a recorded measurement shows the fused path faster. Backend 'triton'/'cuda' forces it.
AUTO_CHOICE: dict[str, str] = {"batchnorm_act": "cuda", "upsample_merge": "cuda", "batchnorm_act_training": "torch"}
