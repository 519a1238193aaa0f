"""CPU gate for raw_kernels/: every instantiation compiles for sm_80 and sm_90 with the
options eqcore uses at run time (eqcore.backends.nvrtc), and ptxas reports no spills and no
stack. Needs NVRTC (the CUDA pip wheels and cuda-bindings); no GPU. Prints a register table
(pytest -s)."""
import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest

from eqcore.backends import launch, nvrtc

ARCHS = ("sm_80", "sm_90")


def _nvrtc():
    try:
        nvrtc.version()
    except Exception as e:  # no cuda-bindings or no libnvrtc
        pytest.skip(f"no NVRTC available ({e}); install eqcore[test] or eqcore[cuda]")
    if nvrtc.cuda_include_dir() is None:
        pytest.skip("cuda_fp16.h not found (CUDA pip wheel or CUDA_PATH)")


def by_file(names):
    files = defaultdict(list)
    for n in names:
        files[launch.source_of(n)].append(n)
    return files


@pytest.fixture(scope="module")
def compiled_all():
    """{arch: {source file: Compiled}} for every kernel the library can launch, each (file, arch)
    compiled in its own thread (NVRTC releases the GIL: on 2 cores the gate took 574 s one at a
    time, 2026-12-02, AMD EPYC (znver3))."""
    _nvrtc()
    jobs = [(arch, f, names) for f, names in by_file(launch.all_names()).items() for arch in ARCHS]
    jobs.sort(key=lambda j: -len(j[2]))  # the files with the most kernels first
    with ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        done = pool.map(lambda j: nvrtc.nvrtc_compile(j[2], j[0], ["--ptxas-options=-v"]), jobs)
        out = {arch: {} for arch in ARCHS}
        for (arch, f, _), c in zip(jobs, done):
            out[arch][f] = c
    return out


@pytest.fixture(params=ARCHS)
def compiled(request, compiled_all):
    """(arch, {source file: Compiled})."""
    return request.param, compiled_all[request.param]


def test_ptxas_stats_reads_the_nvrtc_log():
    log = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z1kv\n"
           "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 72 registers, used 1 barriers, 8192 bytes smem\n"
           "ptxas info    : Compiling entry function '_Z1jv' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z1jv\n"
           "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 16 registers\n")
    assert nvrtc.ptxas_stats(log) == {"_Z1kv": (8, 4, 4, 72), "_Z1jv": (0, 0, 0, 16)}


def test_no_spills(compiled):
    arch, by_source = compiled
    bad = []
    print(f"\n{arch}: registers per kernel")
    for file, c in sorted(by_source.items()):
        stats = nvrtc.ptxas_stats(c.log)
        names = {v: k for k, v in c.lowered.items()}
        assert set(stats) >= set(names), f"ptxas -v said nothing about {sorted(set(names) - set(stats))}"
        assert len(c.image) > 0
        for mangled, expr in sorted(names.items(), key=lambda kv: kv[1]):
            stack, st, ld, regs = stats[mangled]
            print(f"  {file:11s} {expr:52s} {regs:4d} regs")
            if stack or st or ld:
                bad.append(f"{expr}: {stack} B stack, {st} B spill stores, {ld} B spill loads")
    assert not bad, f"{arch}: " + "; ".join(bad)


def test_names_are_unique_instantiations(compiled):
    _, by_source = compiled
    lowered = [m for c in by_source.values() for m in c.lowered.values()]
    gemv = 4 * 3 * len(launch.GEMV_BATCHES)
    assert len(set(lowered)) == len(launch.all_names()) == 4 * 3 + 4 * 2 + 1 + 4 * 3 * 4 * 2 + gemv


def test_options_keep_ieee_and_carry_the_contract():
    opts = nvrtc.options("sm_90")
    assert "-ftz=false" in opts and "-prec-div=true" in opts and "-fmad=false" in opts
    assert not any("fast-math" in o or o == "-ftz=true" for o in opts)
    assert "-DEQ_BLOCK=32" in opts and f"-DEQ_DQ_THREADS={launch.DQ_THREADS}" in opts
    assert f"-DEQ_GV_WARPS={launch.GV_WARPS}" in opts and f"-DEQ_GV_ROWS={launch.GV_ROWS}" in opts


def test_kernels_refuse_to_compile_without_the_contract_defines(monkeypatch):
    """The .cu files take the layout only from Python: without the -D defines they do not build."""
    _nvrtc()
    monkeypatch.setattr(nvrtc, "defines", lambda: [])
    with pytest.raises(RuntimeError, match="compile through eqcore.backends.nvrtc"):
        nvrtc.nvrtc_compile([launch.encode_name(4)], "compute_90")


def test_compiling_leaves_python_constants_alone():
    """NVRTC writes its log into the buffer it is given; an empty log (one NUL byte) once went into
    the interpreter's shared b" " object and turned every later b" " * n into NUL bytes."""
    _nvrtc()
    c = nvrtc.nvrtc_compile([launch.encode_name(4)], "compute_90")
    assert c.log == "" and b" "[0] == 0x20 and (b" " * 3) == bytes([32, 32, 32])


def test_ptx_keeps_ieee_division_and_subnormals():
    """The PTX must use div.rn.f32 / mul.rn.f32 / cvt.rni without .ftz (exact contract)."""
    _nvrtc()
    ptx = nvrtc.nvrtc_compile([launch.encode_name(4)], "compute_90").image.decode()
    ptx += nvrtc.nvrtc_compile([launch.dequant_name(4, "bfloat16", "uint16")], "compute_90").image.decode()
    assert re.search(r"div\.rn\.f32", ptx) and re.search(r"mul\.rn\.f32", ptx)
    assert re.search(r"cvt\.rni\.f32\.f32", ptx)
    assert ".ftz" not in ptx and "div.approx" not in ptx and "div.full" not in ptx


def test_gemv_ptx_is_vectorised_and_exact():
    """The GEMV reads packed words and x with 128-bit loads, reduces with warp shuffles, accumulates
    with explicit fused multiply-adds, turns codes into floats without int-to-float conversions
    (quarter-rate), and keeps subnormals."""
    _nvrtc()
    ptx = nvrtc.nvrtc_compile([launch.gemv_name(3, 1), launch.gemv_name(4, 8, "codebook")], "compute_90").image.decode()
    for pattern in (r"ld\.global\.nc\.v4\.u32", r"ld\.global\.nc\.v4\.f32", r"shfl\.sync\.bfly", r"fma\.rn\.f32"):
        assert re.search(pattern, ptx), pattern
    assert not re.search(r"cvt\.rn\.f32\.[us]32", ptx) and ".ftz" not in ptx and ".local" not in ptx


def test_precompile_fills_the_cache(tmp_path, monkeypatch):
    """precompile() leaves a cubin per kernel in the cache (two processes), and a second call
    finds them there (compiles nothing)."""
    _nvrtc()
    monkeypatch.setenv("EQCORE_CACHE_DIR", str(tmp_path))
    names = [launch.pack_name(4), launch.gemv_name(3, 1)]
    assert nvrtc.precompile("sm_90", names, jobs=2) == 2
    cubins = sorted((tmp_path / "kernels").glob("*.cubin"))
    assert len(cubins) == 2 and all(c.stat().st_size > 0 for c in cubins)
    monkeypatch.setattr(nvrtc, "nvrtc_compile", lambda *a: pytest.fail("compiled again"))
    assert nvrtc.precompile("sm_90", names, jobs=1) == 2
