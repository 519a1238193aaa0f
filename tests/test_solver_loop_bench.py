"""The solver-loop benchmark's C++ ports (bench/solver_loop/) agree with the Numba solvers."""
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")
if shutil.which("g++") is None:
    pytest.skip("g++ not found: the C++ ports cannot be built", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import solver_loop  # noqa: E402
from eqcore.config import QuantConfig  # noqa: E402
from eqcore.solvers import adam_numba, exact_numba  # noqa: E402


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    try:
        return solver_loop.build("nofma", str(tmp_path_factory.mktemp("solver_loop")))
    except RuntimeError as e:
        pytest.skip(str(e))


def _weights():
    x = solver_loop.weights(24, 384, seed=3)
    x[0] = 0  # an all-zero row
    x[1, :200] = 0  # mostly zero
    x[2] *= 1e-30  # tiny (subnormal products)
    x[3, ::2] = 0.01  # many equal magnitudes (ties)
    return x


@pytest.mark.parametrize("bits", [4, 3, 8])
@pytest.mark.parametrize("group_size", [None, 128, 100])
def test_exact_port_bit_identical(lib, bits, group_size):
    x = _weights()
    cfg = QuantConfig(bits=bits, group_size=group_size)
    want = exact_numba.optimize_scales(x, cfg)
    for threads in (1, 2):
        got = solver_loop.exact_cpp(lib, x, cfg, threads)
        assert got.view(np.int32).tolist() == want.view(np.int32).tolist()


@pytest.mark.parametrize("group_size", [None, 128])
def test_adam_port_matches(lib, group_size):
    x = _weights()
    cfg = QuantConfig(bits=4, group_size=group_size, solver="adam", steps=40)
    want = adam_numba.optimize_scales(x, cfg)
    got = solver_loop.adam_cpp(lib, x, cfg, 2)
    # the sums are reassociated differently (Numba's and g++'s vector orders), so a scale may move
    # by an ulp in principle; on this input they agree exactly
    assert np.max(solver_loop.ulps(got, want)) <= 1
    assert np.mean(got == want) >= 0.99


def test_refuses_without_gxx(monkeypatch, capsys):
    monkeypatch.setattr(solver_loop.shutil, "which", lambda name: None)
    assert solver_loop.main(["--quick"]) == 1
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "g++ not found" in out


def test_exact_port_breaks_ties_as_numba(lib):
    """Groups of one negative value tie between codes -7 and -8; both take the smaller scale."""
    x = (np.random.default_rng(0).standard_normal((400, 1)) * 0.02).astype(np.float32)
    cfg = QuantConfig(bits=4)
    want = exact_numba.optimize_scales(x, cfg)
    assert solver_loop.exact_cpp(lib, x, cfg, 2).view(np.int32).tolist() == want.view(np.int32).tolist()
