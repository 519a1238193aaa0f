"""Dask driver for :func:`eqcore.io.checkpoint.quantize_checkpoint`: workers compute, this process writes.

Only *who computes* changes. Each eligible tensor (or, when its settings make rows independent,
each block of rows of a large one) is one task: the worker opens the shard by memory map (the
workers must see the checkpoint at the same path, e.g. on a shared filesystem; nothing goes
through the scheduler), quantizes it with :func:`~eqcore.io.checkpoint.quantize_rows` and sends
back only the packed result and its error sums. The client takes the results in file order and
feeds them to the same single-pass atomic writer as a local run, so the output is bit-identical
to it. At most :data:`IN_FLIGHT_PER_THREAD` tasks per worker thread are submitted and not yet
written (their results wait on the workers, not here); a worker that dies has its tasks rerun
elsewhere by Dask; a task that raises fails the conversion, naming the tensor, and the partial
output is removed.

Dask is optional: ``pip install eqcore[dask]`` (and ``dask-cuda`` for one worker per GPU).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import deque

from .. import backends
from ..errors import ClusterError
from ..interop import to_host
from ..outliers import row_chunks
from ..tensor import QuantizedTensor
from .compute import quantize_rows
from .fileformat import entry_names, quantized_names
from .safetensors import SafetensorsReader

SPLIT_ELEMENTS = 1 << 26  # tensors larger than this go out in row blocks of at most this (if rows are independent)
IN_FLIGHT_PER_THREAD = 4  # tasks submitted and not yet written, per worker thread
WAIT_FOR_WORKERS_S = 60
NUMBA_THREADS_VAR = "EQCORE_NUMBA_THREADS"  # a worker's Numba threads (set on `dask worker` processes too)
# Dask's nannies set MALLOC_TRIM_THRESHOLD_, which stops glibc from keeping freed megabyte-sized blocks:
# every row-chunk temporary is then mapped afresh and a tensor quantizes 1.7x slower (4096 x 4096: 1.29 s
# against 0.78 s). Local clusters leave it unset; see the README for `dask worker`.
FAST_MALLOC = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


def require_dask():
    """The ``distributed`` module, or ImportError saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise ImportError("running on a Dask cluster needs dask.distributed: pip install eqcore[dask]") from None
    return distributed


def row_blocks(shape, config, split_elements: int) -> list:
    """(start, stop) row ranges for the tasks of one tensor, made of whole :func:`row_chunks` (so
    error sums add up in the same order), or ``[None]``: the tensor as one task."""
    if not config.rows_independent or shape[0] * shape[1] <= split_elements:
        return [None]
    blocks, begin = [], 0
    for rows in row_chunks(shape):
        stop = min(rows.stop, shape[0])
        if stop > begin and (stop - begin) * shape[1] > split_elements and rows.start > begin:
            blocks.append((begin, rows.start))
            begin = rows.start
    blocks.append((begin, shape[0]))
    return blocks if len(blocks) > 1 else [None]


def quantize_part(path: str, name: str, rows, config, backend: str):
    """Run on a worker: tensor ``name`` of the shard at ``path`` (rows ``start:stop``, or all), read
    by memory map and quantized on ``backend`` resolved here. Returns (QuantizedTensor on the
    host, error sums, worker address, seconds)."""
    from distributed import get_worker

    t0 = time.perf_counter()
    where = get_worker().address
    try:
        reader = SafetensorsReader(path, mmap=True)
    except OSError as e:
        raise OSError(e.errno, f"worker {where} cannot read the input ({e.strerror}); workers read the checkpoint "
                               "at the client's path, so it must be on a filesystem they share", path) from None
    with reader:
        w = reader.get(name)
        if rows is not None:
            w = w[rows[0]:rows[1]]
        backend = backends.for_files(backend)
        if backend == "numba" and os.environ.get(NUMBA_THREADS_VAR):
            _numba_threads(int(os.environ[NUMBA_THREADS_VAR]))
        qt, sums = quantize_rows(w, config, backend)
    return qt.map_arrays(to_host), sums, where, time.perf_counter() - t0


