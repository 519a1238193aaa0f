"""Scale solvers: for float32 weights ``x`` (outliers zeroed) find each row's or group's grid
parameters. A registry {solver: {backend: "module:function"}} and the grids each solver handles
(:data:`GRIDS`); every function has the signature

    solve(x, config, smax=None, codebook=None, col=None, keep=None) -> (scales, zeros)

scales (rows, n_groups) float32 <= ``smax`` (:func:`eqcore.layout.max_scale`), zeros the
asymmetric grid's zero-points (else None), ``codebook`` the codebook grid's levels, ``col``
(cols,) float32 column scales or None (the grid is then fitted to x / col), ``keep`` a bool
mask, False at the outliers (which dequantization overwrites) or None. A symmetric-only solver
may instead provide ``optimize_scales(x, config, smax) -> scales``; it is given x / col (on the
symmetric grid a zeroed outlier costs nothing, so it needs no mask). Arrays
are the backend's (NumPy for "numpy" and "numba", CuPy for "cupy"). Modules are imported only
when used, so registering a GPU solver costs nothing on the CPU. To add a solver: write its
functions and add one entry here; :class:`eqcore.QuantConfig` accepts its name.
"""
from __future__ import annotations

import importlib

SOLVERS = {
    "adam": {
        "numpy": "eqcore.solvers.adam:optimize_scales",          # the reference (the paper's Adam)
        "numba": "eqcore.solvers.adam_numba:optimize_scales",
        "cupy": "eqcore.solvers.adam_cuda:optimize_scales",
    },
    "exact": {
        "numpy": "eqcore.solvers.exact:optimize_scales",          # the reference: a full sweep
        "numba": "eqcore.solvers.exact_numba:optimize_scales",
        "cupy": "eqcore.solvers.exact_cuda:optimize_scales",
    },
    "lloyd": {  # one array-generic implementation (NumPy or CuPy), and Numba for the CPU
        "numpy": "eqcore.solvers.lloyd:solve",
        "numba": "eqcore.solvers.lloyd_numba:solve",
        "cupy": "eqcore.solvers.lloyd:solve",
    },
}
GRIDS = {"adam": ("symmetric",), "exact": ("symmetric",), "lloyd": ("symmetric", "asymmetric", "codebook")}
DEFAULT = {"symmetric": "exact", "asymmetric": "lloyd", "codebook": "lloyd"}  # when config.solver is None


def get(name: str, backend: str):
    """The function of solver ``name`` for ``backend``; ValueError if there is none."""
    try:
        target = SOLVERS[name][backend]
    except KeyError:
        raise ValueError(f"solver {name!r} has no {backend!r} implementation "
                         f"(available: {sorted(SOLVERS.get(name, {}))})") from None
    module, _, fn = target.partition(":")
    f = getattr(importlib.import_module(module), fn)
    if fn != "optimize_scales":
        return f

    def solve(x, config, smax=None, codebook=None, col=None, keep=None):  # scales-only: symmetric, on x / col
        return f(x if col is None else x / col, config, smax), None

    return solve
