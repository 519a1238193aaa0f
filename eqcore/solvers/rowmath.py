"""Scalar maths of the scale search, shared by the compiled solvers.

Plain Python functions on scalars, each self-contained (no calls between them), compiled
unchanged with ``numba.njit`` (:mod:`eqcore.solvers.adam_numba`) and with
``numba.cuda.jit(device=True)`` (:mod:`eqcore.solvers.adam_cuda`). The NumPy reference
(:mod:`eqcore.solvers.adam`) states the same maths vectorised; tests check they agree.
"""
import math


def quant_code(x, s, qmin, qmax):
    """clamp(rint(x / s), qmin, qmax) as a float, rounding half to even.

    ``x`` and ``s`` must be float32 so that ``x / s`` is the IEEE float32 quotient,
    identical to NumPy's. Clamping first keeps the rounding exact in float64.
    """
    y = x / s
    if y <= qmin:
        return float(qmin)
    if y >= qmax:
        return float(qmax)
    f = float(math.floor(y))
    d = y - f
    if d > 0.5 or (d == 0.5 and f - 2.0 * math.floor(f * 0.5) != 0.0):  # tie: to even
        return f + 1.0
    return f


def initial_scale(absmax, qmax):
    """Max-abs scale s0 = absmax / qmax; 1.0 for a row with nothing to quantize."""
    s0 = absmax / qmax
    if not (s0 > 0.0) or math.isinf(s0):
        return 1.0
    return s0


def adam_step(u, m, v, g, t, lr, beta1, beta2, eps):
    """One Adam update of the relative scale u (s = u * s0) at step t >= 1.

    g is the gradient of the normalised loss L / (n * s0**2) with respect to u.
    Returns the new (u, m, v); u is kept >= 1e-3 so the scale stays positive.
    """
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    mhat = m / (1.0 - beta1 ** t)
    vhat = v / (1.0 - beta2 ** t)
    u = u - lr * mhat / (math.sqrt(vhat) + eps)
    if u < 1e-3:
        u = 1e-3
    return u, m, v
