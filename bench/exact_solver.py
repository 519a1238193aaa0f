"""The exact scale solver against Adam-500 and Lloyd, side by side on LLaMA-7B-shaped matrices (Numba, CPU).

    python bench/exact_solver.py [--bits 4 3] [--dtype float32] [--quick]   # writes bench/results/exact_solver.md

Weights: Student-t (df 5) * 0.02, seeded, rounded to ``--dtype`` (float32: every magnitude distinct;
bfloat16: a third of a 4096-wide row's, which the exact solver sweeps once each), outliers at 3
sigma zeroed as quantize() does. For each
shape and setting: wall time of each solver (best of --repeat, after a warm-up call that compiles
them), the total reconstruction loss of each, and on how many rows (groups) exact <= Adam; then
Lloyd's iteration (``solver="lloyd"``), its time and its loss above the exact one.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numba  # noqa: E402
import numpy as np  # noqa: E402

from eqcore.config import QuantConfig  # noqa: E402
from eqcore.dtypes import weight_dtype  # noqa: E402
from eqcore.machine import cpu_name  # noqa: E402
from eqcore.outliers import find_outliers  # noqa: E402
from eqcore.solvers import adam_numba, exact_numba, lloyd_numba  # noqa: E402
from eqcore.solvers.objective import group_view, loss_and_grad  # noqa: E402
from bench.timing import best_time, write_report  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def group_losses(x, s, cfg):
    xg, _, _ = group_view(x, cfg.group_size)
    return loss_and_grad(xg, s.reshape(-1), cfg.qmin, cfg.qmax)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--group-sizes", type=lambda v: None if v == "row" else int(v), nargs="+", default=[None, 128])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="one shape, 1024 rows")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="float32", help="the weights' values (solved in float32)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "exact_solver.md")
    a = p.parse_args(argv)
    shapes = [(1024, 4096)] if a.quick else SHAPES
    rng = np.random.default_rng(0)
    lines = []
    for rows, cols in shapes:
        w = (rng.standard_t(5, size=(rows, cols)) * 0.02).astype(weight_dtype(a.dtype)).astype(np.float32)
        _, mask = find_outliers(w, 3.0)
        x = w.copy()
        x[mask] = 0
        for bits in a.bits:
            for g in a.group_sizes:
                cfg = QuantConfig(bits=bits, group_size=g, steps=500)
                adam_numba.optimize_scales(x[:4], cfg)
                exact_numba.optimize_scales(x[:4], cfg)
                lloyd_numba.solve(x[:4], cfg)
                t_adam, s_adam = best_time(lambda: adam_numba.optimize_scales(x, cfg), a.repeat)
                t_exact, s_exact = best_time(lambda: exact_numba.optimize_scales(x, cfg), a.repeat)
                t_lloyd, (s_lloyd, _) = best_time(lambda: lloyd_numba.solve(x, cfg), a.repeat)
                la, le = group_losses(x, s_adam, cfg), group_losses(x, s_exact, cfg)
                ll = group_losses(x, s_lloyd, cfg)
                le_ok = float(np.mean(le <= la * (1 + 1e-12)))
                row = (f"| {rows}x{cols} | {bits} | {'row' if g is None else g} | {t_adam:.2f} | {t_exact:.2f} | "
                       f"**{t_adam / t_exact:.1f}x** | {la.sum():.6e} | {le.sum():.6e} | "
                       f"{(la.sum() / le.sum() - 1) * 100:.4f} % | {le_ok:.2%} | {t_lloyd:.2f} | "
                       f"{(ll.sum() / le.sum() - 1) * 100:.4f} % |")
                print(row, flush=True)
                lines.append(row)
    load = os.getloadavg()
    text = "\n".join([
        "# Exact scale solver vs Adam-500 (Numba, CPU)", "",
        f"{cpu_name()}, {numba.get_num_threads()} threads, {platform.python_version()}, numba {numba.__version__}; "
        f"{datetime.date.today()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.",
        f"Command: `python bench/exact_solver.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
        f"Weights: Student-t (df 5) x 0.02 as {a.dtype}, 3-sigma outliers zeroed. Times: best of "
        f"{a.repeat}, kernels compiled before timing. Loss: sum of squared reconstruction error.", "",
        "| shape | bits | group | Adam-500 s | exact s | speed-up | Adam loss | exact loss | Adam's excess | "
        "groups with exact <= Adam | Lloyd s | Lloyd's excess |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *lines, ""])
    return write_report(text, a.out, echo=False)


if __name__ == "__main__":
    sys.exit(main())
