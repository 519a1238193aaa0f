"""The eqcore file format: quantized tensors inside an ordinary safetensors file.

A quantized weight ``name`` is stored as the tensors ``name.qweight`` (uint32),
``name.scales`` (float32; float16 / bfloat16 from version 2), ``name.outlier_rowptr`` (int32;
uint16 from version 3, when the tensor has at most 65535 outliers),
``name.outlier_cols`` (uint16/int32), ``name.outlier_vals`` (weight dtype), from version 2 also
``name.zeros``, ``name.codebook`` and ``name.col_scales`` where its grid uses them, from version 4
uint8 "log8" scales with ``name.row_scales`` (float16), and the
metadata entry ``eqcore.tensor.<name>``: a JSON string with shape, dtype, bits, group_size,
sigma, grid (version 2, when not symmetric) and rel_error when known. ``name`` itself is stored
as an empty uint8 tensor, a guard: a loader that does not know eqcore finds the weight's name
with the wrong shape and refuses it (transformers raises a size mismatch) instead of leaving the
weight uninitialised. Readers skip it; files without it (written before it) read the same.
``eqcore.format_version`` is the oldest version that holds every tensor of the file, so files
without the new features still read as version 1. Every other tensor is an ordinary one,
passed through unchanged.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from ..interop import to_host
from .safetensors import SafetensorsReader, SafetensorsWriter, entry_size
from ..errors import FormatError
from ..tensor import FIELDS, OPTIONAL, QuantizedTensor

PARTS = FIELDS + OPTIONAL  # every array a quantized tensor may store

FORMAT_VERSION = "4"  # written only by files that need it: v1 readers keep reading v1-only files
READABLE = ("1", "2", "3", "4")
VERSION_KEY = "eqcore.format_version"
TENSOR_KEY = "eqcore.tensor."
OUTPUT_KEY = "eqcore.output"  # marks a file eqcore wrote (so --force may replace it)
GUARD = np.zeros(0, np.uint8)  # stored under a quantized tensor's own name (see above)
# array suffixes that only eqcore uses; a tensor with one of them and no metadata is an orphan
_OWN_SUFFIXES = tuple(f".{f}" for f in FIELDS if f.startswith("outlier_"))


def write_entry(writer: SafetensorsWriter, name: str, value, **extra) -> None:
    """Add one plain array or QuantizedTensor (with optional extra metadata) to ``writer``."""
    if isinstance(value, QuantizedTensor):
        writer.metadata[VERSION_KEY] = max(writer.metadata.get(VERSION_KEY, "1"), format_version(value))
        writer.metadata[TENSOR_KEY + name] = json.dumps({**value.metadata(), **extra}, sort_keys=True)
        writer.add(name, GUARD)
        for field, arr in value.arrays().items():
            writer.add(f"{name}.{field}", to_host(arr))
    else:
        writer.add(name, to_host(value))


def format_version(qt: QuantizedTensor) -> str:
    """The oldest format that holds ``qt``: "1" (float32 scales, symmetric grid, no column scales),
    "2" (narrower scales, the asymmetric and codebook grids, column scales), "3" (uint16 outlier
    row pointers) or "4" ("log8" scales)."""
    if qt.row_scales is not None:
        return "4"
    if qt.outlier_rowptr.dtype != np.int32:
        return "3"
    v1 = qt.scales.dtype == np.float32 and qt.grid == "symmetric" and qt.col_scales is None
    return "1" if v1 else "2"


def quantized_names(reader: SafetensorsReader) -> dict[str, dict]:
    """Metadata of the quantized tensors declared in a file; FormatError if malformed."""
    meta = reader.metadata
    declared = {k[len(TENSOR_KEY):]: v for k, v in meta.items() if k.startswith(TENSOR_KEY)}
    if declared and meta.get(VERSION_KEY) is None:
        raise FormatError(f"{reader.path}: quantized tensors present but no {VERSION_KEY}")
    version = meta.get(VERSION_KEY)
    if version is not None and version not in READABLE:
        raise FormatError(f"{reader.path}: eqcore format version {version!r} is not supported "
                          f"(this eqcore reads versions {', '.join(READABLE)}); upgrade eqcore")
    out = {}
    for name, text in declared.items():
        try:
            m = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{reader.path}: metadata of {name!r} is not JSON ({e})") from None
        if not isinstance(m, dict):
            raise FormatError(f"{reader.path}: metadata of {name!r} is not a JSON object")
        rel = m.get("rel_error")
        if rel is not None and not (isinstance(rel, (int, float)) and not isinstance(rel, bool)
                                    and math.isfinite(rel) and rel >= 0):
            raise FormatError(f"{reader.path}: quantized tensor {name!r}: rel_error must be a non-negative "
                              f"number, got {rel!r}")
        missing = [f"{name}.{f}" for f in FIELDS if f"{name}.{f}" not in reader]
        if missing:
            raise FormatError(f"{reader.path}: quantized tensor {name!r} lacks {missing}")
        if name in reader and reader.info(name) != (GUARD.dtype, GUARD.shape):
            raise FormatError(f"{reader.path}: {name!r} is both a plain tensor and a quantized one")
        out[name] = m
    owned = {f"{n}.{f}" for n in out for f in PARTS}
    suffixes = tuple(f".{f}" for f in PARTS) if version is not None else _OWN_SUFFIXES
    orphans = [k for k in reader.keys() if k not in owned and k.endswith(suffixes)]
    if orphans:
        raise FormatError(f"{reader.path}: orphan quantized parts {orphans[:5]} without their "
                          f"{TENSOR_KEY}<name> metadata; refusing to treat them as weights")
    return out


def entry_names(reader: SafetensorsReader) -> list[str]:
    """Logical tensor names in file order: quantized names once, plain tensors as they are."""
    q = quantized_names(reader)
    owned = {f"{n}.{f}": n for n in q for f in PARTS}
    names, seen = [], set()
    for key in reader.keys():
        name = owned.get(key, key)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def read_entry(reader: SafetensorsReader, name: str, qmeta: dict | None = None):
    """One logical tensor: a QuantizedTensor (validated) or a plain (memory-mapped) array."""
    qmeta = quantized_names(reader) if qmeta is None else qmeta
    if name not in qmeta:
        return reader.get(name)
    arrays = {f: reader.get(f"{name}.{f}") for f in PARTS if f"{name}.{f}" in reader}
    try:
        return QuantizedTensor.from_arrays(arrays, qmeta[name])
    except (FormatError, TypeError, ValueError) as e:
        raise FormatError(f"{reader.path}: quantized tensor {name!r} is malformed: {e}") from None


def header_bound(names, metadata: dict | None = None) -> int:
    """Header bytes that suffice for a file holding ``names`` (each plain or quantized, 2-D),
    with ``metadata``: what :class:`SafetensorsWriter` reserves so it can stream in one pass."""
    total = len(json.dumps(metadata or {})) + 256
    for name in names:
        total += sum(entry_size(f"{name}.{f}", 2) for f in PARTS) + entry_size(name, 8)
        total += len(json.dumps(TENSOR_KEY + name)) + 512  # its eqcore.tensor.* entry
    return total


def save_file(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write plain arrays and QuantizedTensors to one safetensors file, atomically."""
    with SafetensorsWriter(path, metadata, header_reserve=header_bound(tensors, metadata)) as w:
        for name, value in tensors.items():
            write_entry(w, name, value)


def load_file(path, *, mmap: bool = False) -> dict:
    """Read every tensor of a file: QuantizedTensor for quantized weights, arrays otherwise.

    Arrays are private copies by default. ``mmap=True`` returns read-only views of the
    memory-mapped file instead (no copy, pages read on first touch); then the file must not
    be truncated or rewritten while they are alive, or touching them kills the process with
    SIGBUS.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    with SafetensorsReader(path, mmap=mmap) as r:
        q = quantized_names(r)
        return {name: read_entry(r, name, q) for name in entry_names(r)}
