"""Embedding one shard: read its documents, chunk, embed, publish. No Luigi here.

A document that cannot be read, decoded or chunked is recorded in the shard's
rejects file with its reason; it never fails the shard. The shard file is published
only when every document is either embedded or rejected.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from pipeline.core.chunk_columns import ChunkColumns, read_columns
from pipeline.core.corpus import duplicates_in_shard, manifest_rows
from pipeline.core.embedder import Embedder
from pipeline.errors import PipelineError
from pipeline.output.layout import OutputLayout
from pipeline.core.progress import Progress, Reporter
from pipeline.core.read_ahead import read_ahead
from pipeline.core.reader_pool import read_in_processes
from pipeline.core.shard_file import ShardWriter, shard_schema
from pipeline.core.output_identity import OutputIdentity
from pipeline.core.vector_format import VectorFormat
from pipeline import storage

log = logging.getLogger("luigi-interface")

# Documents are read and chunked in pieces of about PIECE_TOKENS tokens. When the model
# leaves the CPU free (a GPU), a background thread reads ahead (``read_ahead``) and the
# model takes all the pieces that are ready each time, up to GROUP_TOKENS, so it waits
# only for the first piece, and a second thread writes Parquet; on a CPU all of it runs
# in turn in one thread (overlapping it slowed the model there). Each group is sorted by
# length before batching: large groups carry little padding. docs/performance.md has
# the measurements behind both choices.
PIECE_TOKENS = 1 << 16
GROUP_TOKENS = 1 << 20


def shard_label(shard: int, total_shards: int) -> str:
    """How messages name a shard: its number as in its file name and task, and the count."""
    return f"shard {shard} of {total_shards}"


def worker_name() -> str:
    """Which process made a shard: with several workers on several machines, the
    shard says where it came from."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _documents_read(corpus: str, rows: list[dict[str, Any]], embedder: Embedder, readers: int) -> Iterator[ChunkColumns]:
    """The shard's documents read and chunked, in order: by ``readers`` processes, or in
    this thread one document at a time."""
    if readers:
        return read_in_processes(corpus, rows, embedder.tokenizer, embedder.chunker, readers)
    return (read_columns(corpus, [row], embedder.tokenizer, embedder.chunker) for row in rows)


def read_pieces(corpus: str, rows: list[dict[str, Any]], embedder: Embedder, rejects: list[dict[str, Any]],
                counts: Counter, readers: int = 0) -> Iterator[ChunkColumns]:
    """Read and chunk the shard's documents (in ``readers`` processes, or in this
    thread) into pieces of about PIECE_TOKENS tokens, recording rejections as they
    come (``make bench`` chunks its corpus with it too).

    Args:
        corpus: where the documents are.
        rows: the shard's manifest rows.
        embedder: whose tokenizer and chunker settings are used.
        rejects: each rejected document's record is appended here.
        counts: documents read, embedded and rejected are counted here.
        readers: reader processes; 0: read in this thread.
    """
    parts: list[ChunkColumns] = []
    tokens = 0
    for part in _documents_read(corpus, rows, embedder, readers):
        for row, rejection, broken_front_matter in part.outcomes:
            if rejection is not None:
                rejects.append({"doc_id": row["doc_id"], "path": row["path"], "reason": rejection.reason,
                                "detail": rejection.detail})
            counts["front_matter_errors"] += broken_front_matter
        parts.append(part)
        tokens += part.tokens
        if tokens >= PIECE_TOKENS:
            yield ChunkColumns.join(parts)
            parts, tokens = [], 0
    if parts:
        yield ChunkColumns.join(parts)


def _in_lists(items: Iterator[Any], take: int) -> Iterator[list[Any]]:
    """``read_ahead``'s lists, made in the caller's thread."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == take:
            yield batch
            batch = []
    if batch:
        yield batch


def _groups(pieces: Iterator[ChunkColumns], overlap: bool) -> Iterator[ChunkColumns]:
    """Pieces joined into groups: with ``overlap``, whatever a background reader has
    ready each time the model asks; without, GROUP_TOKENS' worth read in this thread."""
    take = GROUP_TOKENS // PIECE_TOKENS
    for ready in read_ahead(pieces, capacity=take, take=take) if overlap else _in_lists(pieces, take):
        yield ChunkColumns.join(ready)


def _now_done(function, *args) -> Future:
    """``ThreadPoolExecutor.submit``'s result for work done in this thread."""
    done: Future = Future()
    try:
        done.set_result(function(*args))
    except Exception as error:
        done.set_exception(error)
    return done


def _write_group(writer: ShardWriter, group: ChunkColumns, vectors, progress: Progress) -> None:
    if group.chunks.num_rows:
        writer.write(group.chunks, vectors)
    progress.advance(group.documents, embedded=0.0 if group.chunks.num_rows else group.documents)


