"""Numba CPU path vs NumPy reference: scale search, encode, dequantize on one weight matrix;
and the share of a default quantize spent outside the scale solver.

    python bench/cpu_quantize.py [--rows 4096 --cols 4096 --steps 500 --ref-steps 10]

Weights: Student-t (df=5) * 0.02, seeded; outliers at ``--sigma`` zeroed as in quantize().
Numba kernels are compiled into a fresh cache directory first (timed apart), so the
timed calls measure execution only. Writes a markdown table to bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # run as the bench: compile into a fresh cache (not when a test imports it)
    os.environ.setdefault("EQCORE_CACHE_DIR", tempfile.mkdtemp(prefix="eqcore-bench-cache-"))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import importlib  # noqa: E402
import time  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

import eqcore  # noqa: E402
from eqcore import api, solvers  # noqa: E402
from eqcore.backends import numba as cpu  # noqa: E402
from eqcore.solvers import adam_numba  # noqa: E402
from eqcore.config import QuantConfig  # noqa: E402
from eqcore.backends.numpy import dequantize as dequantize_reference  # noqa: E402
from eqcore.backends.numpy import encode as encode_reference  # noqa: E402
from eqcore.machine import cpu_name  # noqa: E402
from bench.timing import best_time, interleaved  # noqa: E402
from eqcore.outliers import find_outliers  # noqa: E402
from eqcore.solvers.adam import optimize_scales as optimize_scales_reference  # noqa: E402
from eqcore.tensor import QuantizedTensor  # noqa: E402


PEAK_SCRIPT = """
import os, sys, threading, time
import numpy as np
import eqcore
rows, cols, seed = map(int, sys.argv[1:4])
rng = np.random.default_rng(seed)
eqcore.quantize((rng.standard_t(5, (64, cols)) * 0.02).astype(np.float16), backend="numba")  # compile
w = (np.random.default_rng(seed).standard_t(5, (rows, cols)) * 0.02).astype(np.float16)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base = rss(); peak = [base]; done = threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.0005)
t = threading.Thread(target=watch); t.start()
eqcore.quantize(w, backend="numba")
done.set(); t.join()
print((peak[0] - base) / w.nbytes)
"""


def peak_in_fresh_process(rows: int, cols: int, seed: int) -> float:
    """Peak resident memory above the input while the default quantize of a float16 (rows, cols)
    Student-t weight runs, in a fresh process (RSS sampled every 0.5 ms), over the fp16 size."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(rows), str(cols), str(seed)], capture_output=True,
                       text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return float(r.stdout.split()[-1])


STAGES = ("input check", "split: statistics + cast + zeroing + CSR + NaN/Inf check (fused)", "solver",
          "scale capping + rounding", "encode (codes + pack into the result)", "assemble the QuantizedTensor")


def differing(head, ref) -> list[str]:
    """Names of the arrays in which QuantizedTensor ``head`` differs from ``ref``: float arrays bit
    for bit, integer ones by value (the row pointers' width follows a tensor's outlier count, so a
    block of a large tensor may hold them wider than the same rows quantized alone)."""
    out = []
    for f, a in ref.arrays().items():
        b = np.asarray(getattr(head, f))
        same = np.array_equal(b, a) if a.dtype.kind in "iu" else (
            b.dtype == a.dtype and np.array_equal(b.view(np.uint8), a.view(np.uint8)))
        if not same:
            out.append(f)
    return out


