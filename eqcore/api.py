"""The one pipeline: quantize = outliers -> scales (a solver) -> codes -> pack; dequantize;
pack and unpack. Each dispatches to the backend where the data lives
(:mod:`eqcore.backends`); the scale search to the configured solver (:mod:`eqcore.solvers`).
"""
from __future__ import annotations

import numpy as np

from . import backends, solvers
from .config import QuantConfig
from .dtypes import FLOAT32_MAX, NONFINITE, all_finite, dtype_name, finite_max, weight_dtype
from .grids import codebook_for, column_scales
from .interop import array_module, as_array, is_cupy
from .layout import SCALE_DTYPES, group_layout, max_scale, packed_cols, round_scales, round_zeros, stored_scales
from .outliers import concat_csr, kept, select, to_csr
from .solvers.objective import dequant_error
from .tensor import QuantizedTensor


def check_weight(w, *, values: bool = True):
    """Refuse anything but a finite, non-empty 2-D float matrix, with a clear message.
    ``values=False`` checks only the form (the fused split finds NaN and Inf itself)."""
    shape = getattr(w, "shape", None)
    if shape is None:
        raise TypeError(f"expected an array, got {type(w).__name__}")
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D weight matrix (out_features, in_features), got shape {tuple(shape)}")
    if 0 in shape:
        raise ValueError(f"cannot quantize an empty matrix of shape {tuple(shape)}")
    weight_dtype(w.dtype)
    if not values:
        return w
    xp = array_module(w)
    if not all_finite(w):
        raise ValueError(NONFINITE)
    if w.dtype == np.float64:
        big = float(xp.abs(w).max())
        if big > FLOAT32_MAX:
            raise ValueError(f"float64 weight has values beyond float32's range (max |w| = {big:.3g}); "
                             "eqcore computes codes and scales in float32")
    return w


