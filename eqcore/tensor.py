"""QuantizedTensor: packed codes + per-group scales + CSR outliers of one weight matrix."""
from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from .interop import array_module
from .dtypes import dtype_name, finite_max, weight_dtype
from .errors import FormatError
from .layout import (GRIDS, SCALE_DTYPES, check_bits, float_dtype, float_scales, group_layout, packed_cols, qrange,
                     scale_bounds)
from .outliers import Outliers, check_csr, concat_csr

FIELDS = ("qweight", "scales", "outlier_rowptr", "outlier_cols", "outlier_vals")
OPTIONAL = ("zeros", "codebook", "col_scales", "row_scales")  # present for some grids / scale dtypes only


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized (rows, cols) weight: W ~= dequant(qweight, scales, ...) + sparse(outliers).

    qweight         (rows, ceil(cols/32) * bits) uint32, layout in :mod:`eqcore.backends.numpy`
    scales          (rows, n_groups) float32, float16 or bfloat16; or uint8 "log8" codes, a group's
                    scale being row_scales * 2^(-code/32) (:data:`eqcore.layout.LOG8`)
    outlier_rowptr  (rows + 1,) uint16 (at most 65535 outliers) or int32; outlier_cols,
                    outlier_vals: CSR entries (see :class:`eqcore.outliers.Outliers`)
    shape, dtype    the original matrix shape and dtype name
    bits, group_size, sigma  how it was quantized (sigma None: no outliers isolated)
    grid            how a code u becomes a level: "symmetric" (u + qmin), "asymmetric"
                    (u - zero of its group) or "codebook" (codebook[u])
    zeros           (rows, n_groups), the scales' float dtype: the asymmetric grid's zero-points
    codebook        (2^bits,) float32, strictly increasing: the codebook grid's levels
    col_scales      (cols,), the scales' float dtype, or None: a scale per input column, applied last
    row_scales      (rows,) float16 with "log8" scales (else None)
    The scales' float dtype is their own, or float16 for "log8" (:func:`eqcore.layout.float_dtype`).
    """

    qweight: np.ndarray
    scales: np.ndarray
    outlier_rowptr: np.ndarray
    outlier_cols: np.ndarray
    outlier_vals: np.ndarray
    shape: tuple[int, int]
    dtype: str
    bits: int
    group_size: int | None = None
    sigma: float | None = None
    grid: str = "symmetric"
    zeros: np.ndarray | None = None
    codebook: np.ndarray | None = None
    col_scales: np.ndarray | None = None
    row_scales: np.ndarray | None = None
    _check: dataclasses.InitVar[bool] = True  # False only through :meth:`built`

    def __post_init__(self, _check):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if _check:
            self.validate()

    @classmethod
    def built(cls, *args, **kwargs) -> "QuantizedTensor":
        """The tensor ``cls(*args, **kwargs)`` makes, without :meth:`validate`: for what eqcore's
        own quantizer assembled, valid by construction (validation took 0.23-0.28 ms of a 7-14 ms
        quantize at 1536x384; the test suite validates every such tensor, tests/conftest.py).
        Anything read or built elsewhere goes through the constructor, which validates."""
        return cls(*args, _check=False, **kwargs)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_derived", None)  # rebuilt where needed
        return state

    # -- derived quantities -------------------------------------------------
    def derived(self, key: str, make):
        """``make(self)``, computed once and kept until :meth:`validate` runs again: what a kernel
        derives from the arrays alone (after changing an array in place, validate before using
        the tensor again, as ``matmul(x, qt, check=False)`` asks anyway)."""
        memo = self.__dict__.setdefault("_derived", {})
        if key not in memo:
            memo[key] = make(self)
        return memo[key]

    def derived_nbytes(self) -> int:
        """Bytes of the arrays :meth:`derived` keeps now (those that are not views of the tensor's
        own arrays): memory the kernels hold beyond :attr:`nbytes`."""
        own = list(self.arrays().values())
        seen, stack, total = set(), list(self.__dict__.get("_derived", {}).values()), 0
        while stack:
            v = stack.pop()
            if isinstance(v, (tuple, list)):
                stack.extend(v)
            elif hasattr(v, "nbytes") and hasattr(v, "shape") and id(v) not in seen:
                seen.add(id(v))
                if not any(np.shares_memory(v, a) for a in own if isinstance(a, np.ndarray) and isinstance(v, np.ndarray)):
                    total += int(v.nbytes)
        return total

    @property
    def outliers(self) -> Outliers:
        return Outliers(self.outlier_rowptr, self.outlier_cols, self.outlier_vals)

    def float_scales(self):
        """The group scales as float32 (rows, n_groups), as the kernels take them."""
        return float_scales(self.scales, self.row_scales)

    @property
    def n_groups(self) -> int:
        return group_layout(self.shape[1], self.group_size)[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())

    @property
    def bits_per_weight(self) -> float:
        """Storage cost of codes + scales + outliers (indices, values, row pointers)."""
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    @property
    def outlier_fraction(self) -> float:
        return self.outlier_vals.shape[0] / (self.shape[0] * self.shape[1])

    def __repr__(self) -> str:
        where = "cupy" if type(self.qweight).__module__.startswith("cupy") else "numpy"
        group = "row" if self.group_size is None else self.group_size
        return (f"QuantizedTensor(shape={self.shape}, dtype={self.dtype}, bits={self.bits}, group_size={group}, "
                f"outliers={self.outlier_fraction:.3%}, bits_per_weight={self.bits_per_weight:.3f}, arrays={where})")

    def map_arrays(self, fn) -> "QuantizedTensor":
        """The same tensor with ``fn`` applied to each array (e.g. ``cupy.asarray`` to move it)."""
        return dataclasses.replace(self, **{f: fn(a) for f, a in self.arrays().items()})

    def row_block(self, start: int, stop: int) -> "QuantizedTensor":
        """Rows ``start:stop`` as a QuantizedTensor of their own (views, outliers re-based)."""
        a, b = int(self.outlier_rowptr[start]), int(self.outlier_rowptr[stop])
        return dataclasses.replace(
            self, qweight=self.qweight[start:stop], scales=self.scales[start:stop],
            zeros=None if self.zeros is None else self.zeros[start:stop],
            row_scales=None if self.row_scales is None else self.row_scales[start:stop],
            outlier_rowptr=self.outlier_rowptr[start:stop + 1] - self.outlier_rowptr[start],
            outlier_cols=self.outlier_cols[a:b], outlier_vals=self.outlier_vals[a:b], shape=(stop - start, self.shape[1]))

    @classmethod
    def stack_rows(cls, blocks) -> "QuantizedTensor":
        """The inverse of :meth:`row_block`: NumPy blocks of consecutive rows (same columns,
        settings, codebook and column scales) as one tensor."""
        blocks = list(blocks)
        first = blocks[0]
        if len(blocks) == 1:
            return first
        for b in blocks[1:]:
            same = (b.shape[1], b.dtype, b.bits, b.group_size, b.sigma, b.grid, b.scales.dtype) == \
                (first.shape[1], first.dtype, first.bits, first.group_size, first.sigma, first.grid, first.scales.dtype)
            for f in ("codebook", "col_scales"):
                x, y = getattr(b, f), getattr(first, f)
                same = same and (x is None) == (y is None) and (x is None or np.array_equal(x, y))
            if not same:
                raise ValueError("row blocks of different tensors or settings cannot be stacked")
        rowptr, cols, vals = concat_csr([b.outliers for b in blocks])
        stack = {f: np.concatenate([getattr(b, f) for b in blocks])
                 for f in ("qweight", "scales", "zeros", "row_scales") if getattr(first, f) is not None}
        return dataclasses.replace(first, **stack, outlier_rowptr=rowptr, outlier_cols=cols, outlier_vals=vals,
                                   shape=(sum(b.shape[0] for b in blocks), first.shape[1]))

    # -- (de)serialisation --------------------------------------------------
    def metadata(self) -> dict:
        meta = {"shape": list(self.shape), "dtype": self.dtype, "bits": self.bits,
                "group_size": self.group_size, "sigma": self.sigma}
        if self.grid != "symmetric":
            meta["grid"] = self.grid
        return meta

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array it holds, by field name (the optional ones only when present)."""
        out = {f: getattr(self, f) for f in FIELDS}
        out.update({f: getattr(self, f) for f in OPTIONAL if getattr(self, f) is not None})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict, meta: dict) -> "QuantizedTensor":
        """Rebuild from :meth:`arrays` and :meth:`metadata`; raises FormatError if inconsistent."""
        missing = [f for f in FIELDS if f not in arrays]
        if missing:
            raise FormatError(f"missing arrays {missing}")
        if not isinstance(meta, dict):
            raise FormatError("metadata must be a JSON object")
        for key in ("shape", "dtype", "bits"):
            if key not in meta:
                raise FormatError(f"metadata lacks {key!r}")
        shape = meta["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)):
            raise FormatError(f"shape must be two positive ints, got {shape!r}")
        if not isinstance(meta["dtype"], str):
            raise FormatError(f"dtype must be a dtype name, got {meta['dtype']!r}")
        return cls(**{f: arrays[f] for f in FIELDS}, shape=tuple(shape), dtype=meta["dtype"],
                   bits=meta["bits"], group_size=meta.get("group_size"), sigma=meta.get("sigma"),
                   grid=meta.get("grid", "symmetric"), **{f: arrays.get(f) for f in OPTIONAL})

    # -- validation -----------------------------------------------------------
    def validate(self) -> None:
        """Check every array against the metadata; FormatError on the first problem.

        O(rows * (n_groups + bits) + nnz): it reads the scales, the last packed block of each
        row and the outliers, never the codes, so it is cheap enough to run before every
        dequantization (arrays can be changed in place after construction).
        """
        def need(cond, msg):
            if not cond:
                raise FormatError(msg)

        self.__dict__.pop("_derived", None)  # the arrays may have changed: nothing derived from them holds
        try:
            check_bits(self.bits)
        except ValueError as e:
            raise FormatError(str(e)) from None
        try:
            dt = weight_dtype(self.dtype)
        except (TypeError, ValueError) as e:
            raise FormatError(str(e)) from None
        object.__setattr__(self, "dtype", dtype_name(dt))
        need(len(self.shape) == 2 and min(self.shape) > 0, f"shape must be 2-D and non-empty, got {self.shape}")
        need(self.group_size is None or (_is_int(self.group_size) and self.group_size > 0),
             f"group_size must be a positive int or None, got {self.group_size!r}")
        need(self.sigma is None or (isinstance(self.sigma, (int, float)) and not isinstance(self.sigma, bool)
                                    and math.isfinite(self.sigma) and self.sigma > 0),
             f"sigma must be a positive number or None, got {self.sigma!r}")
        for f in FIELDS:
            a = getattr(self, f)
            need(hasattr(a, "dtype") and hasattr(a, "shape"), f"{f} must be an array, got {type(a).__name__}")
        rows, cols = self.shape
        q = self.qweight
        need(q.dtype == np.uint32 and tuple(q.shape) == (rows, packed_cols(cols, self.bits)),
             f"qweight must be uint32 {(rows, packed_cols(cols, self.bits))}, got {q.dtype} {tuple(q.shape)}")
        need(_padding_is_zero(q, self.bits, cols),
             f"qweight has codes in the padding beyond column {cols}: the shape does not match the packed data")
        s = self.scales
        need(s.dtype in SCALE_DTYPES.values() and tuple(s.shape) == (rows, self.n_groups),
             f"scales must be float32, float16, bfloat16 or uint8 (log8) {(rows, self.n_groups)}, "
             f"got {s.dtype} {tuple(s.shape)}")
        xp = array_module(s)
        rs = self.row_scales
        need((rs is not None) == (s.dtype == np.uint8), "row_scales are present exactly with uint8 (log8) scales")
        if rs is not None:
            need(hasattr(rs, "dtype") and rs.dtype == np.float16 and tuple(rs.shape) == (rows,),
                 f"row_scales must be float16 ({rows},), got {getattr(rs, 'dtype', None)} {tuple(getattr(rs, 'shape', ()))}")
        fd = float_dtype(s.dtype)
        positive, largest = scale_bounds(s, rs)  # from the stored form: no decoding (0.3 ms for 4096x43 float16)
        need(positive, "scales must be finite and positive")
        top = finite_max(dt)
        need(self.grid in GRIDS, f"grid must be one of {GRIDS}, got {self.grid!r}")
        need((self.zeros is not None) == (self.grid == "asymmetric"),
             f"zeros are present exactly for the asymmetric grid (grid {self.grid!r})")
        need((self.codebook is not None) == (self.grid == "codebook"),
             f"a codebook is present exactly for the codebook grid (grid {self.grid!r})")
        level = float(qrange(self.bits)[1])  # each group's largest level magnitude: it must stay finite
        if self.zeros is not None:
            z = self.zeros
            need(hasattr(z, "dtype") and z.dtype == fd and tuple(z.shape) == tuple(s.shape),
                 f"zeros must be {fd} {tuple(s.shape)}, got {getattr(z, 'dtype', None)} "
                 f"{tuple(getattr(z, 'shape', ()))}")
            z = z.astype(np.float32)
            need(bool(xp.all(xp.isfinite(z))), "zeros must be finite")
            level = xp.maximum(xp.abs(z.astype(np.float64)), xp.abs((2 ** self.bits - 1) - z.astype(np.float64)))
        if self.codebook is not None:
            cb = self.codebook
            need(hasattr(cb, "dtype") and cb.dtype == np.float32 and tuple(cb.shape) == (1 << self.bits,),
                 f"codebook must be float32 ({1 << self.bits},), got {getattr(cb, 'dtype', None)} "
                 f"{tuple(getattr(cb, 'shape', ()))}")
            need(bool(xp.all(xp.isfinite(cb))) and bool(xp.all(cb[1:] > cb[:-1])),
                 "codebook levels must be finite and strictly increasing")
            level = float(xp.abs(cb).max())
        col = 1.0
        if self.col_scales is not None:
            c = self.col_scales
            need(hasattr(c, "dtype") and c.dtype == fd and tuple(c.shape) == (cols,),
                 f"col_scales must be {fd} ({cols},), got {getattr(c, 'dtype', None)} "
                 f"{tuple(getattr(c, 'shape', ()))}")
            c = c.astype(np.float32)
            need(bool(xp.all(xp.isfinite(c) & (c > 0))), "col_scales must be finite and positive")
            col = float(c.max())
        if isinstance(level, float):  # one level for every group: the largest scale gives the peak, exactly
            peak = largest * level * col
        else:
            peak = float((self.float_scales().astype(np.float64) * level).max()) * col
        # exact for the plain symmetric grid; the other grids' stored zero-points, levels and column
        # scales are rounded after the cap, so they may pass it by that rounding (dequantization saturates)
        slack = 0.0 if (self.grid == "symmetric" and self.col_scales is None) else 2.0 ** -6
        need(peak <= top * (1 + slack),
             f"scales overflow {self.dtype}: a group's largest level times its scale reaches {peak!r} > {top!r}")
        need(self.outlier_vals.dtype == dt, f"outlier_vals must be {dt}, got {self.outlier_vals.dtype}")
        try:
            check_csr(self.outlier_rowptr, self.outlier_cols, self.outlier_vals, self.shape)
        except ValueError as e:
            raise FormatError(str(e)) from None
        if self.outlier_vals.shape[0] and dt.itemsize > 4:  # narrower dtypes: finite is within range
            need(float(xp.abs(self.outlier_vals.astype(np.float64)).max()) <= top,
                 f"outlier_vals beyond {self.dtype}'s finite range")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _padding_is_zero(qweight, bits: int, cols: int) -> bool:
    """True when every bit after the last code of each row (the padding of its last block) is 0."""
    used = (cols - 32 * ((cols - 1) // 32)) * bits  # bits used in the last block, 1..32*bits
    last = qweight[:, -bits:]
    xp = array_module(qweight)
    masks = np.zeros(bits, dtype=np.uint64)
    for k in range(bits):
        lo = used - 32 * k  # used bits of word k
        masks[k] = 0 if lo >= 32 else (0xFFFFFFFF if lo <= 0 else (0xFFFFFFFF ^ ((1 << lo) - 1)))
    return not bool((last & xp.asarray(masks.astype(np.uint32))).any())
