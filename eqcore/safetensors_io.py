"""Streaming safetensors: lazy (memory-mapped) reads and atomic, bounded-memory writes.

The format is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
and the raw little-endian tensor bytes. The ``safetensors`` package needs every tensor
in memory to write a file and has no bfloat16 for NumPy; this module streams tensors
one at a time and reads bfloat16 through ml_dtypes. Files stay byte-compatible.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import tempfile

import numpy as np

from .dtypes import bfloat16
from .tensor import FormatError

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": bfloat16,
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsReader:
    """Lazy reader: ``with SafetensorsReader(path) as f: w = f.get("name")``.

    Arrays returned by :meth:`get` are read-only views of the memory-mapped file;
    only the pages a caller touches are read.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")
        try:
            self._parse()
        except Exception:
            self._file.close()
            raise

    def _fail(self, msg):
        raise FormatError(f"{self.path}: {msg}")

    def _parse(self):
        size = os.fstat(self._file.fileno()).st_size
        raw = self._file.read(8)
        if len(raw) < 8:
            self._fail("not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, MAX_HEADER):
            self._fail(f"header length {n} exceeds the file ({size} bytes); truncated or not safetensors")
        try:
            header = json.loads(self._file.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._fail(f"header is not valid JSON ({e})")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            self._fail("__metadata__ must map strings to strings")
        self.metadata = meta
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries = {}
        spans = []
        for name, e in header.items():
            if not isinstance(e, dict) or e.get("dtype") not in DTYPES:
                self._fail(f"tensor {name!r}: unknown or missing dtype {e.get('dtype') if isinstance(e, dict) else e!r}")
            shape, offs = e.get("shape"), e.get("data_offsets")
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                self._fail(f"tensor {name!r}: bad shape {shape!r}")
            if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                    and 0 <= offs[0] <= offs[1] <= data_len):
                self._fail(f"tensor {name!r}: data_offsets {offs!r} outside the {data_len}-byte data section")
            dt = DTYPES[e["dtype"]]
            if offs[1] - offs[0] != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
                self._fail(f"tensor {name!r}: {offs[1] - offs[0]} bytes do not hold {e['dtype']} {shape}")
            self._entries[name] = (dt, tuple(shape), offs[0])
            spans.append(tuple(offs))
        spans.sort()
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            self._fail("tensors overlap in the data section")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def keys(self):
        return list(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def info(self, name) -> tuple[np.dtype, tuple]:
        """(dtype, shape) of a tensor without reading it."""
        dt, shape, _ = self._entry(name)
        return dt, shape

    def _entry(self, name):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def get(self, name) -> np.ndarray:
        dt, shape, off = self._entry(name)
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.zeros(shape, dtype=dt)
        return np.frombuffer(self._map, dtype=dt, count=count, offset=self._data_start + off).reshape(shape)

    def close(self):
        # views handed out keep the mapping alive; closing the file object is enough
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsWriter:
    """Atomic streaming writer: tensors go to a temporary data file as they are added;
    :meth:`close` writes header + data to a temporary file beside ``path`` and renames
    it into place. On error nothing is left behind and ``path`` is untouched."""

    def __init__(self, path, metadata: dict | None = None):
        self.path = os.fspath(path)
        self.metadata = dict(metadata or {})
        self._header = {}
        self._offset = 0
        folder = os.path.dirname(os.path.abspath(self.path))
        self._data = tempfile.NamedTemporaryFile(dir=folder, prefix=".eqcore-data-", delete=False)

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self._header or name == "__metadata__":
            raise ValueError(f"duplicate or reserved tensor name {name!r}")
        a = np.asarray(array)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt not in CODES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
        a = np.ascontiguousarray(a, dtype=dt)
        self._data.write(a.reshape(-1).view(np.uint8).data if a.size else b"")
        self._header[name] = {"dtype": CODES[dt], "shape": list(a.shape),
                              "data_offsets": [self._offset, self._offset + a.nbytes]}
        self._offset += a.nbytes

    def sizes(self) -> dict[str, int]:
        """Bytes of each tensor added so far, by name."""
        return {k: e["data_offsets"][1] - e["data_offsets"][0] for k, e in self._header.items()}

    def close(self) -> None:
        header = dict(self._header)
        if self.metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in self.metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".eqcore-out-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(struct.pack("<Q", len(blob)))
                out.write(blob)
                self._data.flush()
                self._data.seek(0)
                shutil.copyfileobj(self._data, out, 1 << 22)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        finally:
            self._discard_data()

    def abort(self) -> None:
        self._discard_data()

    def _discard_data(self):
        self._data.close()
        if os.path.exists(self._data.name):
            os.unlink(self._data.name)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()
