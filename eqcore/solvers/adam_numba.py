"""EasyQuant's Adam on scales compiled with Numba, parallel over (row, group).

Same algorithm as :func:`eqcore.solvers.adam.optimize_scales`, step for step, with the
scalar maths of :mod:`eqcore.solvers.rowmath`; only the order of each group's float64 loss
and gradient sums differs (vectorised), so scales agree with the reference to rounding.
"""
from __future__ import annotations

import math

import numpy as np
from numba import get_num_threads, njit, prange

from ..backends.numba import quant_code
from ..layout import group_layout, max_scale
from . import rowmath

initial_scale = njit(rowmath.initial_scale)
adam_step = njit(rowmath.adam_step)
CALL_WORK = 1 << 28  # weight-steps per kernel call (~0.1-0.3 s), so that Ctrl-C is never long held


# reassoc lets LLVM vectorise the float64 sums; quant_code is compiled apart, without it
@njit(fastmath={"reassoc"})
def loss_grad(x, start, n, s, qmin, qmax):
    """(L, sum(err * q)) of group ``x[start:start+n]`` at float32 scale ``s``, in float64."""
    xs = x[start:start + n]
    sd = np.float64(s)
    loss = 0.0
    grad = 0.0
    for i in range(n):
        xi = xs[i]
        q = np.float64(quant_code(xi, s, qmin, qmax))
        err = sd * q - np.float64(xi)
        loss += err * err
        grad += err * q
    return loss, grad


@njit
def group_adam(x, start, n, qmin, qmax, steps, lr, beta1, beta2, eps, smax):
    """Best scale (float32) of one group: the per-group body of the reference."""
    absmax = np.float32(0.0)
    for i in range(n):
        a = abs(x[start + i])
        if a > absmax:
            absmax = a
    s0 = initial_scale(np.float64(absmax), np.float64(qmax))
    best_s = min(np.float32(s0), smax)
    if steps == 0:
        return best_s
    nf = np.float64(n)
    u = 1.0
    m = 0.0
    v = 0.0
    best_loss = math.inf
    for t in range(1, steps + 1):
        s = min(np.float32(u * s0), smax)
        loss, grad = loss_grad(x, start, n, s, qmin, qmax)
        if loss < best_loss:
            best_loss = loss
            best_s = s
        g = 2.0 * grad / (nf * s0)
        u, m, v = adam_step(u, m, v, g, np.float64(t), lr, beta1, beta2, eps)
    return best_s


@njit(parallel=True, cache=True)
def _optimize_kernel(flat, rows, cols, g, n_groups, qmin, qmax, steps, lr, beta1, beta2, eps, smax, out):
    for k in prange(rows * n_groups):
        r = k // n_groups
        lo = (k - r * n_groups) * g
        n = min(g, cols - lo)
        out[k] = group_adam(flat, r * cols + lo, n, qmin, qmax, steps, lr, beta1, beta2, eps, smax)


def optimize_scales(x: np.ndarray, config, smax=None) -> np.ndarray:
    """Best scales (rows, n_groups) float32; see :func:`eqcore.solvers.adam.optimize_scales`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    g, n_groups = group_layout(cols, config.group_size)
    out = np.empty(rows * n_groups, dtype=np.float32)
    b1, b2 = config.betas
    smax = max_scale(np.float32, config.qmax) if smax is None else np.float32(smax)
    block = max(4 * get_num_threads(), CALL_WORK // max(1, cols * config.steps))
    for r in range(0, rows, block):  # each group is solved alone: the blocks change no result
        part = x[r:r + block]
        _optimize_kernel(part.reshape(-1), part.shape[0], cols, g, n_groups, np.float32(config.qmin),
                         np.float32(config.qmax), int(config.steps), float(config.lr), float(b1), float(b2),
                         float(config.eps), smax, out[r * n_groups:(r + part.shape[0]) * n_groups])
    return out.reshape(rows, n_groups)
