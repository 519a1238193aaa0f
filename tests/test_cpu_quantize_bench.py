"""bench/cpu_quantize.py's check that its timed quantize equals the NumPy reference."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eqcore  # noqa: E402
from bench.cpu_quantize import differing  # noqa: E402


def test_rows_of_a_large_tensor_match_the_same_rows_quantized_alone():
    """The whole tensor's 68k outliers need int32 row pointers, 8 rows alone fit uint16: equal by
    value (the bench stopped with 'outlier_rowptr differs' while it compared bytes)."""
    w = (np.random.default_rng(0).standard_t(4, (256, 512)) * 0.02).astype(np.float16)
    whole = eqcore.quantize(w, bits=4, sigma=0.5)
    ref = eqcore.quantize(w[:8], bits=4, sigma=0.5, backend="numpy")
    head = whole.row_block(0, 8)
    assert head.outlier_rowptr.dtype != ref.outlier_rowptr.dtype
    assert differing(head, ref) == []


def test_changed_values_are_reported():
    w = (np.random.default_rng(1).standard_t(4, (8, 256)) * 0.02).astype(np.float16)
    ref = eqcore.quantize(w, bits=4, backend="numpy")
    other = eqcore.quantize(w, bits=4)
    other.scales[3, 0] = np.nextafter(other.scales[3, 0], np.float16(1))
    other.outlier_rowptr[1:] += 1
    assert set(differing(other, ref)) == {"scales", "outlier_rowptr"}
