"""GPU: the launch geometry of the GEMV and dequant kernels swept on LLaMA-7B shapes, to choose
eqcore.backends.launch's GV_WARPS, GV_ROWS and DQ_THREADS (compile-time -D defines).

    python bench/gpu_geometry.py               # writes bench/results/gpu_geometry.md

Every variant is checked where it runs: the GEMV against x @ dequantize(W, float32).T in float64
(the matmul contract's bound, 1e-5 * |x| @ |W|.T), the dequant bit for bit against the default
geometry's output. Times: median of --repeats launches (CUDA events), plans built once.
Refuses to run (exit code 2) without a CUDA device.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_kernels import gpu_or_exit, timed, write_report  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
# (warps per block, rows per block): the warps split the rows' columns; the first is the default
GEMV_VARIANTS = [(4, 4), (1, 4), (2, 4), (8, 4), (4, 2), (8, 2), (2, 2)]
DQ_VARIANTS = [128, 256, 64]


def use(launch, nvrtc, **values):
    """Set launch-geometry constants (recompiling what depends on them)."""
    for k, v in values.items():
        setattr(launch, k, v)
    launch.DQ_TILE = launch.DQ_THREADS * launch.BLOCK
    nvrtc._function.cache_clear()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_geometry.md")
    p.add_argument("--repeats", type=int, default=50)
    a = p.parse_args(argv)
    cp = gpu_or_exit()
    import numpy as np

    import eqcore
    from eqcore.backends import cupy as gpu
    from eqcore.backends import launch, nvrtc

    default = dict(GV_WARPS=launch.GV_WARPS, GV_ROWS=launch.GV_ROWS, DQ_THREADS=launch.DQ_THREADS)
    rs = cp.random.RandomState(0)
    gemv, deq = [], []
    for rows, cols in SHAPES:
        w = (rs.standard_normal((rows, cols), dtype=cp.float32) * 0.02).astype(cp.float16)
        qt = eqcore.quantize(w, bits=4, steps=0)
        arrays, grid = gpu._tensor(qt)
        W = eqcore.dequantize(qt, "float32").astype(cp.float64)
        for nb in (1, 4, 8):
            x = rs.standard_normal((nb, cols), dtype=cp.float32)
            x64 = x.astype(cp.float64)
            exact, bound = x64 @ W.T, 1e-5 * (cp.abs(x64) @ cp.abs(W).T) + 1e-30
            for warps, per in GEMV_VARIANTS:
                use(launch, nvrtc, GV_WARPS=warps, GV_ROWS=per)
                out = cp.full((nb, rows), cp.nan, cp.float32)
                plan = launch.gemv_launch(x, *arrays, out, qt.bits, qt.group_size, **grid, warps=warps)
                fn = nvrtc.get_function(plan.name)
                t = timed(cp, lambda: fn(plan.grid, plan.block, plan.args), a.repeats)
                ok = bool((cp.abs(out.astype(cp.float64) - exact) <= bound).all())
                gemv.append(dict(shape=f"{rows}x{cols}", batch=nb, warps=warps, per=per, us=t * 1e6, ok=ok,
                                 gbs=qt.nbytes / t / 1e9))
                print(f"gemv {rows}x{cols} batch {nb} warps {warps} rows/block {per}: {t * 1e6:7.1f} us "
                      f"{'ok' if ok else 'WRONG'}", flush=True)
        use(launch, nvrtc, **default)
        ref = eqcore.dequantize(qt, "float16")
        for threads in DQ_VARIANTS:
            use(launch, nvrtc, DQ_THREADS=threads)
            out = cp.empty((rows, cols), cp.float16)
            plan = launch.dequant_launch(*arrays, out, qt.bits, qt.group_size, **grid)
            fn = nvrtc.get_function(plan.name)
            t = timed(cp, lambda: fn(plan.grid, plan.block, plan.args), a.repeats)
            ok = bool((out.view(cp.uint16) == ref.view(cp.uint16)).all())
            deq.append(dict(shape=f"{rows}x{cols}", threads=threads, us=t * 1e6, ok=ok))
            print(f"dequant {rows}x{cols} fp16 threads {threads}: {t * 1e6:7.1f} us {'ok' if ok else 'WRONG'}",
                  flush=True)
        use(launch, nvrtc, **default)
        del w, W, qt, arrays
    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    lines = ["# GPU launch geometry sweep", "",
             f"- device: {name}; date {datetime.datetime.now().isoformat(timespec='seconds')}; "
             f"command: python bench/gpu_geometry.py; cupy {cp.__version__}",
             f"- 4-bit, per-row scales, 3-sigma outliers; median of {a.repeats} launches (CUDA events); "
             f"default geometry {default}", "",
             "## GEMV (x float32, batch rows)", "",
             "| shape | batch | warps/block | rows/block | us | weight GB/s | correct |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['batch']} | {r['warps']} | {r['per']} | {r['us']:.1f} | {r['gbs']:.0f} | "
              f"{'yes' if r['ok'] else 'NO'} |" for r in gemv]
    lines += ["", "## Dequant to float16", "", "| shape | threads/block | us | bit-identical |", "|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['threads']} | {r['us']:.1f} | {'yes' if r['ok'] else 'NO'} |" for r in deq]
    write_report(a.out, "\n".join(lines) + "\n")
    return 0 if all(r["ok"] for r in gemv + deq) else 1


if __name__ == "__main__":
    sys.exit(main())
