"""Any array framework in, NumPy (CPU) or CuPy (GPU) out: torch and JAX through DLPack."""
import ml_dtypes
import numpy as np
import pytest

import eqcore
from eqcore.interop import as_array

from helpers import weights

BF16 = np.dtype(ml_dtypes.bfloat16)


def _same_quantization(a, ref):
    qa, qr = eqcore.quantize(a, bits=4, steps=20), eqcore.quantize(ref, bits=4, steps=20)
    assert qa.dtype == qr.dtype
    for f in ("qweight", "scales", "outlier_cols", "outlier_vals"):
        assert getattr(qa, f).tobytes() == getattr(qr, f).tobytes(), f
    assert isinstance(eqcore.dequantize(qa), np.ndarray)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_cpu_tensors(dtype):
    torch = pytest.importorskip("torch")
    ref = weights(16, 96, seed=1, dtype=np.float32).astype(BF16 if dtype == "bfloat16" else dtype)
    t = torch.from_numpy(ref.astype(np.float32)).to(getattr(torch, dtype))
    arr = as_array(t)
    assert isinstance(arr, np.ndarray) and arr.dtype == ref.dtype
    np.testing.assert_array_equal(arr.astype(np.float32), ref.astype(np.float32))
    _same_quantization(t, ref)


def test_torch_views_are_not_copied_and_grad_tensors_work():
    torch = pytest.importorskip("torch")
    t = torch.zeros(4, 32, requires_grad=True)
    arr = as_array(t)
    with torch.no_grad():
        t[0, 0] = 3.0
    assert arr[0, 0] == 3.0  # a view: DLPack shares the memory
    w = torch.from_numpy(weights(16, 96, seed=3)).requires_grad_()  # a weight that requires grad
    _same_quantization(w, weights(16, 96, seed=3))
    assert w.requires_grad and w.grad is None  # untouched


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_results_go_back_to_torch_without_copies(dtype):
    torch = pytest.importorskip("torch")
    ref = weights(16, 96, seed=4).astype(BF16 if dtype == "bfloat16" else dtype)
    d = eqcore.dequantize(eqcore.quantize(ref, bits=4, steps=5))
    t = eqcore.to_torch(d)
    assert t.dtype == getattr(torch, dtype) and tuple(t.shape) == d.shape
    np.testing.assert_array_equal(t.float().numpy(), d.astype(np.float32))
    d[0, 0] = 7  # the same memory
    assert float(t[0, 0]) == 7.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_results_go_back_to_jax(dtype):
    jnp = pytest.importorskip("jax.numpy")
    ref = weights(16, 96, seed=5).astype(BF16 if dtype == "bfloat16" else dtype)
    d = eqcore.dequantize(eqcore.quantize(ref, bits=4, steps=5))
    j = eqcore.to_jax(d)
    assert j.dtype == jnp.dtype(d.dtype) and j.shape == d.shape
    np.testing.assert_array_equal(np.asarray(j).astype(np.float32), d.astype(np.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_arrays(dtype):
    jnp = pytest.importorskip("jax.numpy")
    ref = weights(16, 96, seed=2, dtype=np.float32).astype(BF16 if dtype == "bfloat16" else dtype)
    import jax

    j = jax.device_put(jnp.asarray(ref), jax.devices("cpu")[0])  # a host array also where JAX has a GPU
    arr = as_array(j)
    assert isinstance(arr, np.ndarray) and arr.dtype == ref.dtype
    _same_quantization(j, ref)


def test_numpy_input_with_gpu_backend_is_refused():
    with pytest.raises(ValueError, match="cannot run on NumPy"):
        eqcore.quantize(weights(4, 32), backend="cupy")
    with pytest.raises(ValueError, match="backend must be one of"):
        eqcore.quantize(weights(4, 32), backend="tpu")
