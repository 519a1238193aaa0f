"""The exact scale solver on the GPU with Numba CUDA: one thread per (row, group).

The body is :mod:`eqcore.solvers.exact_sweep`, the very code the CPU path compiles (here with
``cuda.jit(device=True)``, the contract code of :mod:`eqcore.solvers.rowmath` and libdevice's
``nextafterf``), so the result equals the CPU's and the reference's. Each thread gets its rows
of a global workspace; groups are launched in batches that keep the workspace under
:data:`WORKSPACE_BYTES`. Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the float32
neighbours come from NumPy instead of libdevice.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, float32
from numba.cuda.core import config as _numba_cuda_config

from ..layout import group_layout, max_scale
from . import rowmath
from .cuda_common import check_input, compile_ptx, configured, jit_kernel, output_for
from .exact_sweep import BLOCKS, make_group_exact, rounding_bounds

SIMULATOR = bool(_numba_cuda_config.ENABLE_CUDASIM)
WORKSPACE_BYTES = 1 << 28  # per launch
BOUNDS = rounding_bounds()

_quant_code = cuda.jit(device=True)(rowmath.quant_code)


@cuda.jit(device=True)
def _code(a, s, top):
    return _quant_code(a, s, float32(0.0), top)


if SIMULATOR:
    def _up(f):
        return np.nextafter(np.float32(f), np.float32(np.inf))

    def _down(f):
        return np.nextafter(np.float32(f), np.float32(0.0))

    def _view(source, target):
        return lambda v: source(v).view(target)

    _bits, _from_bits = _view(np.float32, np.int32), _view(np.int32, np.float32)
    _bits64, _from_bits64 = _view(np.float64, np.int64), _view(np.int64, np.float64)
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _up(f):
        return libdevice.nextafterf(f, float32(np.inf))

    @cuda.jit(device=True)
    def _down(f):
        return libdevice.nextafterf(f, float32(0.0))

    def _view(cast):
        """A device function calling libdevice's bit cast ``cast``."""
        @cuda.jit(device=True)
        def view(v):
            return cast(v)
        return view

    _bits, _from_bits = _view(libdevice.float_as_int), _view(libdevice.int_as_float)
    _bits64, _from_bits64 = _view(libdevice.double_as_longlong), _view(libdevice.longlong_as_double)

_device = cuda.jit(device=True)
group_exact = make_group_exact(_device, _device, _code, _up, _down, _bits, _from_bits, _bits64, _from_bits64)


def kernel(x, out, first, count, rows, cols, g, n_groups, qmax, smax,
           wa, wtop, wcu, wcw, wd, wt, wk, wb, st, sk, wc, wA, wB, bounds, ks, kq):
    """Thread j solves group first + j (row-major over (row, group)) with workspace row j."""
    j = cuda.grid(1)
    if j >= count:
        return
    k = first + j
    r = k // n_groups
    lo = (k - r * n_groups) * g
    n = min(g, cols - lo)
    out[r, k - r * n_groups] = group_exact(x, r * cols + lo, n, qmax, smax, wa[j], wtop[j], wcu[j], wcw[j],
                                           wd[j], wt[j], wk[j], wb[j], st[j], sk[j], wc[j], wA[j], wB[j], bounds,
                                           ks[j], kq[j])


SIGNATURE = ("void(float32[::1], float32[:, ::1], int64, int64, int64, int64, int64, int64, float32, float32, "
             "float32[:, ::1], float32[:, ::1], int32[:, ::1], int32[:, ::1], float32[:, :, ::1], float32[:, ::1], "
             "int32[:, ::1], int32[:, ::1], float32[:, ::1], int32[:, ::1], int32[:, ::1], float64[:, ::1], "
             "float64[:, ::1], float64[::1], float32[:, ::1], float64[:, ::1])")
_KERNEL = []


def _compiled():
    if not _KERNEL:
        if SIMULATOR:
            _KERNEL.append(cuda.jit(kernel))
        else:
            _KERNEL.append(jit_kernel(kernel, SIGNATURE))
    return _KERNEL[0]


def compile_ptx_for(cc: tuple[int, int]) -> str:
    """PTX of the kernel for compute capability ``cc``, no GPU needed."""
    return compile_ptx(kernel, SIGNATURE, cc)


def workspace(batch: int, g: int, cap: int, xp):
    """The workspace arrays of ``batch`` threads for groups of ``g`` (``xp``: numpy or a device module)."""
    e = xp.empty
    return (e((batch, g), np.float32), e((batch, g), np.float32), e((batch, g), np.int32), e((batch, g), np.int32),
            e((batch, 3, g + 1), np.float32),
            e((batch, cap + 1), np.float32), e((batch, cap + BLOCKS), np.int32), e((batch, cap + 1), np.int32),
            e((batch, cap + 1), np.float32), e((batch, cap + 1), np.int32), e((batch, 2 * cap + 1), np.int32),
            e((batch, cap + 1), np.float64), e((batch, cap + 1), np.float64))


def optimize_scales(x, config, smax=None, cap=None):
    """Exact float32 scales (rows, n_groups) on the GPU; see :mod:`eqcore.solvers.exact`.

    ``x`` as for :func:`eqcore.solvers.adam_cuda.optimize_scales` (CuPy in, CuPy out; NumPy in,
    NumPy out through the simulator). ``cap``: thresholds per workspace (default 2 * group).
    """
    x, iface, (rows, cols) = check_input(x)
    g, n_groups = group_layout(cols, config.group_size)
    smax = max_scale(np.float32, config.qmax) if smax is None else np.float32(smax)
    cap = 2 * g + 64 if cap is None else max(1, int(cap))
    total = rows * n_groups
    per_thread = 24 * g + 40 * (cap + 1) + 24
    batch = max(1, min(total, WORKSPACE_BYTES // per_thread))
    host = iface is None
    if host:
        d_x = cuda.to_device(np.ascontiguousarray(x).reshape(-1))
        out = cuda.device_array((rows, n_groups), np.float32)
        stream = cuda.default_stream()
    else:
        d_x = x.reshape(-1) if hasattr(x, "reshape") else x
        out, stream = output_for(x, (rows, n_groups))
    xp = _device_module(x)
    ws = workspace(batch, g, cap, xp)
    bounds = xp.asarray(BOUNDS) if xp is not np else cuda.to_device(BOUNDS)
    if xp is np:
        ws = tuple(cuda.to_device(a) for a in ws)
    ks = cuda.device_array((batch, 1), np.float32) if xp is np else xp.empty((batch, 1), np.float32)
    kq = cuda.device_array((batch, 1), np.float64) if xp is np else xp.empty((batch, 1), np.float64)
    threads = 64
    for first in range(0, total, batch):
        count = min(batch, total - first)
        configured(_compiled(), -(-count // threads), threads, stream)(
            d_x, out, first, count, rows, cols, g, n_groups, np.float32(config.qmax), smax, *ws, bounds, ks, kq)
    return out.copy_to_host() if host else out


def _device_module(x):
    """CuPy for CuPy input, else NumPy (the workspace then goes through numba.cuda.to_device)."""
    if type(x).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np
