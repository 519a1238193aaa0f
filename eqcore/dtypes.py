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
