"""Fuzzing the file format: random byte and field corruptions of valid quantized files.

Every load must either raise a clear FormatError / ValueError, or return tensors whose
quantized weights dequantize to finite values of the declared shape. Never a crash, a
hang, another exception type, or a non-finite weight.
"""
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eqcore
from eqcore import FormatError, QuantizedTensor

from helpers import weights

FUZZ = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


def _valid_file(seed: int, bits: int, group, dtype, scale_dtype="float16") -> bytes:
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(1, 9)), int(rng.integers(1, 100))
    w = weights(rows, cols, seed=seed, dtype=dtype)
    qt = eqcore.quantize(w, bits=bits, group_size=group, steps=2, backend="numpy", scale_dtype=scale_dtype)
    import tempfile, os

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.safetensors")
        eqcore.save_file({"layer.weight": qt, "layer.bias": np.ones(rows, np.float32)}, p)
        with open(p, "rb") as f:
            return f.read()


def _check_load(path):
    """The fuzz oracle: a clear refusal, or finite, well-shaped tensors."""
    try:
        tensors = eqcore.load_file(path)
    except (FormatError, ValueError):
        return "refused"
    for name, t in tensors.items():
        if isinstance(t, QuantizedTensor):
            for backend in ("numpy", "numba"):
                d = eqcore.dequantize(t, backend=backend)
                assert d.shape == t.shape
                assert np.all(np.isfinite(d.astype(np.float64))), (name, backend)
                d32 = eqcore.dequantize(t, np.float16, backend=backend)
                assert np.all(np.isfinite(d32.astype(np.float64))), (name, backend)
    return "loaded"


files = st.builds(_valid_file, st.integers(0, 2**16), st.sampled_from([2, 3, 4, 8]),
                  st.sampled_from([None, 16, 7]), st.sampled_from([np.float16, np.float32]),
                  st.sampled_from(["float16", "log8"]))


@FUZZ
@given(blob=files, edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                  min_size=1, max_size=8))
def test_random_byte_corruption(tmp_path, blob, edits):
    data = bytearray(blob)
    for where, byte in edits:
        data[int(where * len(data))] = byte
    p = tmp_path / "f.safetensors"
    p.write_bytes(bytes(data))
    _check_load(p)


def _header(blob: bytes):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _emit(header, data) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(-5, 10**6), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@FUZZ
@given(blob=files, data=st.data())
def test_random_field_corruption(tmp_path, blob, data):
    header, payload = _header(blob)
    meta = header["__metadata__"]
    qmeta = json.loads(meta["eqcore.tensor.layer.weight"])
    target = data.draw(st.sampled_from(["meta", "entry", "array", "value"]))
    if target == "meta":
        key = data.draw(st.sampled_from(sorted(qmeta) + ["bogus"]))
        qmeta[key] = data.draw(junk)
        meta["eqcore.tensor.layer.weight"] = json.dumps(qmeta)
    elif target == "entry":
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        dtypes = ["F16", "F32", "U32", "I32", "U16", "BF16", "U8"]
        header[name][field] = data.draw(st.one_of(junk, st.sampled_from(dtypes)))
    elif target == "value":  # a special value in a float array: NaN, inf, huge, negative, subnormal
        floats = (k for k in header if k.endswith((".scales", ".row_scales", ".outlier_vals"))
                  and header[k]["dtype"] in ("F16", "F32"))
        name = data.draw(st.sampled_from(sorted(floats)))
        e = header[name]
        b0, b1 = e["data_offsets"]
        dt = {"F16": np.float16, "F32": np.float32}[e["dtype"]]
        n = (b1 - b0) // np.dtype(dt).itemsize
        if n:
            arr = np.frombuffer(payload[b0:b1], dt).copy()
            with np.errstate(over="ignore"):
                arr[data.draw(st.integers(0, n - 1))] = data.draw(st.sampled_from(
                    [np.nan, np.inf, -np.inf, 3e38, 1e38, 65504.0, -1.0, 0.0, 1e-45, 1e-8]))
            payload = payload[:b0] + arr.tobytes() + payload[b1:]
    else:  # overwrite one element of one array with random bytes
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        b0, b1 = header[name]["data_offsets"]
        if b1 > b0:
            i = data.draw(st.integers(b0, b1 - 1))
            payload = payload[:i] + bytes([data.draw(st.integers(0, 255))]) + payload[i + 1:]
    p = tmp_path / "f.safetensors"
    p.write_bytes(_emit(header, payload))
    _check_load(p)


def test_the_fuzz_oracle_can_fail(tmp_path):
    """A non-finite dequantized value trips the oracle (so the fuzz tests can fail)."""
    blob = _valid_file(1, 4, None, np.float32)
    p = tmp_path / "f.safetensors"
    p.write_bytes(blob)
    assert _check_load(p) == "loaded"
    with pytest.raises(AssertionError):
        real = eqcore.dequantize
        try:
            eqcore.dequantize = lambda t, *a, **k: np.full(t.shape, np.inf, np.float32)
            _check_load(p)
        finally:
            eqcore.dequantize = real


CRASH = r"""
import sys, eqcore
for path in sys.argv[1:]:
    print(path, flush=True)  # the last path printed is the one a crash happened in
    try:
        t = eqcore.load_file(path)
        for v in t.values():
            if isinstance(v, eqcore.QuantizedTensor):
                eqcore.dequantize(v, backend="numba")
    except (eqcore.FormatError, ValueError):
        pass
print("done", flush=True)
"""


def test_no_corruption_crashes_the_process(tmp_path):
    """Process-level check (a segfault would not show as an exception): 40 corruptions of the CSR,
    read one after another in one child process."""
    blob = _valid_file(7, 4, 16, np.float16)
    header, payload = _header(blob)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(40):
        name = str(rng.choice(["layer.weight.outlier_rowptr", "layer.weight.outlier_cols"]))
        b0, b1 = header[name]["data_offsets"]
        if b1 == b0:
            continue
        j = int(rng.integers(b0, b1))
        bad = payload[:j] + bytes([int(rng.integers(0, 256))]) + payload[j + 1:]
        p = tmp_path / f"c{i}.safetensors"
        p.write_bytes(_emit(header, bad))
        paths.append(p)
    # one process for all of them (40 imports of eqcore took 76-120 s): a crash in any ends it early
    names = [str(p) for p in paths]
    r = subprocess.run([sys.executable, "-c", CRASH, *names], capture_output=True, text=True, timeout=300)
    seen = r.stdout.splitlines()
    assert r.returncode == 0 and seen == [*names, "done"], (seen[-2:], r.returncode, r.stderr[-1000:])
