"""dequantize(..., out=): into a caller's array, bit for bit what a fresh one gets, with one-line
refusals of arrays it cannot fill."""
import numpy as np
import pytest

import eqcore
from eqcore.dtypes import bfloat16

from helpers import weights

DTYPES = [np.dtype(np.float16), bfloat16, np.dtype(np.float32), np.dtype(np.float64)]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("opts", [dict(), dict(group_size=32, grid="codebook", scale_dtype="log8"),
                                  dict(bits=3, group_size=20, grid="asymmetric", col_scales=True)])
def test_out_gets_what_a_new_array_gets(backend, opts):
    qt = eqcore.quantize(weights(9, 70, seed=3, dtype=np.float16), **opts)
    for dt in DTYPES:
        out = np.full(qt.shape, 7, dt)  # junk everywhere: every element must be written
        got = eqcore.dequantize(qt, dt, backend=backend, out=out)
        assert got is out
        fresh = eqcore.dequantize(qt, dt, backend=backend)
        np.testing.assert_array_equal(out.view(np.uint8), fresh.view(np.uint8))


def test_out_defaults_to_the_weights_dtype():
    qt = eqcore.quantize(weights(4, 64, seed=4, dtype=np.float16))
    out = np.empty(qt.shape, np.float16)
    assert eqcore.dequantize(qt, out=out) is out
    with pytest.raises(ValueError, match=r"out must be float16 \(4, 64\), got float32"):
        eqcore.dequantize(qt, out=np.empty(qt.shape, np.float32))


@pytest.mark.parametrize("make, match", [
    (lambda s: np.empty((s[0], s[1] + 1), np.float32), r"out must be float32 \(4, 64\), got float32 \(4, 65\)"),
    (lambda s: np.empty(s, np.float16), "got float16"),
    (lambda s: np.empty((s[1], s[0]), np.float32).T, "C-contiguous"),
    (lambda s: np.broadcast_to(np.zeros(1, np.float32), s), "C-contiguous|read-only"),
    (lambda s: np.frombuffer(bytes(4 * s[0] * s[1]), np.float32).reshape(s), "read-only"),
    (lambda s: [[0.0] * s[1]] * s[0], "must be a NumPy array"),
])
def test_unusable_out_is_refused(make, match):
    qt = eqcore.quantize(weights(4, 64, seed=5))
    with pytest.raises(ValueError, match=match):
        eqcore.dequantize(qt, np.float32, out=make(qt.shape))
