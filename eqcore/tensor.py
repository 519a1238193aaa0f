"""QuantizedTensor: packed codes + per-group scales + CSR outliers of one weight matrix."""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from .backend import is_cupy
from .config import SUPPORTED_BITS
from .dtypes import dtype_name, weight_dtype
from .outliers import Outliers, col_index_dtype
from .packing import packed_cols
from .scales import group_layout

FIELDS = ("qweight", "scales", "outlier_rowptr", "outlier_cols", "outlier_vals")


class FormatError(ValueError):
    """A quantized tensor or file is malformed."""


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized (rows, cols) weight: W ~= dequant(qweight, scales) + sparse(outliers).

    qweight         (rows, ceil(cols/32) * bits) uint32, see :mod:`eqcore.packing`
    scales          (rows, n_groups) float32
    outlier_rowptr  (rows + 1,) int32; outlier_cols, outlier_vals: CSR entries
    shape, dtype    the original matrix shape and dtype name
    bits, group_size, sigma  how it was quantized (sigma None: no outliers isolated)
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

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        self.validate()

    # -- derived quantities -------------------------------------------------
    @property
    def outliers(self) -> Outliers:
        return Outliers(self.outlier_rowptr, self.outlier_cols, self.outlier_vals)

    @property
    def n_groups(self) -> int:
        return group_layout(self.shape[1], self.group_size)[1]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in FIELDS)

    @property
    def bits_per_weight(self) -> float:
        """Storage cost of codes + scales + outliers (indices, values, row pointers)."""
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    @property
    def outlier_fraction(self) -> float:
        return self.outlier_vals.shape[0] / (self.shape[0] * self.shape[1])

    def map_arrays(self, fn) -> "QuantizedTensor":
        """The same tensor with ``fn`` applied to each array (e.g. ``cupy.asarray`` to move it)."""
        return dataclasses.replace(self, **{f: fn(getattr(self, f)) for f in FIELDS})

    def dequantize(self, dtype=None, backend: str = "auto"):
        """Dense matrix with the outliers written back (see :func:`eqcore.dequantize`)."""
        from .dequant import dequantize

        return dequantize(self, dtype=dtype, backend=backend)

    # -- (de)serialisation --------------------------------------------------
    def metadata(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "bits": self.bits,
                "group_size": self.group_size, "sigma": self.sigma}

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in FIELDS}

    @classmethod
    def from_arrays(cls, arrays: dict, meta: dict) -> "QuantizedTensor":
        """Rebuild from :meth:`arrays` and :meth:`metadata`; raises FormatError if inconsistent."""
        missing = [f for f in FIELDS if f not in arrays]
        if missing:
            raise FormatError(f"missing arrays {missing}")
        try:
            shape = meta["shape"]
            if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
                raise FormatError(f"shape must be two positive ints, got {shape!r}")
            return cls(**{f: arrays[f] for f in FIELDS}, shape=tuple(shape), dtype=meta["dtype"],
                       bits=meta["bits"], group_size=meta.get("group_size"), sigma=meta.get("sigma"))
        except KeyError as e:
            raise FormatError(f"metadata lacks {e.args[0]!r}") from None

    # -- validation -----------------------------------------------------------
    def validate(self) -> None:
        """Check every array against the metadata; FormatError on the first problem."""
        def need(cond, msg):
            if not cond:
                raise FormatError(msg)

        need(self.bits in SUPPORTED_BITS and not isinstance(self.bits, bool), f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        try:
            dt = weight_dtype(self.dtype)
        except ValueError as e:
            raise FormatError(str(e)) from None
        object.__setattr__(self, "dtype", dtype_name(dt))
        need(len(self.shape) == 2 and min(self.shape) > 0, f"shape must be 2-D and non-empty, got {self.shape}")
        need(self.group_size is None or (isinstance(self.group_size, int) and self.group_size > 0),
             f"group_size must be a positive int or None, got {self.group_size!r}")
        rows, cols = self.shape
        q = self.qweight
        need(q.dtype == np.uint32 and q.shape == (rows, packed_cols(cols, self.bits)),
             f"qweight must be uint32 {(rows, packed_cols(cols, self.bits))}, got {q.dtype} {q.shape}")
        s = self.scales
        need(s.dtype == np.float32 and s.shape == (rows, self.n_groups),
             f"scales must be float32 {(rows, self.n_groups)}, got {s.dtype} {s.shape}")
        need(bool(np.all(np.isfinite(s) & (s > 0))), "scales must be finite and positive")
        rp, oc, ov = self.outlier_rowptr, self.outlier_cols, self.outlier_vals
        need(rp.dtype == np.int32 and rp.shape == (rows + 1,), f"outlier_rowptr must be int32 ({rows + 1},), got {rp.dtype} {rp.shape}")
        nnz = int(rp[-1])
        need(rp[0] == 0 and bool(np.all(np.diff(rp) >= 0)), "outlier_rowptr must start at 0 and be non-decreasing")
        need(oc.dtype == col_index_dtype(cols) and oc.shape == (nnz,),
             f"outlier_cols must be {col_index_dtype(cols)} ({nnz},), got {oc.dtype} {oc.shape}")
        need(ov.dtype == dt and ov.shape == (nnz,), f"outlier_vals must be {dt} ({nnz},), got {ov.dtype} {ov.shape}")
        if nnz:
            if is_cupy(rp):  # the index checks below run on the host
                rp, oc = rp.get(), oc.get()
            c = oc.astype(np.int64)
            need(bool(c.min() >= 0 and c.max() < cols), f"outlier_cols out of range [0, {cols})")
            row_of = np.repeat(np.arange(rows), np.diff(rp))
            key = row_of * cols + c
            need(bool(np.all(np.diff(key) > 0)), "outlier_cols must be strictly increasing within each row")


def metadata_json(qt: QuantizedTensor, **extra) -> str:
    return json.dumps({**qt.metadata(), **extra}, sort_keys=True)
