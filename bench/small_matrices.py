"""Quantize time per weight of small matrices against a large one, on 1 and 2 threads, in one run.

    python bench/small_matrices.py [--repeat 9] [--dtype float16] [--out bench/results/small_matrices.md]

Issue 13's target: small matrices (MiniLM's 1536x384 and 384x1536, Gemma-270M-like 640x640 and
2048x640) no slower per weight than a large one (4096x4096). Each shape is a float16 (or
``--dtype``) Student-t(4) * 0.02 weight quantized with eqcore's defaults (``eqcore.quantize(w)``);
every round times each shape once, in turn (so that all see the same load), and a tiny 8x64
matrix gives the fixed cost of a call. Reported: the median and best wall time per weight over the rounds, and each shape's
ratio to the large one (median over median).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numba  # noqa: E402
import numpy as np  # noqa: E402

import eqcore  # noqa: E402
from eqcore.dtypes import weight_dtype  # noqa: E402
from bench.timing import interleaved, machine_line, write_report  # noqa: E402

SMALL = ((1536, 384), (384, 1536), (640, 640), (2048, 640))
LARGE = (4096, 4096)
TINY = (8, 64)


def measure(repeat: int, threads: int, dtype=np.float16) -> dict:
    """{shape: (median ns/weight, best ns/weight)} for SMALL + LARGE, and TINY's median µs per call."""
    rng = np.random.default_rng(0)
    shapes = (*SMALL, LARGE, TINY)
    ws = [(rng.standard_t(4, size=s) * 0.02).astype(dtype) for s in shapes]
    numba.set_num_threads(threads)
    for w in ws:  # compile and warm up
        eqcore.quantize(w)
    wall, _, _ = interleaved([lambda w=w: eqcore.quantize(w) for w in ws], repeat)
    out = {s: (statistics.median(t) * 1e9 / (s[0] * s[1]), min(t) * 1e9 / (s[0] * s[1]))
           for s, t in zip(shapes[:-1], wall[:-1])}
    out["tiny_us"] = statistics.median(wall[-1]) * 1e6
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=9, help="rounds (each times every shape once)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="float16", help="the weights' dtype")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "small_matrices.md")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    res = {th: measure(args.repeat, th, weight_dtype(args.dtype)) for th in (1, min(2, numba.config.NUMBA_NUM_THREADS))}
    load1 = os.getloadavg()[0]
    lines = [f"# Quantize time per weight: small matrices against {LARGE[0]}x{LARGE[1]} "
             f"({datetime.date.today().isoformat()})", "",
             machine_line(load0, load1),
             f"- command: `python bench/small_matrices.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             f"- eqcore defaults (4 bits, per-row fp16 scales, exact solver, 3-sigma row outliers) on {args.dtype} "
             "Student-t(4) * 0.02 weights; rounds interleave the shapes; numba "
             f"{numba.__version__}, NumPy {np.__version__}",
             "- target (issue 13): small matrices no slower per weight than large ones", "",
             "| threads | shape | median ns/weight | best ns/weight | vs large (median) |", "|---|---|---|---|---|"]
    for th, r in res.items():
        base = r[LARGE][0]
        for s in (*SMALL, LARGE):
            lines.append(f"| {th} | {s[0]}x{s[1]} | {r[s][0]:.1f} | {r[s][1]:.1f} | {r[s][0] / base:.2f}x |")
    lines += [""] + [f"- fixed cost of a call ({TINY[0]}x{TINY[1]}, {th} thread{'s' * (th > 1)}): "
                     f"{r['tiny_us']:.0f} µs (median)" for th, r in res.items()]
    return write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    sys.exit(main())
