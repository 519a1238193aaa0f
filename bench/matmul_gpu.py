"""GPU benchmark: quantized matmul (eqcore) vs torch fp16 F.linear (cuBLAS) on LLaMA-7B shapes.

    python bench/matmul_gpu.py                 # writes bench/results/matmul_gpu.md
    python bench/matmul_gpu.py --quick         # fewer repeats

For each weight shape and batch: the kernel time of eqcore's GPU path (the GEMV kernel for batches
of up to 8 rows, the dequantize kernel + cuBLAS baseline beyond; launch plans built once, as in
bench/gpu_kernels.py), the time of a whole ``eqcore.matmul`` call (argument and CSR checks
included), and F.linear on the fp16 weight. GB/s counts the weight bytes each reads once (every
byte the quantized tensor stores; 2 bytes per fp16 weight), against a device-to-device copy
measured in the same run (its GB/s counts the bytes read and written). Refuses to run (exit code 2)
without a CUDA device or without a CUDA build of torch.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_kernels import gpu_or_exit, timed, write_report  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # LLaMA-7B: q/k/v/o, gate/up, down
BATCHES = [1, 4, 8, 16, 64]
COPY_BYTES = 1 << 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "matmul_gpu.md")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=None, help="columns per scale (default: one per row)")
    p.add_argument("--repeats", type=int, default=100, help="timed runs per case (median)")
    p.add_argument("--quick", action="store_true", help="repeats 10")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats = 10
    if a.repeats < 1:
        p.error("repeats must be >= 1")
    return a


def kernels(cp, x, qt):
    """(path name, a function that runs eqcore's GPU path for x @ W^T without the per-call checks)."""
    import numpy as np

    from eqcore.backends import cupy as gpu
    from eqcore.backends import launch, nvrtc

    arrays, grid = gpu._tensor(qt)
    if x.shape[0] <= launch.GEMV_BATCHES[-1]:
        out = cp.empty((x.shape[0], qt.shape[0]), np.float32)
        plan = launch.gemv_launch(x, *arrays, out, qt.bits, qt.group_size, **grid)
        fn = nvrtc.get_function(plan.name)
        return "GEMV", lambda: fn(plan.grid, plan.block, plan.args)
    w = cp.empty(qt.shape, np.float32)
    plan = launch.dequant_launch(*arrays, w, qt.bits, qt.group_size, **grid)
    fn = nvrtc.get_function(plan.name)
    return "dequant + cuBLAS", lambda: (fn(plan.grid, plan.block, plan.args), cp.matmul(x, w.T))


def copy_gbs(cp, repeats: int) -> float:
    """Device-to-device copy bandwidth, GB/s of bytes read plus bytes written."""
    src, dst = cp.zeros(COPY_BYTES, cp.uint8), cp.empty(COPY_BYTES, cp.uint8)
    t = timed(cp, lambda: dst.data.copy_from_device_async(src.data, COPY_BYTES), repeats)
    return 2 * COPY_BYTES / t / 1e9


def bench(cp, torch, args) -> list[dict]:
    import eqcore

    rs = cp.random.RandomState(0)
    rows_out = []
    for rows, cols in SHAPES:
        w = (rs.standard_normal((rows, cols), dtype=cp.float32) * 0.02).astype(cp.float16)
        qt = eqcore.quantize(w, bits=args.bits, group_size=args.group_size, steps=0)  # max-abs scales, 3-sigma outliers
        wt = torch.from_dlpack(w)
        for batch in BATCHES:
            x = rs.standard_normal((batch, cols), dtype=cp.float32)
            xt = torch.from_dlpack(x).half()
            path, run = kernels(cp, x, qt)
            t_kernel = timed(cp, run, args.repeats)
            t_call = timed(cp, lambda: eqcore.matmul(x, qt), args.repeats)
            t_fp16 = timed(cp, lambda: torch.nn.functional.linear(xt, wt), args.repeats)  # same (legacy) stream
            rows_out.append(dict(shape=f"{rows}x{cols}", batch=batch, path=path, q_bytes=qt.nbytes,
                                 fp16_bytes=w.nbytes, t_kernel=t_kernel, t_call=t_call, t_fp16=t_fp16,
                                 outliers=float(qt.outlier_fraction)))
            print(f"{rows}x{cols} batch {batch:3d} {path:16s} {t_kernel * 1e6:8.1f} us (call {t_call * 1e6:8.1f}), "
                  f"fp16 F.linear {t_fp16 * 1e6:8.1f} us", flush=True)
        del w, wt, qt
    return rows_out


def table(rows: list[dict], copy: float) -> list[str]:
    """The results as Markdown table lines; ``copy`` is the measured copy bandwidth (GB/s)."""
    lines = ["| shape | batch | eqcore path | kernel (us) | eqcore.matmul (us) | fp16 F.linear (us) | fp16 / kernel | "
             "weight GB/s, eqcore | weight GB/s, fp16 | eqcore / copy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gbs_q, gbs_h = r["q_bytes"] / r["t_kernel"] / 1e9, r["fp16_bytes"] / r["t_fp16"] / 1e9
        lines.append(f"| {r['shape']} | {r['batch']} | {r['path']} | {r['t_kernel'] * 1e6:.1f} | {r['t_call'] * 1e6:.1f} | "
                     f"{r['t_fp16'] * 1e6:.1f} | {r['t_fp16'] / r['t_kernel']:.2f} | {gbs_q:.0f} | {gbs_h:.0f} | "
                     f"{gbs_q / copy:.2f} |")
    return lines


def report(cp, torch, args, rows: list[dict], copy: float) -> str:
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return "\n".join([
        "# Quantized matmul on the GPU vs fp16 F.linear", "",
        f"- device: {name} (cc {props['major']}.{props['minor']})",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- command: python bench/matmul_gpu.py {' '.join(sys.argv[1:])}",
        f"- cupy {cp.__version__}, torch {torch.__version__}, CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}",
        f"- weights: random fp16, {args.bits}-bit, group size {args.group_size or 'row'}, max-abs scales, 3-sigma "
        f"outliers ({rows[0]['outliers']:.2%} of the first matrix); x float32 (eqcore), fp16 (F.linear)",
        f"- median of {args.repeats} runs (CUDA events); device-to-device copy: {copy:.0f} GB/s (read + write)", "",
        "Weight GB/s: bytes of the weight as stored (quantized: codes, scales, outliers) over the kernel time; "
        "`eqcore / copy` compares it with the copy's bandwidth. eqcore.matmul adds the argument and CSR checks "
        "(host synchronisations) to the kernel time.", "",
        *table(rows, copy), ""])


def main(argv=None) -> int:
    args = parse_args(argv)
    cp = gpu_or_exit()
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        print("matmul_gpu.py: needs torch with CUDA for the fp16 F.linear baseline", file=sys.stderr)
        return 2
    copy = copy_gbs(cp, args.repeats)
    rows = bench(cp, torch, args)
    write_report(args.out, report(cp, torch, args, rows, copy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
