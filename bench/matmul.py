"""Quantized matmul on the CPU, side by side in one run: eqcore.matmul (packed weight, outliers
fused) against torch F.linear on the same weights in float32 and bfloat16, and against
dequantize-then-F.linear (what running without the fused kernel costs), with the GB/s of weight
bytes each reads against the machine's memory bandwidth (a large np.copyto, bytes read + written).

    python bench/matmul.py [--shapes 4096x4096 11008x4096 4096x11008] [--batches 1 4 16 64]

Weights: Student-t(4) * 0.02 in fp16 (heavy tails like LLM weights), quantized with eqcore's
defaults at --bits (4). Writes bench/results/matmul_cpu.md and prints each row as it goes.
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

TARGETS = ("batch 1: >= 3x torch fp32 and >= 1.5x torch bf16, >= 60% of the copy bandwidth; "
           "never slower than dequantize + F.linear")


def best(fn, repeat):
    """Best of ``repeat`` timed calls after one untimed warm-up call (compilation, page faults)."""
    fn()
    return best_time(fn, repeat)[0]


def copy_bandwidth(nbytes: int = 1 << 28, repeat: int = 5) -> float:
    """Bytes per second moved by np.copyto of ``nbytes`` (each byte read once and written once)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    return 2 * nbytes / best(lambda: np.copyto(dst, src), repeat)


def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "matmul_cpu.md"))
    a = ap.parse_args(argv)
    load = os.getloadavg()[0]
    torch.set_num_threads(os.cpu_count())
    bw = copy_bandwidth()
    print(f"np.copyto bandwidth {bw / 1e9:.1f} GB/s (read + write)", flush=True)
    rows_out = []
    for shape in a.shapes:
        rows, cols = map(int, shape.split("x"))
        w = (np.random.default_rng(0).standard_t(4, (rows, cols)) * 0.02).astype(np.float16)
        qt = eqcore.quantize(w, bits=a.bits)
        w32 = torch.from_numpy(w.astype(np.float32))
        wbf = w32.to(torch.bfloat16)
        for b in a.batches:
            x = np.random.default_rng(b).normal(size=(b, cols)).astype(np.float32)
            xt = torch.from_numpy(x)
            xbf = xt.to(torch.bfloat16)
            t = {"eqcore": best(lambda: eqcore.matmul(x, qt), a.repeat),
                 "fp32": best(lambda: F.linear(xt, w32), a.repeat),
                 "bf16": best(lambda: F.linear(xbf, wbf), a.repeat),
                 "deq": best(lambda: F.linear(xt, torch.from_numpy(eqcore.dequantize(qt, np.float32))), a.repeat)}
            rows_out.append((shape, b, t, qt.nbytes))
            print(f"{shape} batch {b}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items()), flush=True)
    lines = [f"# CPU quantized matmul ({datetime.date.today().isoformat()})", "",
             f"- machine: {cpu_name()}, {os.cpu_count()} cores, {platform.platform()}; "
             f"1-min load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}",
             f"- command: `python bench/matmul.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"- memory bandwidth (np.copyto of 256 MiB, bytes read + written): {bw / 1e9:.1f} GB/s",
             f"- weight: Student-t(4) * 0.02, {a.bits}-bit eqcore defaults (per-row scales, 3-sigma row outliers);"
             f" best of {a.repeat} after a warm-up; torch {torch.__version__} with {torch.get_num_threads()} threads",
             f"- targets (issue 10): {TARGETS}", "",
             "| shape | batch | eqcore (ms) | torch fp32 (ms) | torch bf16 (ms) | dequantize + F.linear (ms) | "
             "vs fp32 | vs bf16 | vs dequant | eqcore weight GB/s | % of copy bw |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape, b, t, qb in rows_out:
        gbs = qb / t["eqcore"]
        lines.append(f"| {shape} | {b} | {t['eqcore'] * 1e3:.2f} | {t['fp32'] * 1e3:.2f} | {t['bf16'] * 1e3:.2f} | "
                     f"{t['deq'] * 1e3:.2f} | {t['fp32'] / t['eqcore']:.2f}x | {t['bf16'] / t['eqcore']:.2f}x | "
                     f"{t['deq'] / t['eqcore']:.2f}x | {gbs / 1e9:.1f} | {100 * gbs / bw:.0f}% |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
