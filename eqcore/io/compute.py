"""What converting a checkpoint computes for one weight (or a block of its rows), wherever it
runs: the quantized tensor and its reconstruction error, measured so that row blocks add up
to exactly the whole tensor's figure."""
from __future__ import annotations

import numpy as np

from .. import backends
from ..api import dequantize, quantize
from ..config import QuantConfig
from ..interop import to_host
from ..outliers import row_chunks


def error_sums(w_hat: np.ndarray, w: np.ndarray, fast: bool = True) -> list[tuple[float, float]]:
    """(sum of squared errors, sum of squares of w) in float64 over each of ``row_chunks(w.shape)``:
    what :func:`relative_error` adds up, so that row blocks of a tensor can be measured apart.
    This is the reference; host arrays go through the Numba kernel (one pass, parallel over the
    chunks; equal up to float summation order) unless ``fast`` is False."""
    if tuple(w_hat.shape) != tuple(w.shape):
        raise ValueError(f"shapes differ: {tuple(w_hat.shape)} against {tuple(w.shape)}")
    if fast and isinstance(w_hat, np.ndarray) and isinstance(w, np.ndarray) and w.ndim == 2 and w.size:
        first = next(iter(row_chunks(w.shape)))
        sums = backends.get("numba").error_sums(w_hat, w, first.stop - first.start)
        if sums is not None:
            return sums
    out = []
    for rows in row_chunks(w.shape):
        w64 = w[rows].astype(np.float64)
        out.append((float(np.sum((w_hat[rows].astype(np.float64) - w64) ** 2)), float(np.sum(w64 ** 2))))
    return out


def combine_errors(sums) -> float:
    """||w_hat - w||_F / ||w||_F from :func:`error_sums` (0 for an all-zero w reproduced exactly)."""
    err = ref = 0.0
    for e, r in sums:
        err += e
        ref += r
    return float(np.sqrt(err / ref)) if ref > 0 else float(np.sqrt(err))


def relative_error(w_hat: np.ndarray, w: np.ndarray) -> float:
    """||w_hat - w||_F / ||w||_F in float64 (0 for an all-zero w reproduced exactly)."""
    return combine_errors(error_sums(w_hat, w))


def quantize_rows(w: np.ndarray, config: QuantConfig, backend: str):
    """(QuantizedTensor, :func:`error_sums` against ``w``): one weight, or a block of its rows when
    ``config.rows_independent``, quantized on ``backend`` (a resolved name) as a checkpoint is."""
    qt = quantize(backends.get(backend).asarray(w), config, backend=backend)
    return qt, error_sums(to_host(dequantize(qt, np.float32, backend=backend)), w)
