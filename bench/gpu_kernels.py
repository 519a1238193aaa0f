"""GPU benchmark: fused dequant+scatter bandwidth vs a device-to-device copy, and
end-to-end GPU quantize time for the LLaMA-7B linear layers.

    python bench/gpu_kernels.py                 # writes bench/results/gpu_kernels.md
    python bench/gpu_kernels.py --quick         # fewer repeats, 50 Adam steps

Refuses to run (exit code 2) without a CUDA device.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path



ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEQUANT_SHAPES = [(4096, 4096), (11008, 4096)]
OUTLIER_FRACTIONS = [0.0, 0.001, 0.01]
OUT_DTYPES = ["float16", "bfloat16"]
# LLaMA-7B, one decoder layer: q, k, v, o (4096x4096), gate, up (11008x4096), down (4096x11008)
LLAMA7B_LAYER = [((4096, 4096), 4), ((11008, 4096), 2), ((4096, 11008), 1)]
LLAMA7B_LAYERS = 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_kernels.md")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--repeats", type=int, default=50, help="timed dequant launches per case (median)")
    p.add_argument("--steps", type=int, default=500, help="steps of the Adam run timed beside the default")
    p.add_argument("--quantize-repeats", type=int, default=2, help="timed quantize runs per matrix shape")
    p.add_argument("--full-model", action="store_true", help="quantize all 32 x 7 matrices instead of extrapolating")
    p.add_argument("--quick", action="store_true", help="repeats 5, steps 50, quantize repeats 1")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.steps, a.quantize_repeats = 5, 50, 1
    if a.repeats < 1 or a.steps < 0 or a.quantize_repeats < 1:
        p.error("repeats must be >= 1 and steps >= 0")
    return a


def gpu_or_exit():
    """The cupy module, or exit code 2 with a clear message when there is no CUDA device."""
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no cupy, no driver, no device
        n, err = 0, e
    else:
        err = None
    if n < 1:
        print(f"{Path(sys.argv[0]).name}: no CUDA device available ({err or 'device count is 0'}); "
              "this benchmark needs a GPU.", file=sys.stderr)
        sys.exit(2)
    return cupy


def write_report(path: Path, text: str) -> None:
    """Write a benchmark's Markdown report to ``path`` (creating its folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"\nwrote {path}")


