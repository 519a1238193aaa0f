"""eqcore's Numba CPU scale solvers against hand-written C++ ports of the same per-group loops.

    python bench/solver_loop.py [--solvers exact adam] [--repeat 5] [--quick]   # writes bench/results/solver_loop.md

The C++ (bench/solver_loop/*.cpp) is compiled at run time (g++ -O3 -march=native -fopenmp, plus
$SOLVER_LOOP_CXXFLAGS) into a temp dir and called through ctypes: OpenMP over groups with
numba.get_num_threads() threads, the same static chunking as Numba's prange. Two builds:
-ffp-contract=off (no FMA: the Numba loops' arithmetic; the exact solver's scales are asserted
bit-identical) and -ffp-contract=fast (FMA wherever g++ likes; its agreement is reported).
Weights: Student-t(5) * 0.02, seed 0, outliers (|x - row mean| >= 3 row std) zeroed as
quantize() does; 4-bit. Without g++ it prints one line and exits 1.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # compile into a fresh cache, leaving the user's out of the run
    os.environ.setdefault("EQCORE_CACHE_DIR", tempfile.mkdtemp(prefix="eqcore-bench-cache-"))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SRC = Path(__file__).resolve().parent / "solver_loop"
# -fno-trapping-math / -fno-math-errno change no value (only FP exception flags and errno); without
# them g++ vectorises no loop with floor / ceil (window_bound ran scalar: the C++ took 2x Numba's time)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-fno-trapping-math", "-fno-math-errno",
         *os.environ.get("SOLVER_LOOP_CXXFLAGS", "").split()]
VARIANTS = {"nofma": ["-ffp-contract=off"], "fma": ["-ffp-contract=fast"]}

import numba  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import interleaved  # noqa: E402
from eqcore.config import QuantConfig  # noqa: E402
from eqcore.layout import group_layout, max_scale  # noqa: E402
from eqcore.solvers import adam_numba, exact_numba  # noqa: E402

_f32p = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
_f64p = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")
_i64, _f32, _f64 = ctypes.c_int64, ctypes.c_float, ctypes.c_double


def build(variant: str = "nofma", workdir: str | None = None):
    """The C++ ports compiled and loaded (ctypes.CDLL); RuntimeError if g++ is missing or fails."""
    gxx = shutil.which("g++")
    if gxx is None:
        raise RuntimeError("g++ not found: the C++ baseline cannot be built")
    out = Path(workdir or tempfile.mkdtemp(prefix="eqcore-solver-loop-")) / f"solver_loop_{variant}.so"
    cmd = [gxx, *FLAGS, *VARIANTS[variant], str(SRC / "exact.cpp"), str(SRC / "adam.cpp"), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"g++ failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    lib = ctypes.CDLL(str(out))
    lib.exact_scales.argtypes = [_f32p, _i64, _i64, _i64, _i64, _f32, _f32, _i64, _i64, _f64p, _f32p, ctypes.c_int]
    lib.exact_scales.restype = None
    lib.adam_scales.argtypes = [_f32p, _i64, _i64, _i64, _i64, _f32, _f32, _i64, _f64, _f64, _f64, _f64, _f32, _f32p,
                                ctypes.c_int]
    lib.adam_scales.restype = None
    lib.command = " ".join(["g++", *cmd[1:1 + len(FLAGS) + len(VARIANTS[variant])]])
    return lib


def exact_cpp(lib, x, cfg, threads=None):
    """The C++ exact solver's scales (rows, n_groups), same workspace cap and chunking as exact_numba."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    g, n_groups = group_layout(cols, cfg.group_size)
    threads = threads or numba.get_num_threads()
    out = np.empty(rows * n_groups, np.float32)
    chunks = max(1, min(rows * n_groups, 8 * threads))
    lib.exact_scales(x.reshape(-1), rows, cols, g, n_groups, float(cfg.qmax), float(max_scale(np.float32, cfg.qmax)),
                     chunks, 4 * g + 64, exact_numba.BOUNDS, out, threads)
    return out.reshape(rows, n_groups)


