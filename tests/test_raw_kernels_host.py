"""raw_kernels/*.cu compiled with g++ (tests/host_shim.h) and run on the CPU through the
same launch plans as the GPU (eqcore.launch.*_launch): bit-exact against the NumPy
reference for encode, pack, unpack and dequant (with the fused outlier scatter); the matmul GEMV
within the matmul contract's tolerance of the reference (its float32 sums run in another order:
helpers.assert_matmul_close). The files are built with the same -D defines (the layout and launch
geometry) as on the device."""
import ctypes
import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eqcore
from eqcore.backends import launch, nvrtc
from eqcore.backends.numpy import dequantize as dequantize_reference
from eqcore.dtypes import weight_dtype
from eqcore.backends.numpy import pack, unpack
from eqcore.backends.numpy import encode as encode_reference
from eqcore.layout import group_layout
from eqcore.tensor import QuantizedTensor

from helpers import assert_matmul_close

HERE = Path(__file__).resolve().parent
BITS = st.sampled_from([2, 3, 4, 8])
DTYPES = ["float16", "bfloat16", "float32", "float64"]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    names = launch.all_names()
    d = tmp_path_factory.mktemp("host_kernels")
    src = d / "exports.cpp"
    lines = [f'#include "{HERE / "host_shim.h"}"'] + [f'#include "{nvrtc.kernel_dir() / f}"' for f in nvrtc.SOURCES]
    for i, n in enumerate(names):
        lines.append(f'extern "C" void eqh_{i}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
                     f'unsigned bz, void** args) {{ eqshim::launch(&{n}, dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, args); }}')
    src.write_text("\n".join(lines) + "\n")
    so = d / "libeqhost.so"
    cmd = [gxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math",
           "-Wno-unknown-pragmas", *nvrtc.defines(), "-o", str(so), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 and "_Float16" in r.stderr:
        pytest.skip(f"g++ lacks _Float16: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-4000:]
    handle = ctypes.CDLL(str(so))
    table = {}
    for i, n in enumerate(names):
        fn = getattr(handle, f"eqh_{i}")
        fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_void_p]
        fn.restype = None
        table[n] = fn
    return table


def run(lib, plan: launch.Launch):
    """Launch on the host: args as cuLaunchKernel wants them (pointers to each value)."""
    keep, ptrs = [], (ctypes.c_void_p * len(plan.args))()
    for i, a in enumerate(plan.args):
        if isinstance(a, np.ndarray):
            p = ctypes.c_void_p(a.ctypes.data)
            keep.append(p)
            ptrs[i] = ctypes.addressof(p)
        else:
            assert isinstance(a, np.generic), f"argument {i} of {plan.name} is a {type(a)}"
            buf = np.array(a)
            keep.append(buf)
            ptrs[i] = buf.ctypes.data
    lib[plan.name](*plan.grid, *plan.block, ptrs)


def place(a: np.ndarray, misalign: bool) -> np.ndarray:
    """A C-contiguous copy of ``a``, at an address that is not 16-byte aligned if asked."""
    n = a.size * a.itemsize
    buf = np.zeros(n + 32, np.uint8)
    off = (-buf.ctypes.data) % 16 + (a.itemsize if misalign else 0)
    out = buf[off:off + n].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def same_bits(a: np.ndarray, b: np.ndarray):
    assert a.dtype == b.dtype and a.shape == b.shape
    ia, ib = a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}")
    bad = np.argwhere(ia != ib)
    assert bad.size == 0, f"{len(bad)} mismatches, first at {bad[0]}: {a[tuple(bad[0])]!r} vs {b[tuple(bad[0])]!r}"


shapes = st.tuples(st.integers(1, 5), st.integers(1, 200))
groups = st.one_of(st.none(), st.integers(1, 80))


