"""A bits budget: each tensor's group size and outlier budget, for a target bits/weight.

Data-free and per tensor: every candidate layout (:data:`GROUPS` x :data:`FRACTIONS`, the
outliers chosen by the error-driven "budget" selector, everything else as configured) is
tried on :data:`SAMPLE_ROWS` evenly spaced rows of the tensor; its squared weight error there,
scaled to all rows, estimates the tensor's error, and its exact stored size follows from the
layout (:func:`eqcore.layout.stored_bytes`, an upper bound when the selector keeps fewer
outliers than its budget). The budget then goes greedily, across all tensors, to the step of
largest error reduction per stored bit along each tensor's lower convex hull of (bits, error)
(the greedy solution of the convex relaxation of the multiple-choice knapsack). Every tensor
starts at its smallest layout; the result never exceeds the target, which is an error when
even the smallest layouts exceed it.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from .config import QuantConfig
from .layout import stored_bytes
from .outliers import removal_losses, take_budget

GROUPS = (None, 256, 128, 64, 32)
FRACTIONS = (0.0, 0.001, 0.0025, 0.005, 0.01)
SAMPLE_ROWS = 128


class Option(NamedTuple):
    config: QuantConfig
    nbytes: int      # stored bytes of the whole tensor (an upper bound)
    error: float     # estimated sum of squared weight errors of the whole tensor


def candidates(config: QuantConfig) -> list[QuantConfig]:
    """The layouts the budget chooses among: every group size and outlier fraction."""
    return [config.replace(group_size=g, outliers="budget", outlier_fraction=f) for g in GROUPS for f in FRACTIONS]


def sample_rows(rows: int, n: int = SAMPLE_ROWS) -> np.ndarray:
    """``n`` evenly spaced row indices (all rows when there are fewer)."""
    return np.unique(np.linspace(0, rows - 1, min(rows, n)).round().astype(np.int64))


def options(w, config: QuantConfig, *, backend: str = "auto", rows=None) -> list[Option]:
    """Every candidate layout (:func:`candidates`) of a weight with its stored bytes and estimated
    error. ``w``: the tensor's sampled rows; ``rows``: the tensor's row count (default: ``w``'s).
    The removal losses of the budget selector are measured once per group size."""
    from . import backends
    from .api import check_weight, dequantize, quantize_masked, row_losses

    x = check_weight(np.asarray(w))
    n_rows = x.shape[0] if rows is None else int(rows)
    name = backends.select(backend, x)
    ref = x.astype(np.float64)
    out = []
    for g in GROUPS:
        base = config.replace(group_size=g, outliers="budget")
        removal = removal_losses(x, row_losses(base, name, x.dtype))
        for f in FRACTIONS:
            cfg = base.replace(outlier_fraction=f)
            qt = quantize_masked(x, cfg, take_budget(x, *removal, int(round(f * x.size))), backend=name)
            err = float(((np.asarray(dequantize(qt, np.float32, backend=name), dtype=np.float64) - ref) ** 2).sum())
            nnz = min(int(round(f * n_rows * x.shape[1])), removal[0].shape[1] * n_rows)
            size = stored_bytes((n_rows, x.shape[1]), cfg.bits, g, nnz=nnz, weight_itemsize=x.dtype.itemsize,
                                grid=cfg.grid, scale_dtype=cfg.scale_dtype, col_scales=cfg.col_scales)
            out.append(Option(cfg, size, err * n_rows / x.shape[0]))
    return out


def hull(opts: list[Option]) -> list[Option]:
    """The lower convex hull of (nbytes, error), by increasing size: the options worth buying."""
    pts = []
    for o in sorted(opts, key=lambda o: (o.nbytes, o.error)):
        if pts and o.error >= pts[-1].error:
            continue  # no cheaper-or-equal option may be better
        while len(pts) >= 2 and _cross(pts[-2], pts[-1], o) <= 0:
            pts.pop()
        pts.append(o)
    return pts


def _cross(a: Option, b: Option, c: Option) -> float:
    return (b.nbytes - a.nbytes) * (c.error - a.error) - (b.error - a.error) * (c.nbytes - a.nbytes)


def allocate(tensors: Mapping[str, list[Option]], numel: Mapping[str, int], bits_per_weight: float) -> dict[str, Option]:
    """The option of each tensor: greedy on error saved per stored bit, total <= the target."""
    hulls = {name: hull(opts) for name, opts in tensors.items()}
    limit = bits_per_weight * sum(numel[n] for n in tensors) / 8.0
    pick = {name: 0 for name in hulls}
    total = sum(h[0].nbytes for h in hulls.values())
    if total > limit:
        least = 8.0 * total / sum(numel[n] for n in tensors)
        raise ValueError(f"bits_per_weight {bits_per_weight:g} is below the smallest layout at these settings "
                         f"({least:.4f} bits/weight)")

    def step(name):
        h, i = hulls[name], pick[name]
        if i + 1 >= len(h):
            return None
        return -(h[i].error - h[i + 1].error) / (h[i + 1].nbytes - h[i].nbytes), name

    heap = [s for s in map(step, hulls) if s is not None]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], pick[name]
        extra = h[i + 1].nbytes - h[i].nbytes
        if total + extra > limit:
            continue  # this tensor's next step does not fit; cheaper steps of others may
        total += extra
        pick[name] = i + 1
        s = step(name)
        if s is not None:
            heapq.heappush(heap, s)
    return {name: hulls[name][i] for name, i in pick.items()}


def plan(weights: Mapping[str, object], bits_per_weight: float, config: QuantConfig | None = None, *,
         backend: str = "auto", progress: Callable[[str], None] | None = None) -> dict[str, QuantConfig]:
    """The configuration of each weight for ``bits_per_weight`` over all of them (see the module).
    ``weights``: name -> 2-D array (a memory map is read only at the sampled rows)."""
    config = config or QuantConfig()
    if not (isinstance(bits_per_weight, (int, float)) and not isinstance(bits_per_weight, bool)
            and np.isfinite(bits_per_weight) and bits_per_weight > 0):
        raise ValueError(f"bits_per_weight must be a positive number, got {bits_per_weight!r}")
    found, numel = {}, {}
    for name, w in weights.items():
        shape = tuple(w.shape)
        sample = np.asarray(w[sample_rows(shape[0])])
        found[name] = options(sample, config, backend=backend, rows=shape[0])
        numel[name] = shape[0] * shape[1]
        if progress:
            progress(name)
    if not found:
        return {}
    return {name: o.config for name, o in allocate(found, numel, bits_per_weight).items()}
