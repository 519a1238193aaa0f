"""Whole checkpoints: quantize / dequantize a .safetensors file or a sharded folder,
tensor by tensor (memory-mapped reads, streamed atomic writes)."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .backend import preferred
from .config import QuantConfig
from .dtypes import WEIGHT_DTYPES, weight_dtype
from .interop import to_backend, to_host
from .outliers import row_chunks
from .fileformat import VERSION_KEY, entry_names, quantized_names, read_entry, write_entry
from .quantize import quantize
from .safetensors_io import SafetensorsReader, SafetensorsWriter
from .tensor import QuantizedTensor

INDEX = "model.safetensors.index.json"
DEFAULT_SKIP = r"embed|wte|wpe|lm_head"


def relative_error(w_hat: np.ndarray, w: np.ndarray) -> float:
    """||w_hat - w||_F / ||w||_F in float64 (0 for an all-zero w reproduced exactly)."""
    err = ref = 0.0
    for rows in row_chunks(w.shape):
        w64 = w[rows].astype(np.float64)
        err += float(np.sum((w_hat[rows].astype(np.float64) - w64) ** 2))
        ref += float(np.sum(w64 ** 2))
    return float(np.sqrt(err / ref)) if ref > 0 else float(np.sqrt(err))


def should_quantize(name: str, dtype, shape, skip: str | None = DEFAULT_SKIP, min_features: int = 16) -> bool:
    """2-D float weights with both sides >= ``min_features`` whose name does not match ``skip``."""
    return (len(shape) == 2 and min(shape) >= min_features and np.dtype(dtype) in WEIGHT_DTYPES.values()
            and not (skip and re.search(skip, name)))


def shard_files(src) -> tuple[list[Path], dict | None]:
    """The .safetensors files of a checkpoint (a file, or a folder with or without an index)."""
    src = Path(src)
    if src.is_file():
        return [src], None
    if not src.is_dir():
        raise FileNotFoundError(f"no such file or folder: {src}")
    index_path = src / INDEX
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{index_path}: not a valid safetensors index ({e!r})") from None
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path} names shards that do not exist: {missing}")
        return [src / s for s in shards], index
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{src} holds no .safetensors files")
    return shards, None


class _Output:
    """Where results go: a file, or a folder built beside the destination and renamed into place."""

    def __init__(self, src: Path, dst: Path, overwrite: bool):
        if dst.resolve() == src.resolve():
            raise ValueError("output must differ from input (the input is never overwritten)")
        if dst.exists() and not overwrite:
            raise FileExistsError(f"{dst} exists; pass overwrite=True (--force) to replace it")
        self.src, self.dst, self.folder = src, dst, src.is_dir()
        if self.folder:
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.eqcore-"))

    def path_for(self, shard: Path) -> Path:
        return self.tmp / shard.name if self.folder else self.dst

    def commit(self, weight_map: dict, total_size: int) -> None:
        if not self.folder:
            return
        for extra in self.src.iterdir():  # config, tokenizer, ...: a usable model folder
            if extra.is_file() and extra.suffix != ".safetensors" and extra.name != INDEX:
                shutil.copy2(extra, self.tmp / extra.name)
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (self.tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        if self.dst.exists():
            old = self.dst.with_name(f".{self.dst.name}.eqcore-old")
            os.replace(self.dst, old)
            os.replace(self.tmp, self.dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(self.tmp, self.dst)

    def abort(self) -> None:
        if self.folder:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _convert(src, dst, convert_one, *, overwrite: bool, progress: bool, desc: str, meta=None):
    """Shared driver: for each shard, stream every tensor through ``convert_one``."""
    src, dst = Path(src), Path(dst)
    shards, _ = shard_files(src)
    out = _Output(src, dst, overwrite)
    weight_map, total_size = {}, 0
    try:
        with ExitStack() as stack:
            readers = [stack.enter_context(SafetensorsReader(s)) for s in shards]
            total = sum(int(np.prod(r.info(k)[1], dtype=np.int64)) for r in readers for k in r.keys())
            bar = stack.enter_context(tqdm(total=total, unit="w", unit_scale=True, desc=desc, disable=not progress))
            for shard, reader in zip(shards, readers):
                qmeta = quantized_names(reader)
                with SafetensorsWriter(out.path_for(shard), meta) as writer:
                    for name in entry_names(reader):
                        bar.set_postfix_str(name[-40:], refresh=False)
                        try:
                            value, extra = convert_one(name, read_entry(reader, name, qmeta))
                        except (ValueError, TypeError) as e:
                            raise type(e)(f"{shard.name}: tensor {name!r}: {e}") from e
                        write_entry(writer, name, value, **extra)
                        n = int(np.prod(value.shape, dtype=np.int64))
                        bar.update(n)
                    for key, nbytes in writer.sizes().items():
                        weight_map[key] = shard.name
                        total_size += nbytes
        out.commit(weight_map, total_size)
    except BaseException:
        out.abort()
        raise


def quantize_checkpoint(src, dst, config: QuantConfig | None = None, *, skip: str | None = DEFAULT_SKIP,
                        min_features: int = 16, backend: str = "auto", overwrite: bool = False,
                        progress: bool = True) -> None:
    """Quantize every eligible 2-D weight of a checkpoint (see :func:`should_quantize`);
    copy the rest unchanged. Peak memory is a few times the largest tensor."""
    config = config or QuantConfig()
    backend = preferred(backend)

    def one(name, value):
        if isinstance(value, QuantizedTensor):
            raise ValueError("is already quantized; quantize the original checkpoint")
        if not should_quantize(name, value.dtype, value.shape, skip, min_features):
            return value, {}
        qt = quantize(to_backend(value, backend), config, backend=backend)
        rel = relative_error(to_host(qt.dequantize(np.float32, backend=backend)), value)
        return qt, {"rel_error": rel}

    _convert(src, dst, one, overwrite=overwrite, progress=progress, desc="quantize")


def dequantize_checkpoint(src, dst, dtype=None, *, backend: str = "auto", overwrite: bool = False,
                          progress: bool = True) -> None:
    """Write a plain safetensors checkpoint any runtime can load: every quantized weight
    dense in ``dtype`` (default: its original dtype), other tensors unchanged."""
    dtype = None if dtype is None else weight_dtype(dtype)
    backend = preferred(backend)

    def one(name, value):
        if isinstance(value, QuantizedTensor):
            return value.map_arrays(lambda a: to_backend(a, backend)).dequantize(dtype, backend=backend), {}
        return value, {}

    _convert(src, dst, one, overwrite=overwrite, progress=progress, desc="dequantize")


def inspect_checkpoint(path, against=None) -> list[dict]:
    """One row per tensor: name, shape, dtype, bits, bits/weight, outlier fraction, rel_error.

    rel_error comes from the file's metadata, or is recomputed against the original
    checkpoint ``against`` when given.
    """
    rows = []
    originals = {}
    with ExitStack() as stack:
        if against is not None:
            for shard in shard_files(against)[0]:
                r = stack.enter_context(SafetensorsReader(shard))
                originals.update({k: r for k in r.keys()})
        for shard in shard_files(path)[0]:
            reader = stack.enter_context(SafetensorsReader(shard))
            qmeta = quantized_names(reader)
            if not qmeta and VERSION_KEY not in reader.metadata:
                raise ValueError(f"{shard} is not an eqcore-quantized file")
            for name in entry_names(reader):
                v = read_entry(reader, name, qmeta)
                row = {"name": name, "shape": tuple(v.shape), "dtype": str(v.dtype)}
                if isinstance(v, QuantizedTensor):
                    rel = qmeta[name].get("rel_error")
                    if name in originals:
                        rel = relative_error(v.dequantize(np.float32), originals[name].get(name))
                    row.update(bits=v.bits, group_size=v.group_size, bits_per_weight=v.bits_per_weight,
                               outlier_fraction=v.outlier_fraction, rel_error=rel)
                else:
                    row.update(bits=None, bits_per_weight=8.0 * v.dtype.itemsize, outlier_fraction=None, rel_error=None)
                rows.append(row)
    return rows