@dataclass(frozen=True)
class ShardJob:
    """What every shard of one run shares: where its documents come from and its shards
    go, and how documents are read."""

    corpus: str
    manifest: str  # a local copy or the output's own
    output: str
    total_shards: int  # for messages: "shard 3 of 40"
    readers: int = 0  # processes that read and chunk (0: this process does)
    skip_duplicates: bool = False  # reject (reason ``duplicate``, unread) a document whose content_hash an earlier one has
    vector_format: VectorFormat = VectorFormat()  # how vectors are stored: float32 or float16, compact columns
    identity: Optional[OutputIdentity] = None  # the output's, recorded in each shard (a run's job has one)

    @classmethod
    def of_output(cls, identity: OutputIdentity, manifest: str, output: str, total_shards: int, readers: int = 0) -> "ShardJob":
        """The job of a run making the output ``identity`` says: its corpus, its vector
        format and whether it skips duplicates all come from there."""
        return cls(identity["corpus"], manifest, output, total_shards, readers=readers,
                   skip_duplicates=identity["skip_duplicates"], vector_format=identity.vector_format(), identity=identity)


def shard_settings(embedder: Embedder, vector_format: VectorFormat, identity: Optional[OutputIdentity] = None) -> dict[str, str]:
    """What a shard records about how its vectors were made and stored, and the identity
    of the output it belongs to."""
    vector_format.check(embedder.dimension)
    return {**embedder.settings(), **vector_format.settings(embedder.dimension), **(identity.footer() if identity else {})}


def run_shard(job: ShardJob, shard: int, embedder: Embedder, report: Reporter | None = None) -> dict[str, Any]:
    """Embed one shard of ``job`` and publish it with its rejects; returns the shard's
    stats. ``report(message, percent)`` hears of its progress."""
    corpus, manifest, output, skip_duplicates = job.corpus, job.manifest, job.output, job.skip_duplicates
    rows = manifest_rows(manifest, shard)
    if not rows:  # never publish an empty shard for documents this manifest copy lacks
        raise PipelineError(f"shard {shard} has no documents in {manifest}")
    if skip_duplicates:
        first_paths = duplicates_in_shard(manifest, shard)
        for row in rows:
            row["duplicate_of"] = first_paths.get(row["doc_id"])
    destination = OutputLayout.of(output).shard(shard)
    started_at, clock, padded_before = _now(), time.monotonic(), embedder.padded_tokens
    rejects: list[dict[str, Any]] = []
    counts = Counter()
    progress = Progress(len(rows), shard_label(shard, job.total_shards), report)
    schema = shard_schema(embedder.dimension, shard_settings(embedder, job.vector_format, job.identity))
    try:
        with storage.atomic_output(destination, overwrite=False) as staged:
            writer = ShardWriter(staged.path, schema)
            try:
                # Reading and writing overlap the model only when it leaves the CPU free
                # (a GPU): on a CPU they would slow its threads more than they save.
                overlap = embedder.runs_off_cpu
                with ThreadPoolExecutor(1, thread_name_prefix="parquet") as background:
                    submit = background.submit if overlap else _now_done
                    written = _now_done(lambda: None)
                    for group in _groups(read_pieces(corpus, rows, embedder, rejects, counts, job.readers), overlap):
                        vectors = None
                        if group.chunks.num_rows:
                            # Chunks, tokens and the documents' share count up batch by batch.
                            share = group.documents / group.tokens
                            vectors = embedder.embed(group.token_id_list(),
                                                     on_batch=lambda n, t: progress.advance(0, n, t, t * share))
                            counts.update(chunks=group.chunks.num_rows, tokens=group.tokens)
                        written.result()  # the group before, in order; a failed write stops the shard here
                        written = submit(_write_group, writer, group, vectors, progress)
                    written.result()
            except BaseException:
                writer.abort()
                raise
            stats = {
                "shard": shard,
                "documents": len(rows),
                "embedded_documents": len(rows) - len(rejects),
                "rejected_documents": len(rejects),
                "rejected_by_reason": dict(Counter(r["reason"] for r in rejects)),
                "front_matter_errors": counts["front_matter_errors"],
                "skip_duplicates": skip_duplicates,
                "chunks": counts["chunks"],
                "tokens": counts["tokens"],
                "started_at": started_at,
                "finished_at": _now(),
                "seconds": round(time.monotonic() - clock, 3),
                "device": embedder.device,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),  # a pod's worker per GPU
                "worker": worker_name(),
                "pod_id": os.environ.get("RUNPOD_POD_ID"),  # on Runpod: which pod, for its launcher's deadlines
                "padded_tokens": embedder.padded_tokens - padded_before,  # tokens the batches held, padding too
                **embedder.runtime(),
            }
            writer.close(stats)
            publish_rejects(output, shard, rejects)
    finally:
        progress.close()
    if not staged.published:
        log.info("shard %d already existed (another worker's, or this upload's whose answer was lost); kept it", shard)
    return stats


def publish_rejects(output: str, shard: int, rejects: list[dict[str, Any]]) -> None:
    """Rejects go out before the shard, so a published shard always has its rejects
    (``pipeline.output.compact`` writes a compacted shard's the same way)."""
    path = OutputLayout.of(output).rejects_of(shard)
    if not rejects:
        storage.delete(path)  # a rerun may have fixed what an earlier one rejected
        return
    with storage.atomic_output(path) as staged:
        staged.path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects), encoding="utf-8")
