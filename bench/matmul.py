"""Quantized matmul on the CPU, side by side in one run: eqcore.matmul (packed weight, outliers
fused) against torch F.linear on the same weights in float32 and bfloat16, and against
dequantize-then-F.linear (what running without the fused kernel costs), with the GB/s of weight
bytes each reads against the machine's memory bandwidth (a large np.copyto, bytes read + written).

    python bench/matmul.py [--shapes 4096x4096 11008x4096 4096x11008] [--batches 1 4 16 64]
                           [--method eqcore-cb-g96-s3.3-log8 --out bench/results/matmul_cpu_cb_g96_log8.md]
    python bench/matmul.py --layer --shapes 576x576 1536x576 576x1536 4096x4096 11008x4096 \
                           --batches 128 192 256 384 512 1024 --warm --out bench/results/matmul_cpu_large.md

Weights: Student-t(4) * 0.02 in fp16 (heavy tails like LLM weights), quantized with eqcore's
defaults at --bits (4), or with the settings of --method, an eqcore method of the quality
benchmark (bench/eval/quality.py's METHODS, e.g. the 4-bit quality pick). eqcore runs as QuantizedLinear calls it, ``eqcore.matmul(x, qt,
check=False)`` (the tensor validated once, when the layer is built); the cost of the per-call
``qt.validate()`` that ``check=True`` adds is measured and reported apart. ``--layer`` times
``eqcore.torch.QuantizedLinear``'s forward instead (torch tensors in and out), which from
``eqcore.torch.dense_rows(weights)`` rows of x multiplies by W dequantized in float32 tiles through F.linear. The four methods run in
--rounds rounds, each method's calls back to back within a round (WARMUP_S seconds of untimed calls,
then --repeat timed calls: Numba's and torch's OpenMP threads spin for a while after a parallel
region and take the cores from the other's threads, so alternating call by call, or timing right
after the other runtime's calls, would charge every method for the previous one); the best time
over all rounds counts. Each method cycles through copies of its weight that together exceed
COLD_FACTOR times the last-level cache, so that its weight comes from memory as a model's does (a
4096x4096 4-bit weight, 9 MB, would otherwise stay in this machine's 32 MiB L3 between calls, and
its time then depends on what other tenants of the host do to that cache); ``--warm`` keeps one
copy. Four times: on this VM a 2-thread read of 8 MiB arrays ran at 177 GB/s with one copy, 101
GB/s with 64 MiB of copies (the host's cache is larger than the 32 MiB it reports) and 56-59 GB/s
from 128 MiB to 512 MiB.
Writes bench/results/matmul_cpu.md (with the 1-minute load average at each row) and prints each
row as it goes.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import eqcore  # noqa: E402
from eqcore.machine import cpu_name  # noqa: E402
from bench.timing import best_time  # noqa: E402

DEFAULT_BATCHES = [1, 4, 16, 64]
TARGETS = ("batch 1: >= 3x torch fp32 and >= 1.5x torch bf16, >= 60% of the copy bandwidth; "
           "never slower than dequantize + F.linear")


COLD_FACTOR = 4  # copies of each weight together exceed this many last-level caches (see the module)
WARMUP_S = 0.5  # seconds of untimed calls before each method's timed ones, so that each starts from steady state


def best(fn, repeat, warmup: float = WARMUP_S):
    """Best of ``repeat`` timed calls after ``warmup`` seconds of untimed calls (at least one:
    compilation, page faults, the other runtime's spinning threads going idle)."""
    t_end = time.perf_counter() + warmup
    fn()
    while time.perf_counter() < t_end:
        fn()
    return best_time(fn, repeat)[0]


def best_in_rounds(fns: dict, repeat: int, rounds: int) -> dict:
    """{name: best time} over ``rounds`` rounds of :func:`best` of each function in turn."""
    t = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t[k] = min(t[k], best(fn, repeat))
    return t


def last_level_cache() -> int:
    """Bytes of this machine's largest CPU cache (sysfs; 32 MiB if it cannot be read)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        unit = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * unit)
    return max(sizes, default=32 << 20)


def cycled(items):
    """A function returning the next of ``items`` each call, round and round."""
    state = [0]

    def nxt():
        state[0] = (state[0] + 1) % len(items)
        return items[state[0]]

    return nxt


def copies(make, nbytes: int, cache: int, cold: bool) -> list:
    """Enough separate copies from ``make()`` (each ``nbytes``) that cycling through them reads
    from memory, not cache: together at least COLD_FACTOR times ``cache`` (one when not ``cold``)."""
    return [make() for _ in range(max(1, -(-COLD_FACTOR * cache // nbytes)) if cold else 1)]


def copy_bandwidth(nbytes: int = 1 << 28, repeat: int = 5) -> float:
    """Bytes per second moved by np.copyto of ``nbytes`` (each byte read once and written once)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    return 2 * nbytes / best(lambda: np.copyto(dst, src), repeat)


def main(argv=None) -> int:
    import numba
    import torch
    import torch.nn.functional as F

    from eqcore.torch import TILE_WEIGHTS, QuantizedLinear, dense_rows

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"])
    ap.add_argument("--batches", type=int, nargs="+", default=DEFAULT_BATCHES)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--method", default=None, help="an eqcore method of bench/eval/quality.py (default: eqcore's defaults)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "matmul_cpu.md"))
    ap.add_argument("--layer", action="store_true",
                    help="time eqcore.torch.QuantizedLinear's forward (default: eqcore.matmul(x, qt, check=False))")
    ap.add_argument("--warm", dest="cold", action="store_false",
                    help="call every method on one copy of its weight, which may stay in the CPU's cache (default: "
                         f"cycle through copies that together exceed it {COLD_FACTOR} times, so weights come from memory)")
    a = ap.parse_args(argv)
    options, layout = {}, "eqcore defaults (per-row scales, 3-sigma row outliers)"
    if a.method is not None:
        from bench.eval.quality import METHODS

        spec = METHODS.get(a.method)
        if spec is None or spec.kind != "eqcore":
            ap.error(f"--method must be one of {sorted(k for k, m in METHODS.items() if m.kind == 'eqcore')}")
        options, layout = spec.options, f"{spec.label} (`{a.method}`)"
    load = os.getloadavg()[0]
    cache = last_level_cache()
    torch.set_num_threads(os.cpu_count())
    bw = copy_bandwidth()
    print(f"np.copyto bandwidth {bw / 1e9:.1f} GB/s (read + write)", flush=True)
    rows_out = []
    for shape in a.shapes:
        rows, cols = map(int, shape.split("x"))
        w = (np.random.default_rng(0).standard_t(4, (rows, cols)) * 0.02).astype(np.float16)
        qt = eqcore.quantize(w, bits=a.bits, **options)
        validate = best(qt.validate, a.repeat)
        qts = cycled(copies(lambda: qt.map_arrays(np.copy), qt.nbytes, cache, a.cold))
        if a.layer:
            layers = cycled(copies(lambda: QuantizedLinear(qt.map_arrays(np.copy)), qt.nbytes, cache, a.cold))
        w32s = cycled(copies(lambda: torch.from_numpy(w.astype(np.float32)), 4 * w.size, cache, a.cold))
        wbfs = cycled(copies(lambda: torch.from_numpy(w.astype(np.float32)).to(torch.bfloat16), 2 * w.size, cache,
                             a.cold))
        for b in a.batches:
            x = np.random.default_rng(b).normal(size=(b, cols)).astype(np.float32)
            xt = torch.from_numpy(x)
            xbf = xt.to(torch.bfloat16)
            ours = (lambda: layers()(xt)) if a.layer else (lambda: eqcore.matmul(x, qts(), check=False))
            t = best_in_rounds({"eqcore": ours,
                                "fp32": lambda: F.linear(xt, w32s()),
                                "bf16": lambda: F.linear(xbf, wbfs()),
                                "deq": lambda: F.linear(xt, torch.from_numpy(eqcore.dequantize(qts(), np.float32)))},
                               a.repeat, a.rounds)
            rows_out.append((shape, b, t, qt.nbytes, validate, os.getloadavg()[0]))
            print(f"{shape} batch {b}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items()) +
                  f" (validate {validate * 1e3:.2f} ms; load {os.getloadavg()[0]:.2f})", flush=True)
    lines = [f"# CPU quantized matmul ({datetime.date.today().isoformat()})", "",
             f"- machine: {cpu_name()}, {os.cpu_count()} cores, {platform.platform()}; "
             f"1-min load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}",
             f"- command: `python bench/matmul.py {' '.join(sys.argv[1:])}`".rstrip(),
             *([f"- batches {' '.join(map(str, a.batches))} only (not all of the default "
                f"{' '.join(map(str, DEFAULT_BATCHES))}): the other batches' rows are in this file's git history"]
               if not set(DEFAULT_BATCHES) <= set(a.batches) else []),
             f"- memory bandwidth (np.copyto of 256 MiB, bytes read + written): {bw / 1e9:.1f} GB/s",
             (f"- weights from memory: each method cycles through copies of its weight that together exceed {COLD_FACTOR} times the "
              f"{cache >> 20} MiB last-level cache (a model larger than the cache; `--warm` keeps one copy)" if a.cold
              else f"- `--warm`: one copy of each weight, which may stay in the {cache >> 20} MiB last-level cache"),
             f"- weight: Student-t(4) * 0.02, {a.bits}-bit {layout}, {qt.bits_per_weight:.3f} bits/w;"
             f" best of {a.rounds} rounds x {a.repeat} calls (each after {WARMUP_S} s of untimed calls); torch {torch.__version__} with "
             f"{torch.get_num_threads()} threads; Numba {numba.__version__} with {numba.get_num_threads()} threads",
             ("- eqcore: `QuantizedLinear(qt)(x)`, the torch layer's forward (torch tensors in and out); from "
              f"{dense_rows(1)} rows of x (up to 4M weights; {dense_rows(1 << 30)} above) it multiplies by W dequantized "
              f"to float32 in tiles of at most {TILE_WEIGHTS >> 20}M weights through F.linear" if a.layer else
              "- eqcore: `eqcore.matmul(x, qt, check=False)`, as QuantizedLinear calls it for fewer rows of x than "
              "`eqcore.torch.dense_rows`; `check=True` adds `qt.validate()` each call (column 'validate', per weight, "
              "not included in eqcore's time)"),
             f"- targets (issue 10): {TARGETS}", "",
             "| shape | batch | eqcore (ms) | torch fp32 (ms) | torch bf16 (ms) | dequantize + F.linear (ms) | "
             "vs fp32 | vs bf16 | vs dequant | eqcore weight GB/s | % of copy bw | validate (ms) | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape, b, t, qb, validate, row_load in rows_out:
        gbs = qb / t["eqcore"]
        lines.append(f"| {shape} | {b} | {t['eqcore'] * 1e3:.2f} | {t['fp32'] * 1e3:.2f} | {t['bf16'] * 1e3:.2f} | "
                     f"{t['deq'] * 1e3:.2f} | {t['fp32'] / t['eqcore']:.2f}x | {t['bf16'] / t['eqcore']:.2f}x | "
                     f"{t['deq'] / t['eqcore']:.2f}x | {gbs / 1e9:.1f} | {100 * gbs / bw:.0f}% | "
                     f"{validate * 1e3:.2f} | {row_load:.2f} |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