def outside_share(rows: int, cols: int, seed: int, repeat: int) -> dict:
    """Times of the default ``eqcore.quantize(w, bits=4)`` of a float16 (rows, cols) Student-t weight
    on Numba and of the scale solver alone (the registry's Numba exact ``optimize_scales`` on the
    whole float32 x with the outliers zeroed), best of ``repeat`` (interleaved, so both see the same
    load), at the configured threads and at one; and a breakdown of one quantize into the
    pipeline's stages (each stage's best of ``repeat``, summed over the row blocks)."""
    w = (np.random.default_rng(seed).standard_t(5, (rows, cols)) * 0.02).astype(np.float16)
    cfg = QuantConfig(bits=4)
    module, _, fn = solvers.SOLVERS["exact"]["numba"].partition(":")
    optimize_scales = getattr(importlib.import_module(module), fn)
    smax = api.max_scale(w.dtype, cfg.qmax, cfg.scale_dtype)
    eqcore.quantize(w[:64], cfg, backend="numba")  # compiled
    x = cpu.split_outliers(w, cfg.sigma)[0]
    check_rows = min(rows, 256)  # rows are independent: the reference on the first ones
    ref = eqcore.quantize(w[:check_rows], cfg, backend="numpy")
    out = {"shape": (rows, cols), "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")}
    threads = numba.get_num_threads()
    for n_threads in (threads, 1):
        numba.set_num_threads(n_threads)
        (t_q, t_s), (c_q, c_s), (qt, _) = interleaved([lambda: eqcore.quantize(w, cfg, backend="numba"),
                                                      lambda: optimize_scales(x, cfg, smax)], repeat)
        out[n_threads] = (min(t_q), min(t_s), float(np.median(t_q)), float(np.median(t_s)), min(c_q), min(c_s))
    numba.set_num_threads(threads)
    bad = differing(qt.row_block(0, check_rows), ref)
    assert not bad, f"{', '.join(bad)} differ"
    out["bit-identical to the reference"] = f"yes (its first {check_rows} rows)"

    for n_threads, clock in ((threads, time.perf_counter), (1, time.process_time)):
        numba.set_num_threads(n_threads)
        stage = dict.fromkeys(STAGES, 0.0)
        stage[STAGES[0]] = best_time(lambda: api.check_weight(w, values=False), repeat, clock)[0]
        step = max(1, api.ROW_BLOCK_ELEMENTS // cols)
        blocks = api._Blocks(w, cfg, step)  # no one_pass: the three-step pipeline's float32 x in blocks.x
        for r in range(0, rows, step):
            wb = w[r:r + step]
            n = wb.shape[0]
            t, (xb, outliers) = best_time(lambda: cpu.split_outliers(wb, cfg.sigma, out=blocks.x[:n],
                                                                     work=blocks.work), repeat, clock)
            stage[STAGES[1]] += t
            t, s = best_time(lambda: optimize_scales(xb, cfg, smax), repeat, clock)
            stage[STAGES[2]] += t
            t, s = best_time(lambda: api.round_scales(api.cap_scales(s, w.dtype, cfg), cfg.scale_dtype), repeat, clock)
            stage[STAGES[3]] += t
            t, _ = best_time(lambda: cpu.encode(xb, s.astype(np.float32), cfg.bits, cfg.group_size,
                                                out=blocks.qweight[blocks.row:blocks.row + n]), repeat, clock)
            stage[STAGES[4]] += t
            blocks.add(s, outliers)
        t, staged = best_time(lambda: blocks.tensor(w, cfg), repeat, clock)
        stage[STAGES[5]] = t
        for f, a in qt.arrays().items():
            assert np.array_equal(getattr(staged, f), a), f"staged {f} differs"
        out["stages", n_threads] = stage
    numba.set_num_threads(threads)
    return out


def share_lines(res: dict) -> list[str]:
    rows, cols = res["shape"]
    threads = numba.get_num_threads()
    q, s, qm, sm, _, _ = res[threads]
    q1, s1, qm1, sm1, cq1, cs1 = res[1]
    lines = [f"### {rows} x {cols} float16, `eqcore.quantize(w, bits=4)` (defaults) on Numba", "",
             f"- load average (1 min) before: {res['load']:.2f}; result bit-identical to the NumPy reference: "
             f"{res['bit-identical to the reference']}",
             f"- {threads} threads: end to end {q * 1e3:.1f} ms, solver alone {s * 1e3:.1f} ms (best; medians "
             f"{qm * 1e3:.1f} / {sm * 1e3:.1f} ms)",
             f"- **work outside the solver: {100 * (1 - s / q):.1f}% of the total (target 10%)** "
             f"({threads} threads, wall; medians: {100 * (1 - sm / qm):.1f}%); "
             f"**of the CPU time on 1 thread: {100 * (1 - res[1][5] / res[1][4]):.1f}%** (independent of the load)",
             f"- 1 thread: end to end {q1 * 1e3:.1f} ms, solver alone {s1 * 1e3:.1f} ms: outside "
             f"{100 * (1 - s1 / q1):.1f}% (medians {100 * (1 - sm1 / qm1):.1f}%); CPU time (unaffected by other "
             f"processes' load) {cq1 * 1e3:.1f} ms vs {cs1 * 1e3:.1f} ms: outside {(cq1 - cs1) * 1e3:.1f} ms = "
             f"{100 * (1 - cs1 / cq1):.1f}%", "",
             f"| stage, run apart (best of each, summed over the row blocks) | {threads} threads, wall ms | % of end to end | "
             "1 thread, CPU ms | % of end to end |", "|---|---|---|---|---|"]
    st, st1 = res["stages", threads], res["stages", 1]
    for k in st:
        lines.append(f"| {k} | {st[k] * 1e3:.2f} | {100 * st[k] / q:.1f}% | {st1[k] * 1e3:.2f} | "
                     f"{100 * st1[k] / cq1:.1f}% |")
    out, out1 = sum(st.values()) - st["solver"], sum(st1.values()) - st1["solver"]
    rest, rest1 = q - sum(st.values()), cq1 - sum(st1.values())
    lines += [f"| all stages but the solver | {out * 1e3:.2f} | {100 * out / q:.1f}% | {out1 * 1e3:.2f} | "
              f"{100 * out1 / cq1:.1f}% |",
              f"| end to end minus all stages (Python glue and noise; below 0: what the one pass saves) | {rest * 1e3:.2f} | {100 * rest / q:.1f}% | "
              f"{rest1 * 1e3:.2f} | {100 * rest1 / cq1:.1f}% |", ""]
    return lines


def machine() -> dict:
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_name(),
            "cores": os.cpu_count(), "numba threads": numba.get_num_threads(),
            "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a",
            "python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=500, help="Adam steps for the Numba path")
    ap.add_argument("--ref-steps", type=int, default=10, help="Adam steps for the (slow) NumPy reference")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--sigma", type=float, default=3.0)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--share-shapes", default="4096x4096,11008x4096",
                    help="float16 weights whose default quantize is split into solver and the rest")
    ap.add_argument("--share-repeat", type=int, default=7, help="best of this many (each timing)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_quantize.md")
    args = ap.parse_args(argv)

    info = machine()
    for k, v in info.items():
        print(f"{k}: {v}")
    cfg = QuantConfig(bits=args.bits, sigma=args.sigma, group_size=args.group_size, steps=args.steps)
    w = (np.random.default_rng(args.seed).standard_t(5, (args.rows, args.cols)) * 0.02).astype(np.float32)
    outliers, mask = find_outliers(w, cfg.sigma, cfg.outlier_stats)
    x = w.copy()
    x[mask] = 0.0
    n = x.size

    # compile every kernel once on a small matrix (fresh cache dir: a real compile)
    small = x[:4, :96]
    t_compile, _ = best_time(lambda: (adam_numba.optimize_scales(small, cfg.replace(steps=2)),
                                  cpu.encode(small, np.ones((4, -(-96 // (cfg.group_size or 96))), np.float32),
                                             cfg.bits, cfg.group_size)))
    info["threading layer"] = numba.threading_layer()
    rows_out = []  # (what, numba, reference, speed-up)

    t_nb, s_nb = best_time(lambda: adam_numba.optimize_scales(x, cfg))
    cfg_ref = cfg.replace(steps=args.ref_steps)
    t_ref, s_ref = best_time(lambda: optimize_scales_reference(x, cfg_ref))
    same = np.mean(adam_numba.optimize_scales(x, cfg_ref) == s_ref)
    thr_nb, thr_ref = n * args.steps / t_nb, n * args.ref_steps / t_ref
    rows_out.append((f"optimize_scales ({args.steps} / {args.ref_steps} steps)", f"{t_nb:.2f} s", f"{t_ref:.2f} s", ""))
    rows_out.append(("  elements*steps / s", f"{thr_nb / 1e9:.3f} G", f"{thr_ref / 1e9:.4f} G", f"{thr_nb / thr_ref:.1f}x"))
    print(f"optimize_scales: numba {thr_nb / 1e9:.3f} G elem*step/s, numpy {thr_ref / 1e9:.4f}, x{thr_nb / thr_ref:.1f};"
          f" scales equal to reference at {args.ref_steps} steps: {same:.4%}")

    t_enc, q_nb = best_time(lambda: cpu.encode(x, s_nb, cfg.bits, cfg.group_size), repeat=3)
    t_enc_ref, q_ref = best_time(lambda: encode_reference(x, s_nb, cfg.bits, cfg.group_size))
    assert np.array_equal(q_nb, q_ref), "encode differs from the reference"
    gb = q_nb.nbytes / 1e9
    rows_out.append(("encode (codes + pack), GB/s of qweight", f"{gb / t_enc:.3f}", f"{gb / t_enc_ref:.4f}",
                     f"{t_enc_ref / t_enc:.1f}x"))
    rows_out.append(("  Melem / s", f"{n / t_enc / 1e6:.0f}", f"{n / t_enc_ref / 1e6:.1f}", ""))
    print(f"encode: numba {t_enc * 1e3:.1f} ms, numpy {t_enc_ref * 1e3:.0f} ms (bit-identical)")

    qt = QuantizedTensor(q_nb, s_nb, outliers.rowptr, outliers.cols, outliers.vals, shape=w.shape, dtype="float32",
                         bits=cfg.bits, group_size=cfg.group_size, sigma=cfg.sigma)
    for dt in ("float16", "bfloat16", "float32"):
        cpu.dequantize(qt, eqcore.dtypes.WEIGHT_DTYPES[dt])  # compile this output dtype
        t_dq, d_nb = best_time(lambda: cpu.dequantize(qt, eqcore.dtypes.WEIGHT_DTYPES[dt]), repeat=10)
        src = np.ones(qt.shape, d_nb.dtype)  # the memory-bound peer: a copy of the same output bytes
        t_copy, _ = best_time(lambda: src.copy(), repeat=10)  # a new array each time, as dequantize returns
        t_dq_ref, d_ref = best_time(lambda: dequantize_reference(qt, dt))
        assert np.array_equal(d_nb.view(np.uint8), d_ref.view(np.uint8)), f"dequantize {dt} differs"
        gb = d_nb.nbytes / 1e9
        rows_out.append((f"dequantize -> {dt}, GB/s of output", f"{gb / t_dq:.2f}", f"{gb / t_dq_ref:.3f}",
                         f"{t_dq_ref / t_dq:.1f}x"))
        rows_out.append((f"dequantize -> {dt} vs a copy of its output (ndarray.copy)", f"{t_dq * 1e3:.1f} ms",
                         f"copy {t_copy * 1e3:.1f} ms", f"{100 * t_copy / t_dq:.0f}% of copy speed"))
        print(f"dequantize {dt}: numba {t_dq * 1e3:.1f} ms, numpy {t_dq_ref * 1e3:.0f} ms (bit-identical); "
              f"copy of the output {t_copy * 1e3:.1f} ms ({100 * t_copy / t_dq:.0f}%)")

    eqcore.quantize(w[:64], cfg, backend="numba")  # compile the default solver's path first
    t_q, _ = best_time(lambda: eqcore.quantize(w, cfg, backend="numba"), repeat=3)
    print(f"eqcore.quantize(backend='numba') end to end: {t_q:.2f} s")
    peak = peak_in_fresh_process(args.rows, args.cols, args.seed)
    print(f"peak resident memory above the input during quantize: {peak:.2f}x the weight's fp16 size")
    share = []
    for shape in filter(None, args.share_shapes.split(",")):
        r, c = map(int, shape.lower().split("x"))
        share += share_lines(outside_share(r, c, args.seed, args.share_repeat))
        print("\n".join(share[-15:]))

    lines = [f"# CPU path: Numba vs NumPy reference ({args.rows} x {args.cols}, {args.bits}-bit, sigma {args.sigma}, "
             f"group_size {args.group_size})", "",
             "Generated by `" + " ".join(["python bench/cpu_quantize.py", *(sys.argv[1:] if argv is None else argv)]) + "`.", "",
             *(f"- {k}: {v}" for k, v in info.items()),
             f"- weights: Student-t(5) * 0.02, seed {args.seed}; outliers: {outliers.nnz} ({outliers.nnz / n:.3%})",
             f"- Numba compile of optimize_scales + encode (cold cache): {t_compile:.1f} s", "",
             "| step | numba | numpy reference | speed-up |", "|---|---|---|---|",
             *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows_out),
             "", f"- eqcore.quantize(backend='numba') end to end ({cfg.solver or 'default'} solver"
                 f"{'' if cfg.solver == 'adam' else ' (exact: steps unused)'}, outliers + scales + encode; best of 3"
                 f" after a compile): {t_q:.2f} s",
             f"- peak resident memory above the input during that quantize (RSS sampled every 0.5 ms): {peak:.2f}x "
             "the weight's fp16 size (the result itself is about 0.27x)",
             f"- scales of Numba vs reference at {args.ref_steps} steps identical for {same:.4%} of groups;"
             " encode and all dequantize outputs bit-identical.", "",
             "## Work outside the scale solver (issue 13: at most 10% of a default quantize)", "",
             "The solver alone: the registry's Numba exact `optimize_scales` on the whole float32 weight with "
             "its outliers zeroed; the rest is everything else a default quantize does (input check, the split, "
             "scale rounding, encode, assembly, Python). A default quantize does the split, the solver, the "
             "rounding and the encode of each row in one pass (`eqcore/backends/numba_quantize.py`); the stage "
             "table times them run apart, as the three-step pipeline the one pass replaces. Timings are interleaved and the best of "
             f"{args.share_repeat} is kept. On a shared machine (see the load) short parallel regions wait for a "
             "descheduled thread, so the wall times with all threads vary most; the 1-thread CPU times "
             "(`time.process_time`) do not depend on other processes.", "",
             *share]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