@st.composite
def encode_case(draw):
    rows, cols = draw(shapes)
    bits, g = draw(BITS), draw(groups)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    cfg = eqcore.QuantConfig(bits=bits, group_size=g)
    _, ng = group_layout(cols, g)
    # scales: powers of two (exact ties x / s = k + 1/2 below), random, or subnormal
    kind = draw(st.sampled_from(["pow2", "random", "tiny"]))
    if kind == "pow2":
        scales = np.exp2(rng.integers(-8, 3, (rows, ng))).astype(np.float32)
    elif kind == "random":
        scales = rng.uniform(1e-3, 2.0, (rows, ng)).astype(np.float32)
    else:
        scales = rng.uniform(1e-42, 1e-38, (rows, ng)).astype(np.float32)  # subnormal float32
    s = np.repeat(scales, cols if g is None else min(g, cols), axis=1)[:, :cols]
    x = (s * rng.integers(-(1 << bits), 1 << bits, (rows, cols)) * 0.5).astype(np.float32)  # ties, clamps
    noise = rng.standard_normal((rows, cols)).astype(np.float32) * s * (1 << (bits - 1))
    x = np.where(rng.random((rows, cols)) < 0.5, x, noise).astype(np.float32)
    x[rng.random((rows, cols)) < 0.1] = 0.0
    return x, scales, cfg


def grid_params(rng, grid, bits, shape):
    """(zeros, codebook) for ``grid``: zero-points with fractions (ties of t + z), or strictly
    increasing levels, some exactly on quotients' midpoint ties."""
    if grid == "asymmetric":
        z = rng.integers(0, 1 << bits, shape) + rng.choice([0.0, 0.5, 0.25, 0.37], shape)
        return z.astype(np.float32), None
    if grid == "codebook":
        n = 1 << bits
        cb = np.sort(rng.choice(np.arange(-4 * n, 4 * n), n, replace=False)).astype(np.float32) / n
        return None, cb
    return None, None


@SETTINGS
@given(encode_case(), st.sampled_from(eqcore.layout.GRIDS), st.booleans())
def test_encode(lib, case, grid, misalign):
    x, scales, cfg = case
    zeros, cb = grid_params(np.random.default_rng(int(scales.size)), grid, cfg.bits, scales.shape)
    expected = encode_reference(x, scales, cfg.bits, cfg.group_size, zeros=zeros, codebook=cb)
    out = place(np.full(expected.shape, 0xDEADBEEF, np.uint32), misalign)
    run(lib, launch.encode_launch(place(x, misalign), place(scales, misalign), out, cfg.bits, cfg.group_size,
                                  zeros=None if zeros is None else place(zeros, misalign), codebook=cb))
    same_bits(out, expected)


