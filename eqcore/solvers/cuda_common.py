"""What the Numba-CUDA solvers share: IEEE compilation (no FMA contraction), PTX without a GPU,
and the handling of their inputs and outputs (CuPy, any CUDA array, or NumPy for the simulator)."""
from __future__ import annotations

import contextlib

import numpy as np
from numba import cuda

if not hasattr(np, "row_stack"):
    # numba-cuda (0.30) registers an overload of np.row_stack when it first compiles; NumPy 2.5
    # removed that name (an alias of vstack since 1.0), which made every CUDA compile fail
    np.row_stack = np.vstack


@contextlib.contextmanager
def no_fma_contraction():
    """Compile with NVVM ``-fma=0``.

    NVVM contracts ``a * b + c`` into an FMA by default, even without fastmath, which
    rounds differently from the reference (loss sums, Adam moments). Numba-CUDA has no
    switch for it, so wrap the NVVM entry point its code library calls.
    """
    from numba.cuda.cudadrv import nvvm

    plain = nvvm.compile_ir

    def compile_ir(llvmir, **options):
        options.setdefault("fma", False)
        return plain(llvmir, **options)

    nvvm.compile_ir = compile_ir
    try:
        yield
    finally:
        nvvm.compile_ir = plain


def compile_ptx(pyfunc, signature, cc: tuple[int, int]) -> str:
    """PTX of ``pyfunc`` for compute capability ``cc`` (no GPU needed), FMA contraction off."""
    from numba.cuda import dispatcher

    class _Device:
        compute_capability = tuple(cc)

    saved = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: _Device()
    try:
        with no_fma_contraction():
            ptx, _ = cuda.compile_ptx(pyfunc, signature, cc=tuple(cc))
    finally:
        dispatcher.get_current_device = saved
    return ptx


def check_input(x):
    """(x, its __cuda_array_interface__ or None, (rows, cols)) for a 2-D C-contiguous float32 ``x``:
    a device array (CuPy or any CUDA array) or a NumPy array (the simulator's way in)."""
    iface = getattr(x, "__cuda_array_interface__", None)
    if iface is None:
        x = np.asarray(x)
    shape = tuple(iface["shape"]) if iface is not None else x.shape
    dtype = np.dtype(iface["typestr"]) if iface is not None else x.dtype
    if len(shape) != 2 or dtype != np.float32:
        raise ValueError(f"x must be a 2-D float32 matrix, got shape {shape} dtype {dtype}")
    if iface is not None and iface.get("strides") not in (None, (shape[1] * 4, 4)):
        raise ValueError("x must be C-contiguous")
    return x, iface, shape


def output_for(x, shape):
    """(an empty float32 device array of ``shape``, the stream to launch on) matching ``x``:
    CuPy in, CuPy out (on CuPy's current stream); else a Numba device array."""
    if type(x).__module__.startswith("cupy"):
        import cupy

        ptr = cupy.cuda.get_current_stream().ptr
        return cupy.empty(shape, cupy.float32), (cuda.external_stream(ptr) if ptr else cuda.default_stream())
    return cuda.device_array(shape, np.float32), cuda.default_stream()
