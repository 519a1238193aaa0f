"""bench/matmul_gpu.py without a GPU: its arguments, its table's arithmetic, and a clean refusal."""
import pytest

from eqcore.backends import gpu_available

from bench import matmul_gpu


def test_arguments():
    a = matmul_gpu.parse_args([])
    assert (a.bits, a.group_size, a.repeats) == (4, None, 100)
    assert matmul_gpu.parse_args(["--quick", "--bits", "3"]).repeats == 10
    with pytest.raises(SystemExit):
        matmul_gpu.parse_args(["--repeats", "0"])


def test_table_reports_weight_bandwidth_against_the_copy():
    row = dict(shape="4096x4096", batch=1, path="GEMV", q_bytes=9_000_000, fp16_bytes=33_554_432, t_kernel=5e-6,
               t_call=3e-5, t_fp16=1.6e-5, outliers=0.003)
    head, rule, line = matmul_gpu.table([row], copy=3000.0)
    assert head.count("|") == rule.count("|") == line.count("|")
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells == ["4096x4096", "1", "GEMV", "5.0", "30.0", "16.0", "3.20", "1800", "2097", "0.60"]


@pytest.mark.skipif(gpu_available(), reason="with a GPU this would run the benchmark")
def test_refuses_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as e:
        matmul_gpu.main(["--quick"])
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(gpu_available(), reason="with a GPU this would run the benchmark")
@pytest.mark.parametrize("module", ["gpu_kernels", "gpu_geometry"])
def test_the_other_gpu_benchmarks_refuse_without_a_gpu(capsys, module):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"bench.{module}").main(["--out", "/nonexistent/never-written.md"])
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_gpu_kernels_report_compares_the_solvers():
    """The quantize section lists each configuration's times and losses, Adam's rows marked '-'."""
    import types

    from bench import gpu_kernels

    a = gpu_kernels.parse_args([])
    labels = [label for label, _ in gpu_kernels.quantize_configs(a)]
    assert labels == ["default", "adam 500"]
    qnt = [dict(config=lab, describe=lab, shape="4096x4096", count=128, t_s=t, total_s=128 * t, loss=1.0)
           for lab, t in zip(labels, (0.5, 0.1))]
    qnt[0]["rows_le_adam"] = 0.995
    rt = types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"GPU", "major": 9, "minor": 0},
                               runtimeGetVersion=lambda: 13000)
    cp = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=rt, Device=lambda: types.SimpleNamespace(id=0)),
                               __version__="14")
    text = gpu_kernels.report(cp, a, [], qnt)
    assert "| 4096x4096 | 128 | 0.500 | 64.0 | 1 | 99.50% |" in text
    assert "| 4096x4096 | 128 | 0.100 | 12.8 | 1 | - |" in text