@SETTINGS
@given(shapes, st.integers(0, 2**32 - 1))
def test_divide_cols(lib, shape, seed):
    """x / col in IEEE float32, subnormal quotients included (the encode input with column scales)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-140, 10, shape))).astype(np.float32)
    col = np.exp2(rng.uniform(-3, 3, shape[1])).astype(np.float32)
    out = np.full(shape, np.nan, np.float32)
    run(lib, launch.divide_cols_launch(x, col, out))
    same_bits(out, x / col)


@SETTINGS
@given(shapes, BITS, st.integers(0, 2**32 - 1), st.booleans())
def test_pack_unpack(lib, shape, bits, seed, misalign):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, shape).astype(np.uint8)
    expected = pack(codes, bits)
    packed = place(np.full(expected.shape, 0xFFFFFFFF, np.uint32), misalign)
    run(lib, launch.pack_launch(place(codes, misalign), packed, bits))
    same_bits(packed, expected)
    back = place(np.full(shape, 0xFF, np.uint8), misalign)
    run(lib, launch.unpack_launch(place(expected, misalign), back, bits))
    same_bits(back, unpack(expected, bits, shape[1]))


def quantized(rng, rows, cols, dtype, bits, sigma, g, steps=2, **grid) -> QuantizedTensor:
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2.0)).astype(weight_dtype(dtype))
    return eqcore.quantize(w, bits=bits, sigma=sigma, group_size=g, steps=steps, backend="numpy", **grid)


def f32(a):
    return None if a is None else np.ascontiguousarray(a.astype(np.float32))


def dequant_host(lib, qt: QuantizedTensor, out_dtype, misalign=False) -> np.ndarray:
    out = place(np.zeros(qt.shape, weight_dtype(out_dtype)) + np.asarray(7, weight_dtype(out_dtype)), misalign)
    run(lib, launch.dequant_launch(place(qt.qweight, misalign), qt.float_scales(), qt.outlier_rowptr, qt.outlier_cols,
                                   qt.outlier_vals, out, qt.bits, qt.group_size, f32(qt.zeros), f32(qt.codebook),
                                   f32(qt.col_scales)))
    return out


GRID_OPTIONS = st.sampled_from([{}, {"grid": "asymmetric"}, {"grid": "codebook"}, {"grid": "codebook", "codebook": "nf"},
                                {"col_scales": True}, {"grid": "asymmetric", "col_scales": True, "scale_dtype": "float16"},
                                {"grid": "codebook", "col_scales": True, "scale_dtype": "bfloat16"},
                                {"grid": "codebook", "scale_dtype": "log8"}, {"scale_dtype": "log8"}])


@SETTINGS
@given(st.tuples(st.integers(1, 4), st.integers(1, 300)), BITS, groups, st.sampled_from(DTYPES),
       st.sampled_from(DTYPES), st.sampled_from([None, 1.0, 2.0, 3.0]), st.integers(0, 2**32 - 1), st.booleans(),
       GRID_OPTIONS)
def test_dequant_fused(lib, shape, bits, g, dtype, out_dtype, sigma, seed, misalign, grid):
    qt = quantized(np.random.default_rng(seed), *shape, dtype, bits, sigma, g, **grid)
    same_bits(dequant_host(lib, qt, out_dtype, misalign), dequantize_reference(qt, out_dtype))


def near_max(rng, rows, cols, dtype, bits, sigma, g, **grid) -> QuantizedTensor:
    """Weights at the edge of ``dtype``'s range (a few outliers near its max, scales capped)."""
    top = float(np.finfo(np.float32).max) if dtype == "float64" else float(
        np.finfo(weight_dtype(dtype)).max if dtype != "bfloat16" else 3.3895313892515355e38)
    w = rng.uniform(-1, 1, (rows, cols)) * top * rng.uniform(0.5, 1.0)
    w[:, ::3] *= 1e-3
    w[0, 0] = top
    return eqcore.quantize(w.astype(weight_dtype(dtype)), bits=bits, sigma=sigma, group_size=g, steps=3,
                           backend="numpy", **grid)


@SETTINGS
@given(st.tuples(st.integers(1, 4), st.integers(1, 130)), BITS, groups, st.sampled_from(DTYPES),
       st.sampled_from(DTYPES), st.sampled_from([None, 1.0, 3.0]), st.integers(0, 2**32 - 1), GRID_OPTIONS)
def test_dequant_saturates_like_the_reference(lib, shape, bits, g, dtype, out_dtype, sigma, seed, grid):
    """Products and outliers beyond the output dtype's range clamp to its finite max, bit for bit."""
    qt = near_max(np.random.default_rng(seed), *shape, dtype, bits, sigma, g, **grid)
    got, want = dequant_host(lib, qt, out_dtype), dequantize_reference(qt, out_dtype)
    same_bits(got, want)
    assert np.all(np.isfinite(got.astype(np.float64)))


def test_dequant_multi_tile_int32_cols(lib):
    """cols > 65536: int32 outlier columns, 17 column tiles per row, ragged last block."""
    rng = np.random.default_rng(7)
    for bits, dtype in [(4, "bfloat16"), (3, "float16")]:
        qt = quantized(rng, 2, 65536 + 77, dtype, bits, 2.5, 4096, steps=1)
        assert qt.outlier_cols.dtype == np.int32 and qt.outliers.nnz > 100
        for out_dtype in ("float16", "bfloat16", "float32"):
            same_bits(dequant_host(lib, qt, out_dtype), dequantize_reference(qt, out_dtype))


