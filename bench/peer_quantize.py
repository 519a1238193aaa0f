"""Quantize speed side by side on LLaMA-7B's linear shapes: eqcore against the data-free peers, in one run.

    python bench/peer_quantize.py [--shapes 4096x4096 11008x4096 4096x11008] [--repeat 2] [--methods ...]

Each method turns the same float16 weight (Student-t(5) * 0.02, as a checkpoint holds it) into its
stored form at 4 bits, at its natural settings: eqcore's default (per-row scales, exact solver,
3-sigma row outliers) and its fitted codebook per row; HQQ g64 (``Quantizer.quantize``, optimize=True,
bit-packed); SINQ g64 (its defaults); bitsandbytes NF4 (blocks of 64); gguf-py's Q4_0 (NumPy). Time
from the float16 array to the stored form, conversions included; best of ``--repeat`` after a
warm-up on a small matrix (compilation), or one call where that takes over SLOW seconds.
Per-weight times are extrapolated to all linear weights of
LLaMA-7B (32 layers of 4 x 4096x4096, 2 x 11008x4096, 1 x 4096x11008). Writes
bench/results/peer_quantize.md. A peer that is not installed (SINQ and bitsandbytes are not in the
test set-up) is left out: the report names it and stderr says how to install it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SINQ_AUTO_PATCH", "0")

import numpy as np  # noqa: E402

from bench.timing import best_time  # noqa: E402
from eqcore.machine import cpu_name  # noqa: E402

LLAMA7B_LAYER = {"4096x4096": 4, "11008x4096": 2, "4096x11008": 1}  # linear weights per layer, by shape
LAYERS = 32
SLOW = 10.0  # seconds: a method whose first call takes longer is not repeated


def _torch32(w):
    import torch

    return torch.from_numpy(w).to(torch.float32)


def eqcore_default(w):
    import eqcore

    return eqcore.quantize(w, bits=4)


def eqcore_codebook(w):
    import eqcore

    return eqcore.quantize(w, bits=4, grid="codebook", outlier_stats="row", scale_dtype="float16")


def hqq_g64(w):
    import torch
    from hqq.core.quantize import Quantizer

    with torch.inference_mode():
        return Quantizer.quantize(_torch32(w), nbits=4, channel_wise=True, group_size=64, optimize=True, axis=1,
                                  bitpack=True, device="cpu")


def sinq_g64(w):
    import torch

    sys.modules.setdefault("datasets", types.SimpleNamespace(load_dataset=None))  # calibration-only import
    from sinq.quantizer import Quantizer

    with torch.inference_mode():
        return Quantizer.quantize(_torch32(w), None, nbits=4, group_size=64, axis=1, device="cpu", bitpack=True,
                                  method="sinq")


def bnb_nf4(w):
    from bitsandbytes.functional import quantize_4bit

    return quantize_4bit(_torch32(w), blocksize=64, quant_type="nf4")


def gguf_q4_0(w):
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(w.astype(np.float32), GGMLQuantizationType.Q4_0)


INSTALL = {"HQQ g64": "bash tests/install.sh", "SINQ g64": "pip install --no-deps sinq",
           "bitsandbytes NF4": "pip install --no-deps bitsandbytes", "gguf-py Q4_0": "pip install gguf"}
METHODS = {"eqcore default": eqcore_default, "eqcore codebook per row": eqcore_codebook, "HQQ g64": hqq_g64,
           "SINQ g64": sinq_g64, "bitsandbytes NF4": bnb_nf4, "gguf-py Q4_0": gguf_q4_0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(LLAMA7B_LAYER))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "peer_quantize.md"))
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count())
    loads = [os.getloadavg()[0]]
    times = {}  # (method, shape) -> seconds
    missing = []
    for m in list(a.methods):
        try:
            METHODS[m]((np.random.default_rng(1).standard_t(5, (256, 512)) * 0.02).astype(np.float16))  # warm-up
        except ImportError as e:  # a peer that is not installed is left out, and the report says so
            print(f"skipping {m}: {e} (install it with: {INSTALL.get(m, 'pip')})", file=sys.stderr)
            missing.append(m)
            a.methods.remove(m)
    for shape in a.shapes:
        rows, cols = map(int, shape.split("x"))
        w = (np.random.default_rng(0).standard_t(5, (rows, cols)) * 0.02).astype(np.float16)
        for m in a.methods:
            t = best_time(lambda: METHODS[m](w), 1)[0]
            if t < SLOW:  # the slow peers are timed once
                t = min(t, best_time(lambda: METHODS[m](w), a.repeat - 1)[0])
            times[m, shape] = t
            print(f"{shape} {m}: {times[m, shape]:.3f} s", flush=True)
        loads.append(os.getloadavg()[0])
    lines = [f"# Quantize speed side by side ({datetime.date.today().isoformat()})", "",
             f"- machine: {cpu_name()}, {os.cpu_count()} cores, {platform.platform()}; torch {torch.__version__} "
             f"with {torch.get_num_threads()} threads; 1-min load average {min(loads):.2f}-{max(loads):.2f}",
             f"- command: `python bench/peer_quantize.py {' '.join(argv or sys.argv[1:])}`",
             "- 4 bits, float16 Student-t(5) * 0.02 weights, best of "
             f"{a.repeat} after a warm-up (one call where it took over {SLOW:g} s); each method at its natural settings (see the script's docstring)",
             "- LLaMA-7B: per-weight time of the shapes measured, weighted as in a layer "
             "(4 x 4096x4096, 2 x 11008x4096, 1 x 4096x11008), times 32 layers",
             *([f"- not measured (not installed): {', '.join(missing)}"] if missing else []), "",
             "| method | " + " | ".join(f"{s} (s)" for s in a.shapes) + " | ns/weight | LLaMA-7B (min) | vs eqcore default |",
             "|---|" + "---|" * (len(a.shapes) + 3)]
    base = None
    for m in a.methods:
        secs = [times[m, s] for s in a.shapes]
        ns = 1e9 * sum(secs) / sum(np.prod(list(map(int, s.split("x")))) for s in a.shapes)
        layer = sum(n * (times[m, s] if (m, s) in times else ns * 1e-9 * np.prod(list(map(int, s.split("x")))))
                    for s, n in LLAMA7B_LAYER.items())  # a shape not measured: at the measured ns/weight
        minutes = LAYERS * layer / 60
        if m == "eqcore default":
            base = minutes
        ratio = f"{minutes / base:.2f}x" if base else ""
        lines.append(f"| {m} | " + " | ".join(f"{t:.2f}" for t in secs) + f" | {ns:.1f} | {minutes:.2f} | {ratio} |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
