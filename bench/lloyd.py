"""The Lloyd solver: the NumPy reference (solvers/lloyd.py) against its Numba port (solvers/lloyd_numba.py).

    python bench/lloyd.py [--shapes 4096x4096 11008x4096] [--repeat 3] [--ref-repeat 2] [--quick]
                                                              # writes bench/results/lloyd.md

Weights: Student-t (df 5) * 0.02, seeded, outliers at 3 sigma zeroed and masked (``keep``) as
quantize() does; 4 bits; codebook grid (fitted to the tensor, per row and g128) and asymmetric
grid (per row and g128). Each time is the best of its repeats after a warm-up call that compiles
the kernels; the reference and Numba runs of one setting alternate (ref, numba, ref, numba, ...)
so that both see the same load, and the load average is read before and after each setting. Every
setting asserts that the two give bit-identical scales and zero-points.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numba  # noqa: E402
import numpy as np  # noqa: E402

from eqcore.config import QuantConfig  # noqa: E402
from eqcore.grids import codebook_for  # noqa: E402
from eqcore.machine import cpu_name  # noqa: E402
from eqcore.outliers import find_outliers  # noqa: E402
from eqcore.solvers import lloyd, lloyd_numba  # noqa: E402
from bench.timing import write_report  # noqa: E402

NOTE = ("Both solvers return the same scales and zero-points (asserted for every setting). The Numba solver "
        "stops a group once its (s, z) repeats, which changes no result; per row most groups run all 20 "
        "alternations (in a 256x4096 sample of such weights without a mask: 58% codebook, 100% asymmetric), in "
        "groups of 128 most stop early (90% within 7 alternations, codebook; 80% within 10, asymmetric). The "
        "reference allocates (rows x cols) float64 temporaries; its time per weight differs between the shapes "
        "(and was lower on a 512x4096 quick run), so the ratios do too.")
SETTINGS = [("codebook", None), ("codebook", 128), ("asymmetric", None), ("asymmetric", 128)]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def shape(v: str) -> tuple[int, int]:
    r, c = v.lower().split("x")
    return int(r), int(c)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=shape, nargs="+", default=[(4096, 4096), (11008, 4096)])
    p.add_argument("--repeat", type=int, default=3, help="runs of the Numba solver (best taken)")
    p.add_argument("--ref-repeat", type=int, default=2, help="runs of the NumPy reference (best taken)")
    p.add_argument("--quick", action="store_true", help="one 512x4096 matrix")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lloyd.md")
    a = p.parse_args(argv)
    shapes = [(512, 4096)] if a.quick else a.shapes
    rng = np.random.default_rng(0)
    lines = []
    for rows, cols in shapes:
        w = (rng.standard_t(5, size=(rows, cols)) * 0.02).astype(np.float32)
        _, mask = find_outliers(w, 3.0)
        x = w.copy()
        x[mask] = 0
        keep = ~mask
        for grid, g in SETTINGS:
            cfg = QuantConfig(bits=4, grid=grid, group_size=g, solver="lloyd")
            cb = codebook_for(x, cfg)
            lloyd_numba.solve(x[:4], cfg, codebook=cb, keep=keep[:4])  # compile (or load the cache)
            load0 = loadavg()
            t_ref, t_nb = [], []
            for i in range(max(a.repeat, a.ref_repeat)):
                if i < a.ref_repeat:
                    t0 = time.perf_counter()
                    ref = lloyd.solve(x, cfg, codebook=cb, keep=keep)
                    t_ref.append(time.perf_counter() - t0)
                if i < a.repeat:
                    t0 = time.perf_counter()
                    got = lloyd_numba.solve(x, cfg, codebook=cb, keep=keep)
                    t_nb.append(time.perf_counter() - t0)
            same = np.array_equal(ref[0].view(np.uint32), got[0].view(np.uint32)) and (
                ref[1] is None or np.array_equal(ref[1].view(np.uint32), got[1].view(np.uint32)))
            assert same, f"{grid} {g}: Numba differs from the reference"
            tr, tn = min(t_ref), min(t_nb)
            n = rows * cols
            row = (f"| {rows}x{cols} | {grid} | {'row' if g is None else g} | {tr:.2f} | {tn:.3f} | "
                   f"**{tr / tn:.1f}x** | {tr / n * 1e9:.0f} | {tn / n * 1e9:.1f} | yes | {load0} / {loadavg()} |")
            print(row, flush=True)
            lines.append(row)
    text = "\n".join([
        "# Lloyd solver: NumPy reference vs Numba (CPU)", "",
        f"{cpu_name()}, {numba.get_num_threads()} Numba threads (the reference is NumPy, one thread), "
        f"Python {platform.python_version()}, NumPy {np.__version__}, numba {numba.__version__}; "
        f"{datetime.date.today()}.",
        f"Command: `python bench/lloyd.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
        "Weights: Student-t (df 5) x 0.02, 3-sigma outliers zeroed and masked (keep), 4 bits; codebook fitted to the "
        f"tensor. Times: best of {a.ref_repeat} (reference) and {a.repeat} (Numba), runs alternating, kernels "
        "compiled before timing; ns/weight = time / (rows x cols). Load: 1-minute load average before / after each "
        "setting, on a shared 2-core machine (other jobs running: the ratios are what one run measured).", "",
        NOTE, "",
        "| shape | grid | group | reference s | Numba s | speed-up | reference ns/weight | Numba ns/weight | "
        "bit-identical | load before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *lines, ""])
    return write_report(text, a.out, echo=False)


if __name__ == "__main__":
    sys.exit(main())
