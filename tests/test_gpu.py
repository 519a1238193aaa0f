"""Real CUDA kernels (eqcore.backends.cupy) against the NumPy reference: bit for bit, matmul within
its contract's tolerance (helpers.assert_matmul_close). Needs a GPU."""
import numpy as np
import pytest

import eqcore
from eqcore.backends import cupy as gpu
from eqcore.backends import launch, nvrtc
from eqcore.backends.numpy import dequantize as dequantize_reference
from eqcore.dtypes import weight_dtype
from eqcore.outliers import find_outliers
from eqcore.backends.numpy import pack, unpack
from eqcore.backends.numpy import encode as encode_reference
from eqcore.layout import group_layout
from eqcore.tensor import QuantizedTensor

from helpers import assert_matmul_close

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")

SHAPES = [(1, 1), (3, 33), (7, 100), (17, 4096), (5, 4099), (2, 65536 + 77), (64, 11008)]
DTYPES = ["float16", "bfloat16", "float32"]


def same_bits(a, b):
    a = a.get() if hasattr(a, "get") else a
    assert a.dtype == b.dtype and a.shape == b.shape
    ia, ib = a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}")
    bad = np.argwhere(ia != ib)
    assert bad.size == 0, f"{len(bad)} mismatches, first at {bad[0]}"


def host(qt):
    return QuantizedTensor.from_arrays({f: cp.asnumpy(a) for f, a in qt.arrays().items()}, qt.metadata())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequant_fused_matches_reference(shape, bits):
    rng = np.random.default_rng(hash((shape, bits)) % 2**32)
    for dtype, g, sigma in [("float16", None, 3.0), ("bfloat16", 128, 2.0), ("float32", 7, None)]:
        w = (rng.standard_normal(shape) * 0.02).astype(weight_dtype(dtype))
        qt = eqcore.quantize(w, bits=bits, group_size=g, sigma=sigma, steps=0, backend="numpy")  # max-abs: fast
        for out in DTYPES:
            same_bits(gpu.dequantize(qt, out), dequantize_reference(qt, out))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_encode_pack_unpack_match_reference(shape, bits):
    rng = np.random.default_rng(1)
    ng = group_layout(shape[1], 64)[1]
    x = rng.standard_normal(shape).astype(np.float32)
    scales = rng.uniform(0.05, 1.0, (shape[0], ng)).astype(np.float32)
    scales[0, 0] = 1e-40  # subnormal: checks the kernels are not built with -ftz=true
    same_bits(gpu.encode(x, scales, bits, 64), encode_reference(x, scales, bits, 64))
    codes = rng.integers(0, 1 << bits, shape).astype(np.uint8)
    packed = pack(codes, bits)
    same_bits(gpu.pack(cp.asarray(codes), bits), packed)
    same_bits(gpu.unpack(cp.asarray(packed), bits, shape[1]), unpack(packed, bits, shape[1]))


def test_dequantize_into_out_and_log8_on_the_device():
    w = (np.random.default_rng(4).standard_normal((33, 200)) * 0.02).astype(np.float16)
    qt = eqcore.quantize(cp.asarray(w), group_size=32, grid="codebook", scale_dtype="log8")
    assert isinstance(qt.scales, cp.ndarray) and qt.scales.dtype == np.uint8 and qt.row_scales.dtype == np.float16
    out = cp.full(qt.shape, 7, np.float16)
    assert eqcore.dequantize(qt, out=out) is out
    same_bits(out, dequantize_reference(host(qt)))
    with pytest.raises(ValueError, match="CuPy array"):
        eqcore.dequantize(qt, out=np.empty(qt.shape, np.float16))


def test_pack_refuses_out_of_range_codes():
    with pytest.raises(ValueError, match="codes must lie"):
        gpu.pack(cp.full((2, 3), 16, cp.uint8), 4)


