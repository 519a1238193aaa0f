#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call (device time is scarce; see DEVELOPERS.md):
#
#     bash bench/gpu_session.sh [STAGE ...]      # from the repo root; default: every stage
#
# Stages, in order: env (versions), warm (NVRTC-compile every kernel in parallel), test (pytest -m gpu),
# bench (bench/gpu_kernels.py, bench/matmul_gpu.py, bench/gpu_geometry.py), auto (the CPU suite's
# checkpoint/CLI/torch tests, where backend "auto" now picks the GPU), profile (Nsight Compute on the
# GEMV and dequant kernels; not in the default list).
# Each stage has a time cap and the whole run a deadline ($BUDGET seconds, default 450), so that
# what ran comes back. Logs and reports go to $OUT (default /tmp/eqcore_gpu). Uses the machine's
# python3 and packages, eqcore from this checkout (PYTHONPATH), nothing installed.
set -u
OUT=${OUT:-/tmp/eqcore_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SINQ_AUTO_PATCH=0
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX would take 75% of the card from the test workers
export EQCORE_CACHE_DIR=${EQCORE_CACHE_DIR:-/tmp/eqcore_cache}
export PY=${PYTHON:-python3} OUT
DEADLINE=$((SECONDS + ${BUDGET:-450}))
STAGES=${*:-env warm test bench auto}
JOBS=$(( $(nproc) > 12 ? 12 : $(nproc) ))
declare -A SUMMARY

stage() {  # stage NAME CAP_SECONDS COMMAND...: run with min(cap, time to the deadline)
    local name=$1 cap=$2 left=$((DEADLINE - SECONDS)) t0=$SECONDS rc
    shift 2
    case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
    if ((left < 10)); then SUMMARY[$name]="skipped (deadline)"; echo "== $name: skipped, deadline"; return 0; fi
    echo "== $name (cap $((cap < left ? cap : left)) s)"
    timeout -k 5 $((cap < left ? cap : left)) bash -c '"$@"' _ "$@"
    rc=$?
    SUMMARY[$name]="rc $rc, $((SECONDS - t0)) s"
    echo "== $name: rc $rc in $((SECONDS - t0)) s"
}

env_info() {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
    nproc
    $PY - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for m in ("numpy", "numba", "numba_cuda", "cupy", "torch", "jax", "transformers", "safetensors", "hypothesis",
          "ml_dtypes", "cuda.bindings"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__, e)
from eqcore.backends import gpu_available, nvrtc
import cupy
print("gpu_available", gpu_available(), "nvrtc", nvrtc.version(), "arch", nvrtc.device_arch(0),
      "include", nvrtc.cuda_include_dir(), "runtime", cupy.cuda.runtime.runtimeGetVersion(),
      "driver", cupy.cuda.runtime.driverGetVersion())
EOF
}

warm() {
    $PY -c "
import time, cupy
from eqcore.backends import nvrtc
arch = nvrtc.device_arch(0)
t = time.time(); n = nvrtc.precompile(arch, jobs=$(nproc))
print(f'compiled {n} kernels for {arch} in {time.time() - t:.1f} s')
"
}

profile() {
    command -v ncu >/dev/null || { echo "no ncu"; return 3; }
    ncu --clock-control none -k "regex:gemv|dequant" -c 6 --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section LaunchStats --section Occupancy $PY - >"$OUT/ncu.txt" 2>&1 <<'EOF'
import cupy as cp, eqcore
rs = cp.random.RandomState(0)
for rows, cols in [(4096, 4096), (11008, 4096)]:
    w = (rs.standard_normal((rows, cols), dtype=cp.float32) * 0.02).astype(cp.float16)
    qt = eqcore.quantize(w, bits=4, steps=0)
    for batch in (1, 8):
        eqcore.matmul(rs.standard_normal((batch, cols), dtype=cp.float32), qt)
    eqcore.dequantize(qt)
cp.cuda.Device().synchronize()
EOF
    local rc=$?
    grep -E "gemv|dequant|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Registers Per|Achieved Occupancy" \
        "$OUT/ncu.txt" | head -80
    return $rc
}

gpu_tests() {
    $PY -m pytest -m gpu -n "$JOBS" -q -rfEs --timeout 240 --continue-on-collection-errors -p no:cacheprovider \
        tests >"$OUT/pytest_gpu.log" 2>&1
    local rc=$?
    grep -E "^(FAILED|ERROR)|passed|failed|error" "$OUT/pytest_gpu.log" | tail -40
    return $rc
}

benches() {
    $PY bench/gpu_kernels.py --out "$OUT/gpu_kernels.md" >"$OUT/bench.log" 2>&1
    local rc=$?
    $PY bench/matmul_gpu.py --out "$OUT/matmul_gpu.md" >>"$OUT/bench.log" 2>&1 || rc=$?
    $PY bench/gpu_geometry.py --out "$OUT/gpu_geometry.md" >>"$OUT/bench.log" 2>&1 || rc=$?
    tail -n 40 "$OUT/bench.log"
    return $rc
}

auto_tests() {  # CPU-suite files whose backend "auto" picks the GPU when there is one
    $PY -m pytest -n "$JOBS" -q -rfE --timeout 240 -p no:cacheprovider tests/test_checkpoint.py tests/test_cli.py \
        tests/test_torch_layer.py tests/test_interop.py tests/test_reliability.py >"$OUT/pytest_auto.log" 2>&1
    local rc=$?
    grep -E "^(FAILED|ERROR)|passed|failed|error" "$OUT/pytest_auto.log" | tail -30
    return $rc
}

export JOBS
export -f env_info warm profile gpu_tests benches auto_tests

{
stage env 30 env_info
stage warm 90 warm
stage test 150 gpu_tests
stage bench 150 benches
stage auto 90 auto_tests
stage profile 60 profile
echo "== summary"
for k in "${!SUMMARY[@]}"; do echo "$k: ${SUMMARY[$k]}"; done
} 2>&1 | tee "$OUT/session.log"
