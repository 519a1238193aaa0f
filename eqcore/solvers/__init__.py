"""Scale solvers: for float32 weights ``x`` (outliers zeroed) find one float32 scale per row or
group. A registry {solver: {backend: "module:function"}}; every function has the signature

    optimize_scales(x, config, smax=None) -> scales (rows, n_groups) float32

with ``x`` and the result on the backend's arrays (NumPy for "numpy" and "numba", CuPy for
"cupy") and every scale <= ``smax`` (:func:`eqcore.layout.max_scale`). Modules are imported
only when used, so registering a GPU solver costs nothing on the CPU. To add a solver: write
its functions and add one entry here; :class:`eqcore.QuantConfig` accepts its name.
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
}


def get(name: str, backend: str):
    """The function of solver ``name`` for ``backend``; ValueError if there is none."""
    try:
        target = SOLVERS[name][backend]
    except KeyError:
        raise ValueError(f"solver {name!r} has no {backend!r} implementation "
                         f"(available: {sorted(SOLVERS.get(name, {}))})") from None
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)