def test_dequant_outliers_really_scattered(lib):
    """Guards against a tautology: the outlier phase must change the output."""
    qt = quantized(np.random.default_rng(1), 3, 100, "float32", 4, 1.0, None)
    assert qt.outliers.nnz > 0
    empty = QuantizedTensor(qt.qweight, qt.scales, np.zeros(4, np.int32), qt.outlier_cols[:0], qt.outlier_vals[:0],
                            shape=qt.shape, dtype=qt.dtype, bits=qt.bits)
    with_o, without = dequant_host(lib, qt, "float32"), dequant_host(lib, empty, "float32")
    changed = with_o != without
    assert changed.sum() == qt.outliers.nnz


def test_float64_outliers_round_like_the_reference(lib):
    """float64 outliers round once to every dtype (bfloat16 too, whatever ml_dtypes' own cast does:
    it rounds twice before 0.7): 1 + 2^-8 + 2^-30 -> bfloat16 1 + 2^-7, not 1 (ties to even)."""
    vals = np.array([1 + 2**-8 + 2**-30, 1 + 2**-11 + 2**-40, -(1 + 2**-11 + 2**-40), 1e-40], np.float64)
    qt = QuantizedTensor(np.zeros((1, 4), np.uint32), np.ones((1, 1), np.float32), np.array([0, 4], np.int32),
                         np.arange(4, dtype=np.uint16), vals, shape=(1, 4), dtype="float64", bits=4)
    for out_dtype in ("float16", "bfloat16", "float32", "float64"):
        same_bits(dequant_host(lib, qt, out_dtype), dequantize_reference(qt, out_dtype))
    assert float(dequant_host(lib, qt, "bfloat16")[0, 0]) == 1 + 2**-7


def gemv_host(lib, x, qt: QuantizedTensor, misalign=False, warps=None) -> np.ndarray:
    """x @ W^T by the GEMV kernel on the host (x and qweight 16-byte aligned unless ``misalign``;
    ``warps`` per block, default the launch's)."""
    out = np.full((x.shape[0], qt.shape[0]), np.nan, np.float32)
    run(lib, launch.gemv_launch(place(x, misalign), place(qt.qweight, misalign), qt.float_scales(), qt.outlier_rowptr,
                                qt.outlier_cols, qt.outlier_vals, out, qt.bits, qt.group_size, f32(qt.zeros),
                                f32(qt.codebook), f32(qt.col_scales), warps=warps))
    return out


# whole blocks (the fast path) as often as ragged ones; groups whole blocks or not
gemv_cols = st.one_of(st.integers(1, 300), st.integers(1, 9).map(lambda k: 32 * k))
gemv_groups = st.one_of(st.none(), st.sampled_from([32, 64]), st.integers(1, 80))


@SETTINGS
@given(st.tuples(st.integers(1, 19), gemv_cols), BITS, gemv_groups, st.integers(1, launch.GEMV_BATCHES[-1]),
       st.sampled_from(DTYPES), st.sampled_from([None, 1.5, 3.0]), st.integers(0, 2**32 - 1), st.booleans(),
       GRID_OPTIONS, st.sampled_from([None, 2, launch.GV_WARPS]))
def test_gemv_matches_the_reference(lib, shape, bits, g, batch, dtype, sigma, seed, misalign, grid, warps):
    """Warps forced above what the row fills leave some with no units (their sums are zeros)."""
    rng = np.random.default_rng(seed)
    qt = quantized(rng, *shape, dtype, bits, sigma, g, **grid)
    x = rng.standard_normal((batch, shape[1])).astype(np.float32)
    assert_matmul_close(gemv_host(lib, x, qt, misalign, warps), x, qt)


@pytest.mark.parametrize("bits, cols, batch", [(2, 2048 + 64, 1), (3, 4096 + 128, 5), (4, 1024 + 96, 8),
                                               (8, 1024 + 36, 2), (3, 65536 + 77, 3)])
def test_gemv_long_rows(lib, bits, cols, batch):
    """Several warps on a row's columns, lanes that take several units of it; 65536+ columns: int32
    outlier columns. The warps' sums are added in a fixed order: a repeated launch gives the same bits."""
    rng = np.random.default_rng(bits)
    qt = quantized(rng, 3, cols, "bfloat16", bits, 2.5, 128, steps=1, grid="asymmetric")
    x = rng.standard_normal((batch, cols)).astype(np.float32)
    assert launch.gemv_warps(bits, cols) > 1
    y = gemv_host(lib, x, qt)
    assert_matmul_close(y, x, qt)
    assert_matmul_close(gemv_host(lib, x, qt, warps=1), x, qt)
    assert np.array_equal(y, gemv_host(lib, x, qt))


