"""The bits budget: exact stored sizes, the convex-hull greedy, and checkpoints under a budget."""
import itertools
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file as st_save

import eqcore
from eqcore.budget import Option, allocate, hull, plan, sample_rows
from eqcore.config import QuantConfig
from eqcore.layout import stored_bytes

from helpers import weights


@pytest.mark.parametrize("grid, col, scale_dtype", [("symmetric", False, "float32"), ("asymmetric", True, "float16"),
                                                    ("codebook", False, "bfloat16"), ("codebook", True, "float32")])
@pytest.mark.parametrize("group", [None, 64, 100])
def test_stored_bytes_is_what_a_tensor_stores(grid, col, scale_dtype, group):
    for dtype, cols in ((np.float16, 200), (np.float32, 96)):
        w = weights(12, cols, seed=cols, dtype=dtype)
        qt = eqcore.quantize(w, bits=3, group_size=group, grid=grid, col_scales=col, scale_dtype=scale_dtype,
                             sigma=2.0, steps=5)
        assert qt.outlier_vals.shape[0] > 0
        assert stored_bytes(w.shape, 3, group, nnz=qt.outlier_vals.shape[0], weight_itemsize=w.itemsize, grid=grid,
                            scale_dtype=scale_dtype, col_scales=col) == qt.nbytes


points = st.lists(st.tuples(st.integers(1, 50), st.floats(0, 100)), min_size=1, max_size=12)


@given(points)
@settings(max_examples=200, deadline=None)
def test_hull_is_the_lower_convex_hull(pts):
    opts = [Option(None, b, e) for b, e in pts]
    h = hull(opts)
    assert all(a.nbytes < b.nbytes and a.error > b.error for a, b in zip(h, h[1:]))
    assert h[0].nbytes == min(b for b, _ in pts) and h[0].error == min(e for b, e in pts if b == h[0].nbytes)
    for b, e in pts:  # every point lies on or above the hull's piecewise-linear curve (where it is defined)
        if b >= h[-1].nbytes:
            assert e >= h[-1].error - 1e-9
            continue
        i = max(k for k in range(len(h)) if h[k].nbytes <= b)
        a, c = h[i], h[i + 1]
        line = a.error + (c.error - a.error) * (b - a.nbytes) / (c.nbytes - a.nbytes)
        assert e >= line - 1e-9


@given(st.lists(st.lists(st.floats(0, 100), min_size=1, max_size=4), min_size=1, max_size=4),
       st.floats(0, 1))
@settings(max_examples=200, deadline=None)
def test_allocate_matches_brute_force_on_unit_steps(errors, t):
    """With convex, equally spaced options the greedy on the hull is optimal: compare it with
    every combination that fits."""
    tensors = {}
    for k, errs in enumerate(errors):
        errs = sorted(errs, reverse=True)
        steps = np.diff([0.0] + [-e for e in errs])  # make them convex: decreasing gains
        gains = sorted(steps[1:], reverse=True)
        e = [errs[0]] + list(errs[0] - np.cumsum(gains))
        tensors[f"t{k}"] = [Option(i, 8 * (10 + i), float(v)) for i, v in enumerate(e)]
    numel = {n: 8 for n in tensors}
    lo = sum(o[0].nbytes for o in tensors.values())
    hi = sum(o[-1].nbytes for o in tensors.values())
    budget = lo + round(t * (hi - lo) / 8) * 8
    got = allocate(tensors, numel, budget * 8 / sum(numel.values()))
    assert sum(o.nbytes for o in got.values()) <= budget
    best = min(sum(o.error for o in combo) for combo in itertools.product(*tensors.values())
               if sum(o.nbytes for o in combo) <= budget)
    assert sum(o.error for o in got.values()) == pytest.approx(best, abs=1e-6)


def _model(seed=0):
    """Four tensors with different spreads and tails: the budget should not treat them alike."""
    rng = np.random.default_rng(seed)
    out = {"a": weights(96, 256, seed=1, dtype=np.float16), "b": (weights(64, 256, seed=2) * 4).astype(np.float16)}
    c = rng.normal(0, 0.02, (128, 192)).astype(np.float16)
    c[:, :3] *= 30  # a few heavy columns
    out["c"] = c
    out["d"] = rng.normal(0, 0.01, (80, 128)).astype(np.float16)
    return out


