"""Reading and chunking a shard's documents in several processes.

On a GPU one CPU core reading, decoding, parsing and chunking cannot keep the model
busy (``make bench``'s stand-in GPU rows), and threads share one interpreter lock. A
pool of reader processes, started once per worker and kept for every shard it runs,
reads batches of documents; results come back in manifest order, a bounded number of
batches ahead, so memory holds a few batches rather than a shard.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Iterator

from tokenizers import Tokenizer

from pipeline.core.chunk_columns import ChunkColumns, read_columns
from pipeline.core.chunking import ChunkerSettings

BATCH_DOCUMENTS = 8
_pools: dict[tuple, ProcessPoolExecutor] = {}
_reader: dict[str, Any] = {}  # in a reader process: its tokenizer and chunker settings


def reader_processes(setting: int, runs_off_cpu: bool) -> int:
    """``--readers``: that many processes; -1 (auto): on a GPU every core but the one
    the model's thread and the Parquet writer use (up to 8), on a CPU none (they would
    take the model's cores)."""
    if setting >= 0:
        return setting
    return min(max((os.cpu_count() or 1) - 1, 1), 8) if runs_off_cpu else 0


def _start_reader(tokenizer_json: str, settings: ChunkerSettings) -> None:
    _reader.update(tokenizer=Tokenizer.from_str(tokenizer_json), settings=settings)


def _read_batch(corpus: str, rows: list[dict[str, Any]]) -> ChunkColumns:
    return read_columns(corpus, rows, _reader["tokenizer"], _reader["settings"])


def _pool(tokenizer: Tokenizer, settings: ChunkerSettings, processes: int) -> ProcessPoolExecutor:
    """One pool per tokenizer, settings and size, for the life of this worker process.
    Spawned, not forked: the worker has threads (luigi's keep-alive, CUDA's) a fork
    would copy mid-lock."""
    tokenizer_json = tokenizer.to_str()
    key = (hash(tokenizer_json), settings, processes)
    if key not in _pools:
        _pools[key] = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_start_reader, initargs=(tokenizer_json, settings))
    return _pools[key]


def read_in_processes(corpus: str, rows: list[dict[str, Any]], tokenizer: Tokenizer, settings: ChunkerSettings,
                      processes: int) -> Iterator[ChunkColumns]:
    """``rows``' documents read and chunked by ``processes`` reader processes, in order,
    BATCH_DOCUMENTS at a time, with up to two batches each in hand."""
    pool = _pool(tokenizer, settings, processes)
    pending: deque = deque()
    try:
        for start in range(0, len(rows), BATCH_DOCUMENTS):
            pending.append(pool.submit(_read_batch, corpus, rows[start : start + BATCH_DOCUMENTS]))
            if len(pending) >= 2 * processes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:  # a reader died (killed, out of memory): this shard fails, the next gets a new pool
        for key in [key for key, known in _pools.items() if known is pool]:
            del _pools[key]
        raise
    finally:
        for future in pending:
            future.cancel()


def close_readers() -> None:
    """End every reader process (tests; a worker's exit ends them too)."""
    while _pools:
        _pools.popitem()[1].shutdown(wait=True, cancel_futures=True)
