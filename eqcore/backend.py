"""Backend choice: "numpy" (reference), "numba" (fast CPU) or "cupy" (GPU), from the input array."""
from __future__ import annotations

BACKENDS = ("auto", "numpy", "numba", "cupy")


def is_cupy(a) -> bool:
    return type(a).__module__.startswith("cupy")


def array_module(a):
    """``cupy`` for CuPy arrays, else ``numpy`` (like ``cupy.get_array_module``)."""
    if is_cupy(a):
        import cupy

        return cupy
    import numpy

    return numpy


def gpu_available() -> bool:
    """True when CuPy is installed and sees a CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device
        return False


def preferred(backend: str) -> str:
    """For data read from disk: "auto" means the GPU when there is one, else Numba."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "cupy" if gpu_available() else "numba"
    if backend == "cupy" and not gpu_available():
        raise ValueError("backend 'cupy' needs CuPy and a CUDA device; none was found (use 'auto' or 'numba')")
    return backend


def select(backend: str, *arrays) -> str:
    """Resolve ``backend`` for the given arrays; "auto" follows where the data lives."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_gpu = any(is_cupy(a) for a in arrays)
    if backend == "auto":
        return "cupy" if on_gpu else "numba"
    if on_gpu != (backend == "cupy"):
        where = "CuPy (GPU)" if on_gpu else "NumPy (CPU)"
        raise ValueError(f"backend {backend!r} cannot run on {where} arrays; move the data or use backend='auto'")
    return backend