def _error_and_bits(model, configs):
    err, nbytes = 0.0, 0
    for name, w in model.items():
        qt = eqcore.quantize(w, configs[name])
        err += float(((eqcore.dequantize(qt, np.float32).astype(np.float64) - w) ** 2).sum())
        nbytes += qt.nbytes
    return err, 8.0 * nbytes / sum(w.size for w in model.values())


def test_plan_meets_the_budget_and_more_bits_buy_less_error():
    model = _model()
    base = QuantConfig(bits=3, solver="exact")
    results = []
    for target in (3.4, 3.6, 4.0):
        configs = plan(model, target, base)
        err, bpw = _error_and_bits(model, configs)
        assert bpw <= target
        results.append((err, bpw))
    assert results[0][0] > results[1][0] > results[2][0]
    # at the same bits, the planned mix beats every uniform choice that fits
    configs = plan(model, 3.6, base)
    err, bpw = _error_and_bits(model, configs)
    compared = 0
    for g in (None, 256, 128, 64):
        for f in (0.0, 0.001, 0.0025):
            uni = {n: base.replace(group_size=g, outliers="budget", outlier_fraction=f) for n in model}
            e, b = _error_and_bits(model, uni)
            if b <= bpw:
                assert err <= e
                compared += 1
    assert compared >= 3


def test_plan_refuses_a_budget_below_the_smallest_layout():
    with pytest.raises(ValueError, match="below the smallest layout"):
        plan(_model(), 3.0, QuantConfig(bits=3, solver="exact"))
    with pytest.raises(ValueError, match="positive"):
        plan(_model(), float("nan"))


def test_sample_rows_spread_over_the_tensor():
    assert list(sample_rows(5, 128)) == [0, 1, 2, 3, 4]
    r = sample_rows(4096, 128)
    assert len(r) == 128 and r[0] == 0 and r[-1] == 4095 and np.all(np.diff(r) > 0)


def test_checkpoint_under_a_budget_reports_what_it_stored(tmp_path):
    src = tmp_path / "model.safetensors"
    st_save({f"layers.{k}.weight": v for k, v in _model().items()}, str(src))
    done = eqcore.quantize_checkpoint(src, tmp_path / "q.safetensors", QuantConfig(bits=3, solver="exact"),
                                      bits_per_weight=3.6, progress=False, skip="")
    rows = eqcore.inspect_checkpoint(tmp_path / "q.safetensors")
    stored = sum(r["bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in rows) / done["weights"]
    assert done["tensors"] == 4 and done["bits_per_weight"] == pytest.approx(stored) and stored <= 3.6
    r = subprocess.run([sys.executable, "-m", "eqcore.cli", "quantize", str(src), str(tmp_path / "c.safetensors"),
                        "--bits", "3", "--solver", "exact", "--bits-per-weight", "3.6", "--skip", "",
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"4 tensors quantized, {done['bits_per_weight']:.4f} bits/weight" in r.stdout
    r = subprocess.run([sys.executable, "-m", "eqcore.cli", "quantize", str(src), str(tmp_path / "d.safetensors"),
                        "--bits-per-weight", "1", "--no-progress", "--skip", ""], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "below the smallest layout" in r.stderr and "Traceback" not in r.stderr


def test_an_existing_output_is_refused_before_the_budget_is_planned(tmp_path, monkeypatch):
    src = tmp_path / "model.safetensors"
    st_save({"layers.0.weight": _model()["a"]}, str(src))
    (tmp_path / "taken.safetensors").write_bytes(b"not ours")

    def no_planning(*args, **kwargs):
        raise AssertionError("planned before checking the output")

    monkeypatch.setattr("eqcore.budget.plan", no_planning)
    with pytest.raises(eqcore.io.folders.OutputExistsError):
        eqcore.quantize_checkpoint(src, tmp_path / "taken.safetensors", bits_per_weight=4.5, progress=False, skip="")
    assert (tmp_path / "taken.safetensors").read_bytes() == b"not ours"
