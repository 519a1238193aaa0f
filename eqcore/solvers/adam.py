"""EasyQuant's scale search, the NumPy reference: Adam on each scale with the paper's gradient.

For each group (see :mod:`eqcore.solvers.objective` for L and dL/ds):

    s0 = max|x| / qmax   (1.0 if the group is all zero)

Adam runs on the relative scale u = s / s0 against the normalised loss L / (n * s0^2), so
``lr`` means the same for weights of any magnitude. Every step evaluates L at the current
s = min(float32(u * s0), smax) and the best scale seen (s0 included, at step 1) is returned,
never the last. ``smax`` (:func:`eqcore.layout.max_scale`) keeps qmax * s within the weight
dtype's finite range; it only binds for weights within a few grid steps of that range.
"""
from __future__ import annotations

import numpy as np

from ..layout import max_scale
from .objective import group_view, initial_scales, loss_and_grad


def optimize_scales(x: np.ndarray, config, smax=None) -> np.ndarray:
    """Best scales (rows, n_groups) float32 for float32 ``x`` with outliers zeroed, each at most
    ``smax`` (default: :func:`eqcore.layout.max_scale` of float32)."""
    rows = x.shape[0]
    xg, n, n_groups = group_view(np.asarray(x, dtype=np.float32), config.group_size)
    qmin, qmax = config.qmin, config.qmax
    smax = max_scale(np.float32, qmax) if smax is None else np.float32(smax)
    s0 = initial_scales(np.abs(xg).max(axis=1), qmax)
    best_s = np.minimum(s0.astype(np.float32), smax)
    if config.steps == 0:
        return best_s.reshape(rows, n_groups)
    b1, b2 = config.betas
    u = np.ones_like(s0)
    m = np.zeros_like(s0)
    v = np.zeros_like(s0)
    best_loss = np.full_like(s0, np.inf)
    for t in range(1, config.steps + 1):
        with np.errstate(over="ignore"):  # u * s0 past float32's range: capped at smax
            s = np.minimum((u * s0).astype(np.float32), smax)
        loss, grad = loss_and_grad(xg, s, qmin, qmax)
        better = loss < best_loss
        best_loss = np.where(better, loss, best_loss)
        best_s = np.where(better, s, best_s)
        g = grad / (n * s0)
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * g * g
        mhat = m / (1.0 - b1 ** t)
        vhat = v / (1.0 - b2 ** t)
        u = np.maximum(u - config.lr * mhat / (np.sqrt(vhat) + config.eps), 1e-3)
    return best_s.reshape(rows, n_groups)
