"""`triton` and `triton.language` for the ops modules, or stand-ins when Triton is not installed.

    from ._triton import triton, tl

With Triton installed these are the real modules. Without it (a machine without Triton wheels) the stand-ins
let a module define its @triton.jit kernels (the launchers' host arithmetic is dla_fast.ops.common's), so models,
checkpoints and backend 'torch' keep working; launching a kernel raises dla_fast.BackendUnavailable naming the
missing package (backend 'triton' already refuses to resolve then: dla_fast.backend reports "triton is not
importable").
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    TRITON_IMPORT_ERROR = None
except ImportError as _error:  # the stand-ins below
    TRITON_IMPORT_ERROR = _error

    def _missing(what: str):
        from ..backend import BackendUnavailable
        raise BackendUnavailable(f"{what} needs the package 'triton', which is not importable "
                                 f"({TRITON_IMPORT_ERROR}); install triton or use dla_fast backend 'torch'")

    class _Kernel:
        """A @triton.jit function without Triton: defined, never launchable."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")
            self.__doc__ = getattr(fn, "__doc__", None)

        def __getitem__(self, grid):
            _missing(f"the Triton kernel {self.__name__}")

        def __call__(self, *args, **kwargs):
            _missing(f"the Triton kernel {self.__name__}")

    class _Language:
        """triton.language without Triton: `tl.constexpr(v)` is v; other names are placeholders (kernel bodies
        and annotations refer to them, but never run)."""

        @staticmethod
        def constexpr(value=None):
            return value

        def __getattr__(self, name):
            return _Placeholder(f"triton.language.{name}")

    class _Placeholder:
        def __init__(self, name: str):
            self._name = name

        def __repr__(self) -> str:
            return f"<{self._name}: triton is not installed>"

        def __call__(self, *args, **kwargs):
            _missing(self._name)

    class _Triton:
        """`triton` without Triton: `jit` and `language`; anything else is a placeholder."""

        language = _Language()

        @staticmethod
        def jit(fn=None, **options):
            if fn is None:
                return _Kernel
            return _Kernel(fn)

        def __getattr__(self, name):
            return _Placeholder(f"triton.{name}")

    triton = _Triton()
    tl = triton.language

__all__ = ["TRITON_IMPORT_ERROR", "tl", "triton"]