def test_gemv_warps_fill_the_row():
    """One warp per 32 vector units of a row (16 bytes each), at most GV_WARPS: LLaMA-7B's 4096
    columns at 4 bits are 128 units, so 4 warps of one unit per lane."""
    assert launch.gemv_warps(4, 4096) == min(4, launch.GV_WARPS)
    assert launch.gemv_warps(4, 1024) == 1 and launch.gemv_warps(4, 1025) == 2
    assert launch.gemv_warps(2, 2048) == 1 and launch.gemv_warps(2, 2049) == 2  # 64 codes a unit
    assert launch.gemv_warps(3, 4096) == 1 and launch.gemv_warps(3, 4097) == 2  # 128 codes a unit
    assert launch.gemv_warps(8, 1) == 1 and launch.gemv_warps(8, 10**6) == launch.GV_WARPS


def test_gemv_outliers_are_part_of_the_product(lib):
    """Guards against a tautology: without the outlier terms the product misses the tolerance."""
    rng = np.random.default_rng(2)
    qt = quantized(rng, 9, 96, "float32", 4, 1.0, 32, grid="asymmetric")
    assert qt.outliers.nnz > 0
    x = rng.standard_normal((3, 96)).astype(np.float32)
    assert_matmul_close(gemv_host(lib, x, qt), x, qt)
    empty = dataclasses.replace(qt, outlier_rowptr=np.zeros(10, np.int32), outlier_cols=qt.outlier_cols[:0],
                                outlier_vals=qt.outlier_vals[:0])
    with pytest.raises(AssertionError):
        assert_matmul_close(gemv_host(lib, x, empty), x, qt)


def test_launch_plans_refuse_bad_arrays():
    x = np.zeros((2, 40), np.float32)
    with pytest.raises(ValueError, match="scales"):
        launch.encode_launch(x, np.zeros((2, 2), np.float32), np.zeros((2, 8), np.uint32), 4, None)
    with pytest.raises(ValueError, match="C-contiguous"):
        launch.pack_launch(np.zeros((40, 2), np.uint8).T, np.zeros((2, 8), np.uint32), 4)
    empty = (np.zeros(3, np.int32), np.zeros(0, np.uint16), np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="output dtype"):
        launch.dequant_launch(np.zeros((2, 4), np.uint32), np.ones((2, 1), np.float32), *empty,
                              np.zeros((2, 4), np.int16), 4, None)
    with pytest.raises(ValueError, match="out of range"):  # a column past the output would write out of bounds
        launch.dequant_launch(np.zeros((2, 4), np.uint32), np.ones((2, 1), np.float32), np.array([0, 1, 1], np.int32),
                              np.array([4], np.uint16), np.ones(1, np.float32), np.zeros((2, 4), np.float32), 4, None)
    with pytest.raises(ValueError, match="outlier_rowptr"):
        launch.dequant_launch(np.zeros((2, 4), np.uint32), np.ones((2, 1), np.float32),
                               np.array([0, 3, 1], np.int32), np.zeros(1, np.uint16), np.ones(1, np.float32),
                               np.zeros((2, 4), np.float32), 4, None)
    with pytest.raises(ValueError, match="GEMV takes 1 to"):
        launch.gemv_launch(np.zeros((9, 32), np.float32), np.zeros((2, 4), np.uint32), np.ones((2, 1), np.float32),
                           *empty, np.zeros((9, 2), np.float32), 4, None)
    with pytest.raises(ValueError, match="GEMV block has 1 to"):
        launch.gemv_launch(np.zeros((2, 32), np.float32), np.zeros((2, 4), np.uint32), np.ones((2, 1), np.float32),
                           *empty, np.zeros((2, 2), np.float32), 4, None, warps=launch.GV_WARPS + 1)
