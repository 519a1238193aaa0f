"""The `eqcore` command line: quantize, dequantize, inspect, demo."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys

from .backends import CHOICES
from .io.folders import OutputExistsError
from .config import QuantConfig
from .errors import ClusterError
from .grids import CODEBOOKS
from .interrupts import Terminated, raised_at_safe_points
from .layout import GRIDS, SCALE_DTYPES, SUPPORTED_BITS
from .outliers import SELECTORS
from .solvers import SOLVERS


def _config(a) -> QuantConfig:
    return QuantConfig(bits=a.bits, outliers=a.outliers, sigma=None if a.no_outliers else a.sigma,
                       outlier_stats=a.outlier_stats, outlier_fraction=a.outlier_fraction, group_size=a.group_size,
                       scale_dtype=a.scale_dtype, grid=a.grid, codebook=a.codebook, col_scales=a.col_scales,
                       solver=a.solver, steps=a.steps, lr=a.lr)


def _quant_options(p):
    d = QuantConfig()
    p.add_argument("--bits", type=int, default=d.bits, choices=SUPPORTED_BITS, help="code width (default %(default)s)")
    p.add_argument("--outliers", choices=SELECTORS, default=d.outliers,
                   help="how outliers are chosen: sigma (the paper's n-sigma rule), adpq (robust per-group "
                        "threshold), budget (the entries with the largest error) (default %(default)s)")
    p.add_argument("--sigma", type=float, default=d.sigma, help="outlier threshold in std devs (default %(default)s)")
    p.add_argument("--no-outliers", action="store_true", help="do not isolate outliers")
    p.add_argument("--outlier-stats", choices=("tensor", "row"), default=d.outlier_stats,
                   help="mean/std per tensor (paper) or per row (default %(default)s)")
    p.add_argument("--outlier-fraction", type=float, default=d.outlier_fraction,
                   help="share of the weights --outliers budget keeps exact (default %(default)s)")
    p.add_argument("--group-size", type=int, default=None, help="input columns per scale (default: one scale per row)")
    p.add_argument("--scale-dtype", choices=tuple(SCALE_DTYPES), default=d.scale_dtype,
                   help="how scales are stored; log8: a byte per group under a float16 scale per row "
                        "(default %(default)s)")
    p.add_argument("--grid", choices=GRIDS, default=d.grid,
                   help="the levels codes stand for: symmetric (the paper's), asymmetric (a zero-point per "
                        "group) or codebook (2^bits levels) (default %(default)s)")
    p.add_argument("--codebook", choices=CODEBOOKS, default=d.codebook,
                   help="codebook grid: fit (levels fitted to the tensor) or nf (normal-float) (default %(default)s)")
    p.add_argument("--col-scales", action="store_true", help="also a scale per input column (SINQ-like balancing)")
    p.add_argument("--steps", type=int, default=d.steps, help="Adam steps per scale (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate on s/s0 (default %(default)s)")
    p.add_argument("--solver", choices=tuple(SOLVERS), default=d.solver,
                   help="how scales are chosen: adam (the paper's), exact (the best symmetric scale), lloyd "
                        "(any grid) (default: exact for the symmetric grid, adam with --steps 0 i.e. max-abs scales; lloyd for the others)")
    p.add_argument("--backend", choices=CHOICES, default="auto",
                   help="numpy (reference), numba (CPU), cupy (GPU); auto: the GPU if there is one (default)")


def _conversion_options(p):
    """What every checkpoint conversion takes: replacing, links, progress."""
    p.add_argument("--force", action="store_true",
                   help="replace OUTPUT if it is an earlier eqcore output or empty (nothing else is ever replaced)")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="copy what symbolic links leaving the model folder point to (default: refuse them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(prog="eqcore", description="Data-free EasyQuant weight quantization.")
    p.add_argument("--version", action="version", version=f"eqcore {__version__}")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true",
                       help="show the full Python traceback on errors (also: EQCORE_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", parents=[debug], help="quantize a .safetensors file or sharded checkpoint folder")
    q.add_argument("input", help="a .safetensors file, or a model folder (sharded with an index, or not)")
    q.add_argument("output", help="where to write the quantized file or folder (must not exist, see --force)")
    _quant_options(q)
    q.add_argument("--skip", default=None, help="regex of tensor names to keep unquantized "
                   "(default: embeddings and lm_head; '' quantizes every 2-D weight)")
    q.add_argument("--bits-per-weight", type=float, default=None, metavar="B",
                   help="a budget over the quantized weights: each one's group size and outlier budget are chosen "
                        "to fit it (overrides --group-size and --outliers; e.g. 4.25)")
    q.add_argument("--min-features", type=int, default=16, help="leave matrices with a side smaller than this")
    where = q.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", default=None,
                       help="quantize on the running Dask cluster at ADDRESS (e.g. tcp://host:8786); its workers "
                            "must see INPUT at the same path (pip install eqcore[dask])")
    where.add_argument("--workers", type=int, metavar="N", default=None,
                       help="quantize on a new Dask cluster of N worker processes on this machine (one per GPU "
                            "with dask-cuda and GPUs) (pip install eqcore[dask])")
    _conversion_options(q)

    d = sub.add_parser("dequantize", parents=[debug], help="write a plain safetensors checkpoint any runtime can load")
    d.add_argument("input", help="an eqcore-quantized file or folder")
    d.add_argument("output", help="where to write the plain checkpoint (must not exist, see --force)")
    d.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="dtype of the dequantized weights (default: each weight's original dtype)")
    d.add_argument("--all-floats", action="store_true",
                   help="with --dtype: cast every other floating-point tensor (norms, embeddings) too")
    d.add_argument("--allow-none", action="store_true",
                   help="copy a checkpoint that holds no quantized tensor instead of refusing it")
    _conversion_options(d)

    i = sub.add_parser("inspect", parents=[debug], help="per-tensor bits, outlier fraction and relative error")
    i.add_argument("file", help="an eqcore-quantized file or folder")
    i.add_argument("--against", default=None, help="original checkpoint to recompute the error against")

    g = sub.add_parser("generate", parents=[debug], help="greedy text from a quantized causal-LM folder, "
                                                         "with tokens/s and memory")
    g.add_argument("model", help="an eqcore quantize output folder of a transformers causal LM (with its tokenizer)")
    g.add_argument("prompt", help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default %(default)s)")

    m = sub.add_parser("demo", parents=[debug], help="RTN vs outliers-only vs EasyQuant on all-MiniLM-L6-v2 (shipped on PyPI)")
    _quant_options(m)
    m.add_argument("--file", default=None, help="use this .safetensors file instead of the demo model")
    m.add_argument("--limit", type=int, default=None, help="only the first N matrices")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    debug = a.debug or os.environ.get("EQCORE_DEBUG", "") not in ("", "0")
    signals = raised_at_safe_points() if argv is None else contextlib.nullcontext()
    try:
        with signals:
            return _run(a)
    except Terminated:
        if debug:
            raise
        print(f"eqcore {a.command}: terminated; no output was left behind", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"eqcore {a.command}: interrupted; no output was left behind", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MemoryError as e:
        if debug:
            raise
        print(f"eqcore {a.command}: error: out of memory ({e or 'allocation failed'})", file=sys.stderr)
        return 2
    except (ValueError, OSError, TypeError, ImportError, ClusterError) as e:  # FormatError, disk full, no dask, ...
        if debug:
            raise
        msg = str(e) or type(e).__name__
        if isinstance(e, OutputExistsError):
            msg = f"{e.path} exists; pass --force to replace it (only an earlier eqcore output or an empty " \
                  "file or folder is ever replaced)"
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"eqcore {a.command}: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2


def _run(a) -> int:
    if a.command == "quantize":
        from .io.checkpoint import DEFAULT_SKIP, quantize_checkpoint

        skip = DEFAULT_SKIP if a.skip is None else a.skip
        try:
            re.compile(skip)
        except re.error as e:
            raise ValueError(f"--skip {skip!r} is not a valid regular expression ({e})") from None
        if a.workers is not None and a.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {a.workers}")
        from .io.distributed import cluster_client

        with cluster_client(a.scheduler, a.workers) as client:
            done = quantize_checkpoint(a.input, a.output, _config(a), skip=skip, min_features=a.min_features,
                                       backend=a.backend, overwrite=a.force, progress=not a.no_progress,
                                       follow_symlinks=a.follow_symlinks, bits_per_weight=a.bits_per_weight,
                                       client=client)
        bpw = "" if done["bits_per_weight"] is None else f", {done['bits_per_weight']:.4f} bits/weight"
        print(f"wrote {a.output} ({done['tensors']} tensors quantized{bpw})")
        for address, w in done.get("workers", {}).items():
            print(f"  worker {address}: {w['tasks']} tasks, {w['seconds']:.1f} s", file=sys.stderr)
    elif a.command == "dequantize":
        from .io.checkpoint import dequantize_checkpoint

        if a.all_floats and a.dtype is None:
            raise ValueError("--all-floats needs --dtype")
        dequantize_checkpoint(a.input, a.output, a.dtype, overwrite=a.force, progress=not a.no_progress,
                              follow_symlinks=a.follow_symlinks, allow_none=a.allow_none, all_floats=a.all_floats)
        print(f"wrote {a.output}")
    elif a.command == "inspect":
        from .io.checkpoint import inspect_checkpoint, inspect_totals

        rows = inspect_checkpoint(a.file, a.against)
        line = "{:<52} {:>14} {:>9} {:>4} {:>7} {:>9} {:>9}"
        print(line.format("tensor", "shape", "dtype", "bits", "bits/w", "outliers", "rel.err"))
        for r in rows:
            print(line.format(r["name"][-52:], "x".join(map(str, r["shape"])), r["dtype"], _fmt(r["bits"], "d"),
                              f"{r['bits_per_weight']:.3f}", _fmt(r["outlier_fraction"], ".3%"),
                              _fmt(r["rel_error"], ".5f")))
        t = inspect_totals(rows)
        print(line.format(f"all {t['quantized']} quantized of {len(rows)} tensors", f"{t['weights']:,}w", "", "",
                          _fmt(t["bits_per_weight"], ".3f"), _fmt(t["outlier_fraction"], ".3%"),
                          _fmt(t["rel_error"], ".5f")))
    elif a.command == "generate":
        from .generate import generate

        r = generate(a.model, a.prompt, a.max_new_tokens)
        print(a.prompt + r["text"])
        share = f" ({r['linear_bytes'] / r['linear_fp16_bytes']:.1%} of fp16)" if r["linear_fp16_bytes"] else ""
        print(f"{len(r['tokens'])} tokens in {r['seconds']:.2f} s ({r['tokens_per_s']:.1f} tokens/s; a two-token "
              f"warm-up before it took {r['warmup_seconds']:.2f} s); peak resident "
              f"memory {r['peak_rss'] / 2**20:.0f} MiB; quantized linear weights {r['linear_bytes'] / 2**20:.1f} MiB"
              f"{share}, {r['linear_kept_bytes'] / 2**20:.1f} MiB more kept by the matmul", file=sys.stderr)
    elif a.command == "demo":
        import time

        from .machine import cpu_name

        from .demo import compare_methods, demo_weights_path, format_table, load_matrices

        path = a.file or demo_weights_path()
        weights = load_matrices(path, a.limit)
        if not weights:
            raise ValueError(f"{path} holds no quantizable 2-D weights")
        cfg = _config(a)
        print(f"eqcore demo: {len(weights)} matrices from {path}")
        print(f"{cfg.describe()}; {cpu_name()}, {time.strftime('%Y-%m-%d')}")
        print(format_table(compare_methods(weights, cfg, a.backend, progress=not a.no_progress)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