class RemoteQuantizer:
    """The compute side of a distributed ``quantize_checkpoint``: :meth:`start` (the
    ``on_start`` hook of the writer) lists the tensors and submits the first tasks;
    :meth:`take` returns the next tensor's (QuantizedTensor, error sums) in writing order."""

    def __init__(self, client, backend: str, config_for, wanted, *, split_elements: int | None = None,
                 window: int | None = None):
        require_dask()
        self.client, self.backend, self.config_for, self.wanted = client, backend, config_for, wanted
        self.split_elements, self.window = split_elements or SPLIT_ELEMENTS, window
        self._todo, self._sent = deque(), deque()  # (name, path, shape, config) / (name, [futures])
        self._in_flight = self._seq = self.done = self.total = 0
        self._token = secrets.token_hex(4)
        self._workers = {}
        self.bar = None

    def start(self, readers: dict, bar=None) -> None:
        for reader in readers.values():
            qmeta = quantized_names(reader)
            for name in entry_names(reader):
                if name not in qmeta and self.wanted(name, *reader.info(name)):
                    self._todo.append((name, reader.path, reader.info(name)[1], self.config_for(name)))
        self.total, self.bar = len(self._todo), bar
        if self.window is None:
            self.window = IN_FLIGHT_PER_THREAD * max(1, sum(self._threads().values()))
        self._describe()
        self._fill()

    def _threads(self) -> dict:
        threads = self.client.nthreads()
        if not threads and self._todo:
            try:
                self.client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
            except (TimeoutError, asyncio.TimeoutError):
                raise ClusterError(f"no Dask worker joined the scheduler {self.client.scheduler.address} "
                                   f"within {WAIT_FOR_WORKERS_S} s") from None
            threads = self.client.nthreads()
        return threads

    def _fill(self) -> None:
        while self._todo and (self._in_flight < self.window or not self._sent):
            name, path, shape, config = self._todo.popleft()
            futures = []
            for rows in row_blocks(shape, config, self.split_elements):
                self._seq += 1
                futures.append(self.client.submit(quantize_part, path, name, rows, config, self.backend,
                                                  key=f"eqcore-quantize-{self._token}-{self._seq}",
                                                  priority=-self._seq, retries=0))
            self._sent.append((name, futures))
            self._in_flight += len(futures)

    def take(self, name: str):
        expected, futures = self._sent.popleft()
        if expected != name:  # the writer and the task list walk the same files in the same order
            raise RuntimeError(f"internal error: the writer wants {name!r}, the next task is {expected!r}")
        try:
            results = [f.result() for f in futures]
        except (ValueError, TypeError, OSError, MemoryError):
            raise  # the task's own error; the writer names the tensor
        except (Exception, asyncio.CancelledError) as e:  # a worker died too often, the scheduler went away
            raise ClusterError(f"tensor {name!r}: the Dask cluster failed: {type(e).__name__}: {e}") from e
        finally:
            for f in futures:
                f.release()
            self._in_flight -= len(futures)
        self._fill()
        for _, _, where, seconds in results:
            w = self._workers.setdefault(where, {"tasks": 0, "seconds": 0.0})
            w["tasks"] += 1
            w["seconds"] += seconds
        self.done += 1
        self._describe()
        return QuantizedTensor.stack_rows(r[0] for r in results), [s for r in results for s in r[1]]

    def _describe(self) -> None:
        if self.bar is not None:
            self.bar.set_description(f"quantize {self.done}/{self.total} tensors", refresh=False)

    def close(self) -> None:
        """Cancel every task not taken (after an error, or Ctrl-C)."""
        pending = [f for _, futures in self._sent for f in futures]
        self._sent.clear()
        self._todo.clear()
        if pending:
            with contextlib.suppress(Exception):
                self.client.cancel(pending)

    def summary(self) -> dict:
        """{worker address: {"tasks": n, "seconds": s}} of the results written."""
        return dict(sorted(self._workers.items()))


@contextlib.contextmanager
def cluster_client(scheduler: str | None = None, workers: int | None = None):
    """A ``distributed.Client``: of the running cluster at ``scheduler`` (e.g. tcp://host:8786), or
    of a new one on this machine with ``workers`` workers (see :func:`local_cluster`); None if
    neither is given."""
    if scheduler is not None and workers is not None:
        raise ValueError("give a scheduler address or a number of workers, not both")
    if scheduler is None and workers is None:
        yield None
        return
    distributed = require_dask()
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout=30)
        except OSError as e:  # refused, timed out, bad address
            raise OSError(f"cannot reach the Dask scheduler at {scheduler} ({e})") from None
        with client:
            yield client
    else:
        with local_cluster(workers) as cluster, distributed.Client(cluster) as client:
            yield client


@contextlib.contextmanager
def local_cluster(workers: int, numba_threads: int | None = None):
    """A cluster on this machine: with GPUs and ``dask-cuda``, a LocalCUDACluster of ``workers``
    workers, one per GPU; else ``workers`` processes of one task thread each, whose Numba threads
    (``numba_threads``, default: the cores shared out) together use every core."""
    distributed = require_dask()
    import dask

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"the number of workers must be a positive integer, got {workers!r}")
    gpus = _gpu_count()
    if gpus:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            LocalCUDACluster = None
        if LocalCUDACluster is not None:
            if workers > gpus:
                raise ValueError(f"{workers} workers asked for but only {gpus} GPUs found (one worker per GPU)")
            with LocalCUDACluster(CUDA_VISIBLE_DEVICES=list(range(workers)), dashboard_address=None,
                                  silence_logs=logging.ERROR) as cluster:
                yield cluster
            return
    threads = numba_threads or max(1, (os.cpu_count() or 1) // workers)
    try:
        with dask.config.set({FAST_MALLOC: None}):  # read when each nanny is made, restarts included
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=None, silence_logs=logging.ERROR,
                                               env={NUMBA_THREADS_VAR: str(threads)})
    except RuntimeError as e:  # "Nanny failed to start": the cause is in the log above
        raise ClusterError(f"could not start a local Dask cluster of {workers} workers ({e})") from e
    with cluster:
        yield cluster


def _numba_threads(n: int) -> None:
    """Numba threads of the calling thread (a worker's task thread), within what Numba launched.
    (NUMBA_NUM_THREADS itself cannot be given to spawned workers: they may import Numba before
    the nanny sets their environment, and Numba refuses a changed value after that.)"""
    import numba

    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def _gpu_count() -> int:
    if not backends.gpu_available():
        return 0
    import cupy

    return cupy.cuda.runtime.getDeviceCount()