def quantize(w, config: QuantConfig | None = None, *, backend: str = "auto", **options) -> QuantizedTensor:
    """Quantize a 2-D weight matrix (out_features, in_features) with EasyQuant.

    ``config`` or keyword options (``bits=4, sigma=3.0, group_size=None, steps=500, ...``,
    see :class:`QuantConfig`). Accepts NumPy, CuPy or any DLPack array; the result
    lives where the data does. ``backend``: "auto", "numpy" (reference), "numba", "cupy".
    """
    config = config or _DEFAULT
    if options:
        config = config.replace(**options)
    w = check_weight(as_array(w), values=False)
    name = backends.select(backend, w)
    be = backends.get(name)
    w = be.asarray(w)
    fused = _fused_split(be, config, w.dtype)
    if not fused:
        check_weight(w)
    step = max(1, ROW_BLOCK_ELEMENTS // w.shape[1])
    if name != "cupy" and config.rows_independent:  # bounded memory, same result
        if fused and config.grid == "symmetric":  # into the result's arrays, block by block
            out = _Blocks(w, config, step, backends.one_pass(name) if _one_pass(config) else None)
            for r in range(0, w.shape[0], step):
                _quantize_checked(w[r:r + step], config, name, out)
            return out.tensor(w, config)
        if w.shape[0] > step:
            return QuantizedTensor.stack_rows(_quantize_checked(w[r:r + step], config, name)
                                              for r in range(0, w.shape[0], step))
    return _quantize_checked(w, config, name)


_DEFAULT = QuantConfig()  # frozen: shared by every call that gives none
ROW_BLOCK_ELEMENTS = 1 << 22  # on the CPU, weights whose rows are independent go this many at a time


def _fused_split(be, config: QuantConfig, dtype) -> bool:
    """Whether backend ``be`` splits the outliers of a ``dtype`` weight in one fused pass (the
    default per-row sigma rule on Numba, any grid; it also refuses NaN and Inf there)."""
    return getattr(be, "split_outliers", None) is not None and config.outliers == "sigma" \
        and config.outlier_stats == "row" and config.sigma is not None and np.dtype(dtype) in be.SPLIT_DTYPES


def _one_pass(config: QuantConfig) -> bool:
    """Whether a fused split's rows may also be solved, rounded and packed in the same pass (the
    backend's :func:`eqcore.backends.one_pass`): the symmetric grid, the exact solver and float scales."""
    return config.grid == "symmetric" and config.solver_name == "exact" and not config.col_scales \
        and config.scale_dtype != "log8"


class _Blocks:
    """The arrays a fused, row-blocked quantize fills block by block: packed codes, scales, the
    outliers' CSR pieces, and the float32 workspace every block reuses (no fresh pages), or, when
    the backend does the blocks in one pass, its ``quantize_rows`` (``one_pass``) instead."""

    def __init__(self, w, config: QuantConfig, step: int, one_pass=None):
        rows, cols = w.shape
        self.qweight = np.empty((rows, packed_cols(cols, config.bits)), np.uint32)
        log8 = config.scale_dtype == "log8"  # held as float32 values until the end
        self.scales = np.empty((rows, group_layout(cols, config.group_size)[1]),
                               np.float32 if log8 else SCALE_DTYPES[config.scale_dtype])
        self.one_pass = one_pass
        self.x = None if one_pass else np.empty((min(step, rows), cols), np.float32)
        self.work = {}  # the split's scratch arrays
        self.row, self.outliers = 0, []  # outliers: each block's CSR

    def add(self, scales, outliers):
        """Rows' scales and outliers, after their codes went into ``qweight``."""
        n = scales.shape[0]
        self.scales[self.row:self.row + n] = scales
        self.row += n
        self.outliers.append(outliers)

    def tensor(self, w, config: QuantConfig) -> QuantizedTensor:
        scales, row_scales = stored_scales(self.scales, config.scale_dtype)
        return QuantizedTensor.built(self.qweight, scales, *concat_csr(self.outliers), shape=w.shape,
                               dtype=dtype_name(w.dtype), bits=config.bits, group_size=config.group_size,
                               sigma=_sigma_of(config), grid=config.grid, row_scales=row_scales)


def _quantize_checked(w, config: QuantConfig, name: str, out: _Blocks | None = None) -> QuantizedTensor | None:
    """:func:`quantize` of a checked weight on backend ``name``'s arrays; with ``out`` (the fused
    split only), its rows go into ``out`` (returns None)."""
    be = backends.get(name)
    if _fused_split(be, config, w.dtype):  # the default outlier rule: one fused pass
        if out is not None and out.one_pass is not None:  # ... which also solves and packs
            rows = slice(out.row, out.row + w.shape[0])
            _, scales, outliers = out.one_pass(w, config.sigma, config.bits, config.group_size,
                                               max_scale(w.dtype, config.qmax, config.scale_dtype),
                                               config.scale_dtype, out.qweight[rows], out.work)
            out.add(scales, outliers)
            return None
        x, outliers = be.split_outliers(w, config.sigma, *(() if out is None else (out.x[:w.shape[0]], out.work)))
        if out is None:  # the other grids weigh only the entries kept (as quantize_masked)
            keep = None if config.grid == "symmetric" or outliers.nnz == 0 else kept(outliers, w.shape)
            return quantize_split(w, x, outliers, config, keep, backend=name)
        solve = solvers.get(config.solver_name, name)  # rows independent, symmetric: scales only
        scales = fit_grid(x, config, solve, max_scale(w.dtype, config.qmax, config.scale_dtype), w.dtype)[0]
        be.encode(x, _float32(scales), config.bits, config.group_size, out=out.qweight[out.row:out.row + w.shape[0]])
        out.add(scales, outliers)
        return None
    return quantize_masked(w, config, select(w, config, row_losses(config, name, w.dtype)), backend=name)


def row_losses(config: QuantConfig, backend: str, dtype):
    """``losses(x)``: each row's error at its best grid for a float32 matrix x (zeros count for
    nothing on the non-symmetric grids): what the budget selector measures."""
    solve = solvers.get(config.solver_name, backend)
    smax = max_scale(dtype, config.qmax, config.scale_dtype)

    def losses(x):
        keep = None if config.grid == "symmetric" else x != 0
        scales, zeros, codebook, col = fit_grid(x, config, solve, smax, dtype, keep)
        return dequant_error(x, scales, config, zeros, codebook, col, keep)

    return losses


def quantize_masked(w, config: QuantConfig, mask, *, backend: str) -> QuantizedTensor:
    """:func:`quantize` of a checked weight on ``backend``'s arrays with the outliers ``mask``."""
    outliers = to_csr(w, mask)
    x = w.astype(np.float32)
    x[mask] = 0.0  # outliers take no part in the grid; their codes are overwritten
    keep = None if config.grid == "symmetric" or outliers.nnz == 0 else ~mask
    return quantize_split(w, x, outliers, config, keep, backend=backend)


def quantize_split(w, x, outliers, config: QuantConfig, keep, *, backend: str) -> QuantizedTensor:
    """:func:`quantize_masked` once the outliers are split off: float32 ``x`` with them zeroed,
    their CSR, and ``keep`` (False at them, or None: see :func:`eqcore.solvers.get`)."""
    be = backends.get(backend)
    solve = solvers.get(config.solver_name, backend)
    smax = max_scale(w.dtype, config.qmax, config.scale_dtype)
    scales, zeros, codebook, col = fit_grid(x, config, solve, smax, w.dtype, keep)
    del keep
    f32 = _float32
    qweight = be.encode(x, f32(scales), config.bits, config.group_size, zeros=f32(zeros), codebook=codebook,
                        col_scales=f32(col))
    scales, row_scales = stored_scales(scales, config.scale_dtype)
    return QuantizedTensor.built(qweight, scales, *outliers, shape=w.shape, dtype=dtype_name(w.dtype),
                           bits=config.bits, group_size=config.group_size, sigma=_sigma_of(config),
                           grid=config.grid, zeros=zeros, codebook=codebook, col_scales=col, row_scales=row_scales)


def fit_grid(x, config, solve, smax, dtype, keep=None):
    """(scales, zeros, codebook, col_scales) of float32 ``x`` (outliers zeroed; ``keep`` False at
    them, or None), as stored: column scales first (if configured), then the codebook of x / col,
    then the solver's scales (and zeros), capped so that no level leaves ``dtype``'s range and
    rounded to ``config.scale_dtype``."""
    xp = array_module(x)
    col = column_scales(x, config.scale_dtype) if config.col_scales else None
    codebook = codebook_for(x if col is None else x / col.astype(np.float32), config)
    scales, zeros = solve(x, config, smax, codebook=codebook, col=_float32(col), keep=keep)
    scales = round_scales(cap_scales(scales, dtype, config, zeros, codebook, col), config.scale_dtype)
    zeros = None if zeros is None else round_zeros(zeros, config.scale_dtype)
    if codebook is not None:
        codebook = xp.asarray(codebook)
    return scales, zeros, codebook, col


def _float32(a):
    return None if a is None else a.astype(np.float32)


def cap_scales(scales, dtype, config, zeros=None, codebook=None, col=None):
    """Scales lowered where the grid's largest level times the column scale would leave ``dtype``'s
    finite range (only weights within a few steps of that range are affected), with a margin for
    rounding the scales to ``config.scale_dtype``."""
    if config.grid == "symmetric" and col is None:
        return scales  # the solver's smax already holds qmax * s within range
    xp = array_module(scales)
    top = finite_max(dtype)
    if zeros is not None:
        z = zeros.astype(np.float64)
        level = xp.maximum(xp.abs(z), xp.abs((1 << config.bits) - 1 - z))
    elif codebook is not None:
        level = float(xp.abs(xp.asarray(codebook)).max())
    else:
        level = float(config.qmax)
    cmax = 1.0 if col is None else float(col.astype(np.float32).max())
    limit = top / (xp.maximum(level, 1.0) * cmax) * (1 - 2.0 ** -7)
    return xp.minimum(scales.astype(np.float64), limit).astype(np.float32)


def _sigma_of(config) -> float | None:
    """What the tensor records as ``sigma``: the threshold of a threshold rule, else None."""
    return config.sigma if config.outliers in ("sigma", "adpq") else None


def dequantize(qt: QuantizedTensor, dtype=None, *, backend: str = "auto", out=None, check: bool = True):
    """Dense (rows, cols) matrix of ``qt`` in ``dtype`` (default: the original dtype), outliers
    restored exactly, in one pass; where ``qt``'s arrays live (NumPy or CuPy). ``out``: an array
    to write it into and return (C-contiguous, writeable, of that shape and dtype, where the
    backend runs), like NumPy's ``out=``: no fresh pages, which cost a new array about as much as
    the kernel itself on the CPU. ``check=False`` skips ``qt.validate()``, as in :func:`matmul`,
    for a tensor validated since it last changed."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"expected a QuantizedTensor, got {type(qt).__name__}")
    if check:
        qt.validate()  # O(scales + nnz): its arrays may have been changed since construction
    name = backends.select(backend, qt.qweight)
    if out is not None:
        _check_out(out, qt.shape, weight_dtype(dtype or qt.dtype), name == "cupy")
    return backends.get(name).dequantize(qt, dtype, out)


def _check_out(out, shape, dtype, on_gpu: bool) -> None:
    """ValueError unless ``out`` can take a (shape) ``dtype`` result of a CPU (or GPU) backend."""
    where = "CuPy" if on_gpu else "NumPy"
    if not (is_cupy(out) if on_gpu else isinstance(out, np.ndarray)):
        raise ValueError(f"out must be a {where} array here, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"out must be {dtype} {tuple(shape)}, got {out.dtype} {tuple(out.shape)}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if not on_gpu and not out.flags.writeable:
        raise ValueError("out is read-only")


def matmul(x, qt: QuantizedTensor, *, backend: str = "auto", check: bool = True):
    """``x @ W.T`` for W = ``dequantize(qt, float32)``, outliers included: float32, shape
    ``x.shape[:-1] + (rows,)``. On the CPU it always runs from the packed form without forming W
    (rows of W four at a time, their scaled levels formed once per block); on the GPU up to 8
    rows of x do, larger batches dequantize W in tiles for cuBLAS. Equal to the dense product up
    to float32 summation order: |y - y_dense| <= 1e-5 * (|x| @ |W|.T) + 1e-30.
    ``check=False`` skips ``qt.validate()`` (O(scales + nnz): 0.20-0.40 ms on the CPU for
    LLaMA-7B's shapes, 14-30% of the product's time at batch 1; on a GPU a few milliseconds of small
    launches and synchronisations) for a tensor validated since it last changed, as
    :class:`eqcore.torch.QuantizedLinear` does.
    """
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"expected a QuantizedTensor, got {type(qt).__name__}")
    x = as_array(x)
    if getattr(x, "ndim", 0) < 1 or x.shape[-1] != qt.shape[1]:
        raise ValueError(f"x must end in the weight's {qt.shape[1]} input features, got shape {tuple(getattr(x, 'shape', ()))}")
    if x.dtype.kind != "f":
        raise ValueError(f"x must be a float array, got {x.dtype}")
    if check:
        qt.validate()
    be = backends.get(backends.select(backend, x, qt.qweight))
    lead = x.shape[:-1]
    y = be.matmul(x.reshape(-1, qt.shape[1]).astype(np.float32, copy=False), qt)
    return y.reshape(*lead, qt.shape[0])


def pack(codes, bits: int, *, backend: str = "auto"):
    """Pack unsigned codes (rows, cols), each < 2**bits, into (rows, ceil(cols/32)*bits) uint32
    (layout: :mod:`eqcore.backends.numpy`)."""
    codes = as_array(codes)
    return backends.get(backends.select(backend, codes)).pack(codes, bits)


def unpack(packed, bits: int, cols: int, *, backend: str = "auto"):
    """Inverse of :func:`pack`: (rows, packed_cols) uint32 -> (rows, cols) uint8 codes."""
    packed = as_array(packed)
    return backends.get(backends.select(backend, packed)).unpack(packed, bits, cols)