def timed(cp, fn, repeats: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return statistics.median(times)


def synthetic_quantized(cp, rows, cols, bits, frac, dtype, seed=0):
    """Random packed codes, scales and a CSR with ``frac`` of the entries as outliers (on the GPU)."""
    from eqcore.layout import packed_cols

    rs = cp.random.RandomState(seed)
    qweight = rs.randint(0, 2**32, size=(rows, packed_cols(cols, bits)), dtype=cp.int64).astype(cp.uint32)
    scales = rs.uniform(1e-3, 1e-2, size=(rows, 1)).astype(cp.float32)
    if frac > 0:
        w = rs.uniform(0, 1, size=(rows, cols)) < frac
        r, c = cp.nonzero(w)
        rowptr = cp.zeros(rows + 1, cp.int32)
        rowptr[1:] = cp.cumsum(cp.bincount(r, minlength=rows))
        ocols = c.astype(cp.uint16 if cols <= 65536 else cp.int32)
        vals = rs.standard_normal(int(r.size)).astype(cp.float32).astype(dtype)
        del w, r, c
    else:
        rowptr = cp.zeros(rows + 1, cp.int32)
        ocols, vals = cp.zeros(0, cp.uint16), cp.zeros(0, dtype)
    return qweight, scales, rowptr, ocols, vals


def bench_dequant(cp, args):
    from eqcore.backends import launch, nvrtc
    from eqcore.dtypes import weight_dtype

    rows_out = []
    for rows, cols in DEQUANT_SHAPES:
        for dname in OUT_DTYPES:
            dtype = weight_dtype(dname)
            out = cp.empty((rows, cols), dtype)
            src = cp.zeros((rows, cols), dtype)
            t_copy = timed(cp, lambda: out.data.copy_from_device_async(src.data, out.nbytes), args.repeats)
            for frac in OUTLIER_FRACTIONS:
                parts = synthetic_quantized(cp, rows, cols, args.bits, frac, dtype)
                plan = launch.dequant_launch(*parts, out, args.bits, None)
                fn = nvrtc.get_function(plan.name)
                t = timed(cp, lambda: fn(plan.grid, plan.block, plan.args), args.repeats)
                read = sum(a.nbytes for a in parts)
                rows_out.append(dict(shape=f"{rows}x{cols}", dtype=dname, frac=frac, nnz=int(parts[4].size),
                                     t_us=t * 1e6, gbs_out=out.nbytes / t / 1e9, gbs_all=(read + out.nbytes) / t / 1e9,
                                     copy_us=t_copy * 1e6, copy_gbs=2 * out.nbytes / t_copy / 1e9,
                                     vs_copy=t / t_copy))
                print(f"dequant {rows}x{cols} {dname} outliers {frac:.1%}: {t * 1e6:8.1f} us "
                      f"{rows_out[-1]['gbs_all']:7.1f} GB/s (copy of the output: {t_copy * 1e6:.1f} us, "
                      f"{rows_out[-1]['copy_gbs']:.1f} GB/s)", flush=True)
                del parts
    return rows_out


def quantize_configs(args):
    """(label, QuantConfig): the default settings (exact solver), and the paper's Adam for comparison."""
    import eqcore

    return [("default", eqcore.QuantConfig(bits=args.bits)),
            (f"adam {args.steps}", eqcore.QuantConfig(bits=args.bits, solver="adam", steps=args.steps))]


def row_errors(cp, w, qt):
    """Each row's squared reconstruction error (float64) of ``qt`` against the fp16 weight ``w``."""
    import eqcore

    d = eqcore.dequantize(qt, "float32").astype(cp.float64) - w.astype(cp.float64)
    return (d * d).sum(axis=1)


def bench_quantize(cp, args):
    import eqcore

    rs = cp.random.RandomState(1)
    results = []
    for (rows, cols), count in LLAMA7B_LAYER:
        w = (rs.standard_t(5, size=(rows, cols)) * 0.02).astype(cp.float16)  # heavy tails, like LLM weights
        errors = {}
        for label, cfg in quantize_configs(args):
            qt = eqcore.quantize(w, cfg)  # compile / warm up
            errors[label] = row_errors(cp, w, qt)
            cp.cuda.Device().synchronize()
            times = []
            n = count * LLAMA7B_LAYERS if args.full_model else args.quantize_repeats
            for _ in range(n):
                start, stop = cp.cuda.Event(), cp.cuda.Event()
                start.record()
                eqcore.quantize(w, cfg)
                stop.record()
                stop.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
            t = statistics.median(times)
            results.append(dict(config=label, describe=cfg.describe(), shape=f"{rows}x{cols}", count=count * LLAMA7B_LAYERS,
                                t_s=t, total_s=t * count * LLAMA7B_LAYERS, loss=float(errors[label].sum()),
                                measured=sum(times) if args.full_model else None))
            print(f"quantize {rows}x{cols} fp16, {label} ({cfg.describe()}): {t:.3f} s each, "
                  f"x{count * LLAMA7B_LAYERS} = {t * count * LLAMA7B_LAYERS:.1f} s, loss {results[-1]['loss']:.4g}",
                  flush=True)
        base, other = errors["default"], errors[f"adam {args.steps}"]
        results[-2]["rows_le_adam"] = float((base <= other * (1 + 1e-6)).mean())
        del w, errors
    return results


def report(cp, args, deq, qnt) -> str:
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    lines = [
        "# GPU kernels benchmark", "",
        f"- device: {name} (cc {props['major']}.{props['minor']})",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- cupy {cp.__version__}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}, bits {args.bits}, "
        f"per-row scales, median of {args.repeats} launches (CUDA events)", "",
        "## Fused dequant + outlier scatter vs a device-to-device copy of the output", "",
        "GB/s (all) counts every byte read (codes, scales, CSR) and written; the copy moves the "
        "output's bytes once each way (read + write). `time / copy` compares the kernel with that copy.", "",
        "| shape | out | outliers | nnz | time (us) | GB/s out | GB/s all | copy (us) | copy GB/s | time / copy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['shape']} | {r['dtype']} | {r['frac']:.1%} | {r['nnz']} | {r['t_us']:.1f} | {r['gbs_out']:.0f} | "
              f"{r['gbs_all']:.0f} | {r['copy_us']:.1f} | {r['copy_gbs']:.0f} | {r['vs_copy']:.2f} |" for r in deq]
    how = "all matrices quantized" if args.full_model else f"median of {args.quantize_repeats} runs per shape, times the count"
    lines += ["", "## End-to-end GPU quantize, LLaMA-7B linear layers (fp16 Student-t(5) weights)", "",
              f"Outliers, CSR, scales, encode; {how}. Loss: the sum of squared errors of the dequantized "
              "weight; `rows <= adam`: the share of rows whose error is at most Adam's.", ""]
    for label in dict.fromkeys(r["config"] for r in qnt):
        rs = [r for r in qnt if r["config"] == label]
        lines += [f"**{label}**: {rs[0]['describe']}", "",
                  "| shape | matrices | s each | s total | loss | rows <= adam |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['count']} | {r['t_s']:.3f} | {r['total_s']:.1f} | {r['loss']:.5g} | "
                  f"{format(r['rows_le_adam'], '.2%') if 'rows_le_adam' in r else '-'} |" for r in rs]
        lines += [f"| **all 32 layers** | {sum(r['count'] for r in rs)} | | **{sum(r['total_s'] for r in rs):.1f}** | | |", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    cp = gpu_or_exit()
    deq = bench_dequant(cp, args)
    qnt = bench_quantize(cp, args)
    write_report(args.out, report(cp, args, deq, qnt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
