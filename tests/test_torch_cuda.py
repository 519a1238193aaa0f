"""eqcore.torch on CUDA: QuantizedLinear built on the GPU or moved there, against the dense layer of
the dequantized weight; a quantized transformers folder on the GPU against the CPU. Needs a GPU."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
cp = pytest.importorskip("cupy")

import eqcore  # noqa: E402
from eqcore.tensor import QuantizedTensor  # noqa: E402
from eqcore.torch import QuantizedLinear, load_pretrained  # noqa: E402

from helpers import assert_matmul_close  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="this torch has no CUDA")]

GRIDS = [dict(bits=4), dict(bits=3, group_size=64, grid="asymmetric"),
         dict(bits=2, group_size=32, grid="codebook", col_scales=True), dict(bits=8, group_size=128)]


def host(qt):
    return QuantizedTensor.from_arrays({f: cp.asnumpy(a) for f, a in qt.arrays().items()}, qt.metadata())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("opts", GRIDS)
def test_forward_on_cuda_is_the_dense_layer_of_the_dequantized_weight(dtype, opts):
    """Built from a CUDA nn.Linear (quantized on the GPU); batches on both GPU paths (GEMV up to 8
    rows, dequantize + cuBLAS beyond): the float32 product within the matmul contract, the output
    in the input's dtype."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(520, 72).to("cuda", dtype)
    q = QuantizedLinear.from_linear(lin, sigma=2.5, **opts)
    assert q.qweight.is_cuda and isinstance(q.quantized.qweight, cp.ndarray)
    qt = host(q.quantized)
    bias = lin.bias.detach().float().cpu().numpy()
    for batch in (1, 3, 8, 9, 40):
        x = torch.randn(2, batch, 520, device="cuda", dtype=dtype)
        y = q(x)
        assert y.is_cuda and y.dtype == dtype and y.shape == (2, batch, 72)
        xf = x.float().cpu().numpy()
        if dtype == torch.float32:
            assert_matmul_close(y.cpu().numpy() - bias, xf, qt)
        else:  # float32 result rounded once to the input's dtype
            want = torch.from_numpy(xf.reshape(-1, 520) @ eqcore.dequantize(qt, np.float32).T + bias)
            torch.testing.assert_close(y.reshape(-1, 72).cpu(), want.to(dtype), rtol=1e-2, atol=1e-3)


def test_a_cpu_layer_moved_to_cuda_computes_the_same():
    torch.manual_seed(1)
    lin = torch.nn.Linear(300, 50)
    q = QuantizedLinear.from_linear(lin, bits=4, group_size=64, sigma=2.0)
    x = torch.randn(5, 300)
    y_cpu = q(x)
    g = q.to("cuda")
    assert all(b.is_cuda for b in g.buffers()) and isinstance(g.quantized.scales, cp.ndarray)
    y_gpu = g(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="module.to"):
        g(x)
    back = g.to("cpu")
    torch.testing.assert_close(back(x), y_cpu, rtol=0, atol=0)


def test_state_dict_of_a_cuda_layer_loads_into_a_cpu_layer():
    torch.manual_seed(2)
    q = QuantizedLinear.from_linear(torch.nn.Linear(128, 40).cuda(), bits=3, group_size=32)
    other = QuantizedLinear.from_linear(torch.nn.Linear(128, 40), bits=3, group_size=32)
    other.load_state_dict({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in q.state_dict().items()})
    x = torch.randn(4, 128)
    torch.testing.assert_close(other(x), q(x.cuda()).cpu(), rtol=1e-5, atol=1e-5)


def test_a_quantized_folder_runs_on_the_gpu(tmp_path):
    """load_pretrained(...).to("cuda"), and transformers' from_pretrained(device_map="cuda") after
    ``import eqcore.hf``: every QuantizedLinear on the GPU, logits as on the CPU."""
    pytest.importorskip("transformers")
    import transformers

    import eqcore.hf  # noqa: F401
    from test_torch_layer import _tiny_lm_folder

    _tiny_lm_folder(tmp_path / "float")
    eqcore.quantize_checkpoint(tmp_path / "float", tmp_path / "q", eqcore.QuantConfig(bits=4), progress=False)
    cpu = load_pretrained(tmp_path / "q")
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ref = cpu(ids).logits
        moved = load_pretrained(tmp_path / "q").to("cuda")
        assert all(m.qweight.is_cuda for m in moved.modules() if isinstance(m, QuantizedLinear))
        torch.testing.assert_close(moved(ids.cuda()).logits.cpu(), ref, rtol=1e-4, atol=1e-4)
        auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cuda")
        layers = [m for m in auto.modules() if isinstance(m, QuantizedLinear)]
        assert len(layers) == 2 * 7 and all(m.qweight.is_cuda for m in layers)
        torch.testing.assert_close(auto(ids.cuda()).logits.cpu(), ref, rtol=1e-4, atol=1e-4)