def test_public_pack_unpack_dispatch_to_the_gpu():
    codes = np.random.default_rng(3).integers(0, 8, (5, 70)).astype(np.uint8)
    packed = eqcore.pack(cp.asarray(codes), 3)
    assert isinstance(packed, cp.ndarray)
    same_bits(packed, pack(codes, 3))
    same_bits(eqcore.unpack(packed, 3, 70), codes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group_size", [(4, None), (3, 128), (8, 64), (2, None)])
def test_quantize_on_gpu(dtype, bits, group_size):
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((96, 1000)) * 0.02).astype(weight_dtype(dtype))
    qt = eqcore.quantize(cp.asarray(w), bits=bits, group_size=group_size, steps=20)
    assert isinstance(qt.qweight, cp.ndarray) and isinstance(qt.scales, cp.ndarray)
    o, mask = find_outliers(w, 3.0, stats=eqcore.QuantConfig().outlier_stats)  # the default rule
    same_bits(qt.outlier_rowptr, o.rowptr)
    same_bits(qt.outlier_cols, o.cols)
    same_bits(qt.outlier_vals, o.vals)
    x = w.astype(np.float32)
    x[mask] = 0
    same_bits(qt.qweight, encode_reference(x, cp.asnumpy(qt.scales), bits, group_size))
    ref = eqcore.quantize(w, bits=bits, group_size=group_size, steps=20, backend="numpy")
    np.testing.assert_allclose(cp.asnumpy(qt.scales), ref.scales, rtol=1e-5)
    same_bits(eqcore.dequantize(qt), dequantize_reference(host(qt)))


def test_torch_dlpack_input():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        t = torch.randn(64, 300, device="cuda", dtype=dt) * 0.02
        qt = eqcore.quantize(t, bits=4, steps=5)
        assert isinstance(qt.qweight, cp.ndarray)
        same_bits(gpu.dequantize(qt), dequantize_reference(host(qt)))
        back = eqcore.to_torch(eqcore.dequantize(qt))
        assert back.is_cuda and back.dtype == dt and back.shape == t.shape


def test_jax_dlpack_input():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX has no GPU")
    for dt in (jnp.float16, jnp.bfloat16, jnp.float32):
        a = (jax.random.normal(jax.random.PRNGKey(0), (64, 300)) * 0.02).astype(dt)
        qt = eqcore.quantize(a, bits=3, steps=5)
        assert isinstance(qt.qweight, cp.ndarray)
        same_bits(gpu.dequantize(qt), dequantize_reference(host(qt)))


MATMUL_GRIDS = [dict(group_size=None), dict(group_size=128, grid="asymmetric", scale_dtype="float16"),
                dict(group_size=64, grid="codebook", col_scales=True), dict(group_size=40, col_scales=True),
                dict(group_size=32, grid="codebook", scale_dtype="log8")]


def on_device(a, misalign: bool):
    """A C-contiguous CuPy copy of ``a``, 4 bytes past a 16-byte boundary if asked."""
    buf = cp.empty(a.size + 4, a.dtype)
    out = buf[1 if misalign else 0:][:a.size].reshape(a.shape)
    out[...] = cp.asarray(a)
    return out


@pytest.mark.parametrize("shape", [(3, 33), (37, 4096), (5, 4099), (2, 65536 + 77), (130, 11008)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matmul_matches_reference(shape, bits, monkeypatch):
    """Batches 1-8 run the GEMV kernel (checked), 9 and 17 the dequantize + cuBLAS baseline; x aligned
    or not."""
    rng = np.random.default_rng(hash((shape, bits)) % 2**32)
    w = (rng.standard_normal(shape) * 0.02).astype(np.float16)
    launched, run = [], nvrtc.run

    def spy(plan):
        launched.append(plan.name)
        run(plan)

    monkeypatch.setattr(nvrtc, "run", spy)
    for opts in MATMUL_GRIDS:
        qt = eqcore.quantize(w, bits=bits, sigma=2.5, steps=0, backend="numpy", **opts)
        for batch in (1, 2, 3, 4, 8, 9, 17):
            x = rng.standard_normal((batch, shape[1])).astype(np.float32)
            for misalign in (False, True):
                launched.clear()
                y = gpu.matmul(on_device(x, misalign), qt)
                assert isinstance(y, cp.ndarray) and y.dtype == np.float32 and y.shape == (batch, shape[0])
                assert any(n.startswith("eq::gemv<") for n in launched) == (batch <= launch.GEMV_BATCHES[-1])
                assert_matmul_close(cp.asnumpy(y), x, qt)


def test_matmul_outliers_are_part_of_the_product():
    w = (np.random.default_rng(2).standard_normal((8, 64)) * 0.02).astype(np.float32)
    w[3, 5] = 40.0  # far outside the grid: only its exact value gives the right product
    qt = eqcore.quantize(w, bits=3, grid="asymmetric", group_size=32, backend="numpy")
    x = np.zeros((1, 64), np.float32)
    x[0, 5] = 1.0
    y = cp.asnumpy(gpu.matmul(cp.asarray(x), qt))
    assert y[0, 3] == pytest.approx(40.0, rel=1e-6)
    assert_matmul_close(y, x, qt)