def adam_cpp(lib, x, cfg, threads=None):
    """The C++ Adam solver's scales (rows, n_groups)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    g, n_groups = group_layout(cols, cfg.group_size)
    out = np.empty(rows * n_groups, np.float32)
    b1, b2 = cfg.betas
    lib.adam_scales(x.reshape(-1), rows, cols, g, n_groups, float(cfg.qmin), float(cfg.qmax), int(cfg.steps),
                    float(cfg.lr), float(b1), float(b2), float(cfg.eps), float(max_scale(np.float32, cfg.qmax)), out,
                    threads or numba.get_num_threads())
    return out.reshape(rows, n_groups)


def weights(rows, cols, seed=0):
    """Student-t(5) * 0.02 with the default outliers (|x - row mean| >= 3 row std) zeroed."""
    w = (np.random.default_rng(seed).standard_t(5, size=(rows, cols)) * 0.02).astype(np.float32)
    wd = w.astype(np.float64)
    mean = wd.mean(axis=1, keepdims=True)
    std = wd.std(axis=1, keepdims=True)
    w[np.abs(wd - mean) >= 3.0 * std] = 0
    return w


def ulps(a, b):
    """|a - b| in float32 units in the last place (positive floats)."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--solvers", nargs="+", default=["exact", "adam"], choices=["exact", "adam"])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"])
    p.add_argument("--group-sizes", type=lambda v: None if v == "row" else int(v), nargs="+", default=[None, 128])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--adam-repeat", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1024x4096 only, Adam 50 steps")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "solver_loop.md")
    a = p.parse_args(argv)
    try:
        libs = {v: build(v) for v in VARIANTS}
    except RuntimeError as e:
        print(f"solver_loop: {e}")
        return 1
    shapes = [(1024, 4096)] if a.quick else [tuple(map(int, s.split("x"))) for s in a.shapes]
    threads = numba.get_num_threads()
    load0 = os.getloadavg()
    rows_out = []
    for rows, cols in shapes:
        x = weights(rows, cols)
        for solver in a.solvers:
            for gs in a.group_sizes:
                cfg = QuantConfig(bits=4, group_size=gs, steps=50 if a.quick else 500, solver=solver)
                if solver == "exact":
                    fns = [lambda: exact_numba.optimize_scales(x, cfg), lambda: exact_cpp(libs["nofma"], x, cfg),
                           lambda: exact_cpp(libs["fma"], x, cfg)]
                    rep = a.repeat
                else:
                    fns = [lambda: adam_numba.optimize_scales(x, cfg), lambda: adam_cpp(libs["nofma"], x, cfg),
                           lambda: adam_cpp(libs["fma"], x, cfg)]
                    rep = a.adam_repeat
                (exact_numba if solver == "exact" else adam_numba).optimize_scales(x[:4], cfg)
                load = os.getloadavg()[0]
                ts, cpu, outs = interleaved(fns, rep)
                ref = outs[0]
                same = [float(np.mean(o == ref)) for o in outs]
                maxulp = [int(ulps(o, ref).max()) for o in outs]
                if solver == "exact":
                    assert np.array_equal(outs[1], ref), "C++ (no FMA) exact scales differ from Numba's"
                work = x.size * (cfg.steps if solver == "adam" else 1)
                best = [min(t) for t in ts]
                med = [statistics.median(t) for t in ts]
                r = dict(shape=f"{rows}x{cols}", solver=solver, group="row" if gs is None else gs, best=best, med=med,
                         cpu=[min(c) for c in cpu], rate=[work / b for b in best], same=same, maxulp=maxulp, load=load,
                         rep=rep)
                rows_out.append(r)
                print(f"{r['shape']} {solver} g={r['group']}: numba {best[0]:.3f} s, c++ {best[1]:.3f} s "
                      f"({best[1] / best[0]:.0%}), c++ fma {best[2]:.3f} s ({best[2] / best[0]:.0%}); "
                      f"identical {same[1]:.4%} / {same[2]:.4%} (max {maxulp[1]} / {maxulp[2]} ulp); "
                      f"CPU time {r['cpu'][1] / r['cpu'][0]:.0%} / {r['cpu'][2] / r['cpu'][0]:.0%}; load {load:.2f}",
                      flush=True)
    load1 = os.getloadavg()
    write_report(a, argv, rows_out, threads, load0, load1, libs)
    return 0


NOTES = "## Findings"


def rate(v: float) -> str:
    return f"{v / 1e9:.2f} G" if v >= 1e9 else f"{v / 1e6:.1f} M"


def write_report(a, argv, rows_out, threads, load0, load1, libs):
    from eqcore.machine import cpu_name

    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    gxx_version = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    lines = [
        "# Solver loops: Numba vs a hand-written C++ port (CPU)", "",
        f"Generated by `python bench/solver_loop.py {cmd}`.".replace(" `.", "`."), "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- cpu: {cpu_name()}, {os.cpu_count()} cores; {threads} threads each (Numba prange / OpenMP)",
        f"- load average (1 min): {load0[0]:.2f} at start, {load1[0]:.2f} at end (the machine is shared)",
        f"- python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
        f"threading layer {numba.threading_layer()}; {gxx_version}",
        f"- C++ build: `{libs['nofma'].command}` (\"C++\"), and with -ffp-contract=fast (\"C++ FMA\")",
        "- weights: Student-t(5) * 0.02, seed 0, |x - row mean| >= 3 row std zeroed; 4-bit symmetric; "
        f"Adam {QuantConfig().steps if not a.quick else 50} steps",
        f"- times: interleaved runs (Numba, C++, C++ FMA), best and median of {a.repeat} (exact) / {a.adam_repeat} "
        "(Adam) after a warm-up; \"Numba reaches\" = C++ time / Numba time (best wall time of each; in brackets "
        "the same from process CPU time, which a loaded machine disturbs less)", "",
        "| shape | solver | group | Numba s (best / median) | C++ s | C++ FMA s | Numba reaches (of C++) | "
        "(of C++ FMA) | Numba elem/s | C++ elem/s | scales = Numba: C++ / C++ FMA (max ulp) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows_out:
        b, m, c = r["best"], r["med"], r["cpu"]
        unit = "elem*steps/s" if r["solver"] == "adam" else "elem/s"
        lines.append(
            f"| {r['shape']} | {r['solver']} | {r['group']} | {b[0]:.3f} / {m[0]:.3f} | {b[1]:.3f} / {m[1]:.3f} | "
            f"{b[2]:.3f} / {m[2]:.3f} | **{b[1] / b[0]:.0%}** ({c[1] / c[0]:.0%}) | {b[2] / b[0]:.0%} "
            f"({c[2] / c[0]:.0%}) | {rate(r['rate'][0])} {unit} | {rate(r['rate'][1])} | "
            f"{r['same'][1]:.4%} / {r['same'][2]:.4%} ({r['maxulp'][1]} / {r['maxulp'][2]}) | {r['load']:.2f} |")
    lines.append("")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    old = a.out.read_text() if a.out.exists() else ""
    notes = old[old.index(NOTES):] if NOTES in old else ""  # hand-written findings are kept
    a.out.write_text("\n".join(lines) + ("\n" + notes if notes else ""))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
