"""Numba-CUDA Adam on scales: one launch, one thread block per (row, group).

Same algorithm as :func:`eqcore.solvers.adam.optimize_scales`, with the scalar
maths of :mod:`eqcore.solvers.rowmath` compiled unchanged as device functions. Each block
copies its group into dynamic shared memory once (groups longer than
``_MAX_SHARED_FLOATS`` are re-read from global memory every step instead) and runs
all steps on chip. Per step every thread accumulates float64 loss and gradient over
its elements (i = tid, tid + B, ...); a butterfly warp reduction (``shfl_xor``) plus
one shared-memory exchange between warps gives every thread bitwise-identical
totals, so every thread runs ``adam_step`` and tracks the best scale itself: no
broadcast, one ``syncthreads`` per step (none for one-warp blocks).

Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which has no warp shuffles,
``shfl_xor`` is emulated with a per-warp Python barrier; everything else is the same code.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda
from numba.cuda import float32, float64
from numba.cuda.core import config as _numba_cuda_config

from ..layout import group_layout, max_scale
from . import rowmath
from .cuda_common import check_input, compile_ptx, configured, jit_kernel, output_for

SIMULATOR = bool(_numba_cuda_config.ENABLE_CUDASIM)
_FULL = 0xFFFFFFFF
_MAX_WARPS = 32  # 1024 threads at most
_RED_SIZE = 4 * _MAX_WARPS  # [parity][loss | grad][warp]
_MAX_SHARED_FLOATS = 11_776  # 46 KiB of dynamic shared memory (48 KiB default limit)
_MAX_THREADS = 256
SIGNATURE = (
    "void(float32[:, ::1], float32[:, ::1], int64, int64, int64, int64, int64,"
    " float64, float64, float64, float64, float32)"
)

_quant_code = cuda.jit(device=True)(rowmath.quant_code)
_initial_scale = cuda.jit(device=True)(rowmath.initial_scale)
_adam_step = cuda.jit(device=True)(rowmath.adam_step)


if SIMULATOR:
    import threading

    _SIM_WARPS: dict = {}
    _SIM_LOCK = threading.Lock()

    def _shfl_xor(mask, value, lane_mask):
        """Simulator stand-in for ``cuda.shfl_xor_sync``: a per-warp barrier exchange."""
        tid = cuda.threadIdx.x
        key = (cuda.blockIdx.x, tid // 32)
        with _SIM_LOCK:
            barrier, buf = _SIM_WARPS.setdefault(key, (threading.Barrier(32, timeout=60), [None] * 32))
        buf[tid % 32] = value
        barrier.wait()
        out = buf[(tid % 32) ^ lane_mask]
        barrier.wait()
        return out

else:
    _shfl_xor = cuda.shfl_xor_sync


@cuda.jit(device=True)
def _warp_sum(a):
    """Butterfly sum over a warp; every lane ends with the identical total."""
    off = 16
    while off > 0:
        a += _shfl_xor(_FULL, a, off)
        off //= 2
    return a


@cuda.jit(device=True)
def _warp_max(a):
    off = 16
    while off > 0:
        a = max(a, _shfl_xor(_FULL, a, off))
        off //= 2
    return a


def _make_kernel(in_shared: bool):
    """Python kernel; ``in_shared`` picks shared-memory or global-memory group data."""

    def kernel(x, out, g, n_groups, qmin, qmax, steps, lr, beta1, beta2, eps, smax):
        blk = cuda.blockIdx.x
        row = blk // n_groups
        grp = blk - row * n_groups
        start = grp * g
        n = min(g, x.shape[1] - start)
        tid = cuda.threadIdx.x
        nthreads = cuda.blockDim.x
        nwarps = nthreads // 32
        lane = tid % 32
        warp = tid // 32
        xs = cuda.shared.array(0, float32)
        red_max = cuda.shared.array(_MAX_WARPS, float32)
        red = cuda.shared.array(_RED_SIZE, float64)

        # Load (thread-private mapping: no barrier needed before reuse) and max|x|.
        amax = float32(0.0)
        for i in range(tid, n, nthreads):
            v = x[row, start + i]
            if in_shared:
                xs[i] = v
            amax = max(amax, abs(v))
        amax = _warp_max(amax)
        if nwarps > 1:
            if lane == 0:
                red_max[warp] = amax
            cuda.syncthreads()
            for w in range(nwarps):
                amax = max(amax, red_max[w])
        s0 = _initial_scale(float64(amax), qmax)

        best_s = min(float32(s0), smax)
        best_loss = math.inf
        u = 1.0
        m = 0.0
        v2 = 0.0
        nf = float64(n)
        mine = (n - tid + nthreads - 1) // nthreads  # my element count, tid + k * nthreads
        for t in range(1, steps + 1):
            s = min(float32(u * s0), smax)
            s64 = float64(s)
            loss = 0.0
            grad = 0.0
            for k in range(mine):
                i = tid + k * nthreads
                xv = xs[i] if in_shared else x[row, start + i]
                q = _quant_code(xv, s, qmin, qmax)
                e = s64 * q - float64(xv)
                loss += e * e
                grad += e * q
            loss = _warp_sum(loss)
            grad = _warp_sum(grad)
            if nwarps > 1:
                base = (t % 2) * 2 * _MAX_WARPS  # double buffer: one barrier per step
                if lane == 0:
                    red[base + warp] = loss
                    red[base + _MAX_WARPS + warp] = grad
                cuda.syncthreads()
                loss = 0.0
                grad = 0.0
                for w in range(nwarps):
                    loss += red[base + w]
                    grad += red[base + _MAX_WARPS + w]
            if loss < best_loss:
                best_loss = loss
                best_s = s
            gnorm = (2.0 * grad) / (nf * s0)
            u, m, v2 = _adam_step(u, m, v2, gnorm, float64(t), lr, beta1, beta2, eps)
        if tid == 0:
            out[row, grp] = best_s

    kernel.__name__ = "adam_scales_shared" if in_shared else "adam_scales_global"
    return kernel


_PY_KERNELS = {True: _make_kernel(True), False: _make_kernel(False)}
_KERNELS: dict = {}


def _kernel(in_shared: bool):
    """Compiled kernel (eagerly for :data:`SIGNATURE` on a GPU, so it is the tested PTX)."""
    if in_shared not in _KERNELS:
        if SIMULATOR:
            _KERNELS[in_shared] = cuda.jit(_PY_KERNELS[in_shared])
        else:
            _KERNELS[in_shared] = jit_kernel(_PY_KERNELS[in_shared], SIGNATURE)
    return _KERNELS[in_shared]


def launch_config(g: int) -> tuple[int, bool]:
    """(threads per block, group kept in shared memory) for group length ``g``."""
    threads = 32
    while threads < _MAX_THREADS and threads * 4 < g:
        threads *= 2
    return threads, g <= _MAX_SHARED_FLOATS


def compile_ptx_for(cc: tuple[int, int], in_shared: bool = True) -> str:
    """PTX of the kernel for compute capability ``cc``, no GPU needed."""
    return compile_ptx(_PY_KERNELS[in_shared], SIGNATURE, cc)


def optimize_scales(x, config, smax=None):
    """Best float32 scales (rows, n_groups) on the GPU; see the module docstring.

    ``x``: float32 C-contiguous (rows, cols) with outliers zeroed, either a device
    array (CuPy or any ``__cuda_array_interface__`` object; the result is a CuPy
    array for CuPy input, else a Numba device array) or a NumPy array (result is
    NumPy; this is also how the CUDA simulator is driven).
    """
    x, iface, (rows, cols) = check_input(x)
    g, n_groups = group_layout(cols, config.group_size)
    threads, in_shared = launch_config(g)
    shared_bytes = 4 * g if in_shared else 0
    b1, b2 = config.betas
    smax = max_scale(np.float32, config.qmax) if smax is None else np.float32(smax)
    args = (g, n_groups, config.qmin, config.qmax, config.steps,
            float(config.lr), float(b1), float(b2), float(config.eps), smax)

    if SIMULATOR:
        _SIM_WARPS.clear()
    if iface is None:
        out = np.empty((rows, n_groups), np.float32)
        if out.size:
            d_x = cuda.to_device(np.ascontiguousarray(x))
            d_out = cuda.device_array((rows, n_groups), np.float32)
            configured(_kernel(in_shared), rows * n_groups, threads, 0, shared_bytes)(d_x, d_out, *args)
            d_out.copy_to_host(out)
        return out

    out, stream = output_for(x, (rows, n_groups))
    if rows * n_groups:
        configured(_kernel(in_shared), rows * n_groups, threads, stream, shared_bytes)(x, out, *args)
    return out
