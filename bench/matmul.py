"""Quantized matmul on the CPU: eqcore.matmul (packed weight, outliers fused) vs the dense
product with the same weight in fp16 (converted to float32 per call, as a fp16 model on CPU
does) and in float32 (already converted: the memory-hungry upper bound), all measured in one run.

    python bench/matmul.py [--shapes 4096x4096 11008x4096 --batches 1 4 16 64 --repeat 5]

Weights: Student-t(4) * 0.02 in fp16, quantized at 4 bits with the configuration given by
--grid/--group-size (3-sigma outliers). Writes bench/results/matmul_cpu.md.
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

import numpy as np  # noqa: E402

import eqcore  # noqa: E402
from eqcore.machine import cpu_name  # noqa: E402
from bench.timing import best_time  # noqa: E402


def best(fn, repeat):
    """Best of ``repeat`` timed calls after one untimed warm-up call (compilation, page faults)."""
    fn()
    return best_time(fn, repeat)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--grid", default="symmetric")
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "matmul_cpu.md"))
    a = ap.parse_args(argv)
    load = os.getloadavg()[0]
    rows_out = []
    for shape in a.shapes:
        rows, cols = map(int, shape.split("x"))
        w = (np.random.default_rng(0).standard_t(4, (rows, cols)) * 0.02).astype(np.float16)
        qt = eqcore.quantize(w, bits=4, grid=a.grid, group_size=a.group_size, solver="exact" if a.grid == "symmetric" else None)
        w32 = w.astype(np.float32)
        for b in a.batches:
            x = np.random.default_rng(b).normal(size=(b, cols)).astype(np.float32)
            t_q = best(lambda: eqcore.matmul(x, qt), a.repeat)
            t_16 = best(lambda: x @ w.astype(np.float32).T, a.repeat)
            t_32 = best(lambda: x @ w32.T, a.repeat)
            rows_out.append((shape, b, t_q, t_16, t_32, qt.nbytes, w.nbytes))
            print(f"{shape} batch {b}: eqcore {t_q * 1e3:.2f} ms, fp16 dense {t_16 * 1e3:.2f} ms, "
                  f"fp32 dense {t_32 * 1e3:.2f} ms", flush=True)
    lines = [f"# CPU quantized matmul ({datetime.date.today().isoformat()})", "",
             f"- machine: {cpu_name()}, {os.cpu_count()} cores, {platform.platform()}; load average at start {load:.2f}",
             f"- command: `python bench/matmul.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"- weight: 4-bit {a.grid}, group {a.group_size or 'row'}, 3-sigma outliers; best of {a.repeat}", "",
             "| shape | batch | eqcore.matmul (ms) | fp16 weight dense (ms) | fp32 weight dense (ms) | speed-up vs fp16 | "
             "weight bytes (eqcore / fp16) |", "|---|---|---|---|---|---|---|"]
    for shape, b, tq, t16, t32, qb, wb in rows_out:
        lines.append(f"| {shape} | {b} | {tq * 1e3:.2f} | {t16 * 1e3:.2f} | {t32 * 1e3:.2f} | {t16 / tq:.2f}x | "
                     f"{qb / 2**20:.1f} / {wb / 2**20:.1f} MiB |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
