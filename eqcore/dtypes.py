"""Weight dtypes eqcore accepts, by name; bfloat16 comes from ml_dtypes."""
from __future__ import annotations

import ml_dtypes
import numpy as np

bfloat16 = np.dtype(ml_dtypes.bfloat16)

WEIGHT_DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": bfloat16,
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}


def weight_dtype(dtype) -> np.dtype:
    """Normalise a dtype (or its name) and refuse anything that is not a float weight dtype."""
    if isinstance(dtype, str):
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"unsupported weight dtype {dtype!r}; expected one of {sorted(WEIGHT_DTYPES)}")
        return WEIGHT_DTYPES[dtype]
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unsupported weight dtype {dtype!r}") from e
    if dt not in WEIGHT_DTYPES.values():
        raise ValueError(f"unsupported weight dtype {dt}; expected one of {sorted(WEIGHT_DTYPES)}")
    return dt


def dtype_name(dtype) -> str:
    return weight_dtype(dtype).name


FLOAT32_MAX = float(np.finfo(np.float32).max)


def finite_max(dtype) -> float:
    """Largest finite value a dequantized weight of ``dtype`` may take: the dtype's own maximum,
    capped at float32's (codes times scales are float32 products)."""
    dt = weight_dtype(dtype)
    return min(float(ml_dtypes.finfo(dt).max) if dt == bfloat16 else float(np.finfo(dt).max), FLOAT32_MAX)


def saturate(a, dtype):
    """``a`` cast to weight dtype ``dtype`` (round to nearest even) after clamping it to
    :func:`finite_max`: how outlier values enter a dequantized matrix (NumPy or CuPy); ``a``
    itself when it is finite and of that dtype already, and without the clamp (through float32,
    exact) when a finite float16 / bfloat16 / float32 ``a`` fits ``dtype``'s range."""
    dtype = weight_dtype(dtype)
    if a.dtype.itemsize <= 4 and all_finite(a):  # exact in float32, so one rounding from there
        if a.dtype == dtype:
            return a
        if finite_max(a.dtype) <= finite_max(dtype):  # nothing to clamp
            return a.astype(np.float32).astype(dtype)
    top = finite_max(dtype)
    a = a.astype(np.float64).clip(-top, top)
    return float64_to_bfloat16(a) if dtype == bfloat16 else a.astype(dtype)


def float64_to_bfloat16(a):
    """float64 ``a`` (finite, within bfloat16's range) rounded once, to nearest even, to bfloat16:
    to float32 rounding to odd (toward zero, then the last bit set where that was
    inexact), whose 16 spare bits make the second rounding exact. ml_dtypes' own cast rounds
    twice (through float32) before 0.7 and once from 0.7; this gives one answer under any version,
    the CUDA kernels' (``from_f64`` in raw_kernels/eqcore.cuh)."""
    f = a.astype(np.float32)
    bits = f.view(np.int32)
    bits = bits - (abs(f.astype(np.float64)) > abs(a)).astype(np.int32)  # rounded up: one step back
    bits = bits | (bits.view(np.float32).astype(np.float64) != a).astype(np.int32)  # inexact: odd
    return bits.view(np.float32).astype(bfloat16)  # float32 -> bfloat16: one rounding in every ml_dtypes


# a float dtype's unsigned view and the bits of +inf (an all-ones exponent): read as that unsigned
# integer, a float is finite when its exponent bits are not all set, finite and positive when it
# lies in (0, +inf's bits)
INF_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00), bfloat16: (np.uint16, 0x7F80),
            np.dtype(np.float32): (np.uint32, 0x7F800000)}


def all_finite(a) -> bool:
    """Whether every value of a float array (NumPy or CuPy) is finite. float16 / bfloat16 are read
    from their exponent bits (all set: inf or NaN), without a float32 copy; wider floats by
    a - a == 0 (inf - inf and NaN give NaN)."""
    if isinstance(a, np.ndarray) and a.size > _FINITE_CHUNK:  # in pieces (views): temporaries stay small
        per = a.size // a.shape[0]
        if per > _FINITE_CHUNK:  # one entry of the first axis is itself large
            return all(all_finite(sub) for sub in a)
        step = _FINITE_CHUNK // per
        return all(all_finite(a[i:i + step]) for i in range(0, a.shape[0], step))
    if a.dtype.itemsize == 2:
        uint, exp = INF_BITS[a.dtype]
        return bool(((a.view(uint) & exp) != exp).all())
    with np.errstate(invalid="ignore"):  # inf - inf: no warning, the answer is the point
        return bool(((a - a) == 0).all())


_FINITE_CHUNK = 1 << 20


NONFINITE = "weight contains NaN or Inf; refusing to quantize it"
