"""CPU gate for raw_kernels/: every instantiation compiles for sm_80 and sm_90 with the
options eqcore.kernels uses at run time, and ptxas reports no spills and no stack.

Needs NVRTC (the CUDA pip wheel, through CuPy); no GPU. Prints a register table
(pytest -s)."""
import re

import pytest

from eqcore import kernels

ARCHS = ("sm_80", "sm_90")
ENTRY = re.compile(
    r"Function properties for (\S+)\s*\n\s*ptxas\s+\.\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads\s*\n.*?Used (\d+) registers", re.S)


def parse_ptxas(log: str) -> dict:
    """{mangled name: (stack, spill stores, spill loads, registers)} from ``ptxas -v`` output."""
    return {m.group(1): tuple(int(m.group(i)) for i in range(2, 6)) for m in ENTRY.finditer(log)}


def test_parse_ptxas():
    log = ("ptxas info    : Function properties for _Z1kv\n"
           "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 72 registers, used 1 barriers, 8192 bytes smem\n")
    assert parse_ptxas(log) == {"_Z1kv": (8, 4, 4, 72)}


def _nvrtc():
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # no CuPy or no libnvrtc
        pytest.skip(f"no NVRTC available ({e}); install eqcore[cuda]")
    if kernels.cuda_include_dir() is None:
        pytest.skip("cuda_fp16.h not found (CUDA pip wheel or CUDA_PATH)")


@pytest.fixture(scope="module", params=ARCHS)
def compiled(request):
    _nvrtc()
    return request.param, kernels.nvrtc_compile(kernels.all_names(), request.param, ["--ptxas-options=-v"])


def test_no_spills(compiled):
    arch, c = compiled
    stats = parse_ptxas(c.log)
    names = {v: k for k, v in c.lowered.items()}
    assert set(stats) >= set(names), f"ptxas -v said nothing about {sorted(set(names) - set(stats))}"
    assert len(c.image) > 0
    print(f"\n{arch}: registers per kernel")
    bad = []
    for mangled, expr in sorted(names.items(), key=lambda kv: kv[1]):
        stack, st, ld, regs = stats[mangled]
        print(f"  {expr:52s} {regs:4d} regs")
        if stack or st or ld:
            bad.append(f"{expr}: {stack} B stack, {st} B spill stores, {ld} B spill loads")
    assert not bad, f"{arch}: " + "; ".join(bad)


def test_names_are_unique_instantiations(compiled):
    _, c = compiled
    assert len(set(c.lowered.values())) == len(kernels.all_names()) == 4 * 3 + 4 * 4 * 2 + 4 * 2


def test_no_fast_math_in_options():
    opts = kernels.nvrtc_options("sm_90")
    assert "-ftz=false" in opts and "-prec-div=true" in opts and "-fmad=false" in opts
    assert not any("fast-math" in o or o == "-ftz=true" for o in opts)


def test_ptx_keeps_ieee_division_and_subnormals():
    """The PTX must use div.rn.f32 / mul.rn.f32 / cvt.rni without .ftz (exact contract)."""
    _nvrtc()
    ptx = kernels.nvrtc_compile([kernels.encode_name(4), kernels.dequant_name(4, "bfloat16", "uint16")],
                                "compute_90").image.decode()
    assert re.search(r"div\.rn\.f32", ptx) and re.search(r"mul\.rn\.f32", ptx)
    assert re.search(r"cvt\.rni\.f32\.f32", ptx)
    assert ".ftz" not in ptx and "div.approx" not in ptx and "div.full" not in ptx
