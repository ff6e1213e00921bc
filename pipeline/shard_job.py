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
from dataclasses import dataclass, field
from typing import Any, Iterator

from .chunking import Chunk, chunk_document
from .corpus import Document, Rejected, duplicates_in_shard, front_matter_json, iter_documents, manifest_rows
from .embedder import Embedder
from .errors import PipelineError
from .progress import Progress, Reporter
from .read_ahead import read_ahead
from .readers import read_in_processes
from .shards import PROMOTED_FIELDS, ShardWriter, shard_schema
from . import storage

log = logging.getLogger("luigi-interface")

# Documents are read and chunked in pieces of about PIECE_TOKENS tokens. When the model
# leaves the CPU free (a GPU), a background thread reads ahead (``read_ahead``) and the
# model takes all the pieces that are ready each time, up to GROUP_TOKENS, so it waits
# only for the first piece, and a second thread writes Parquet; on a CPU all of it runs
# in turn in one thread (overlapping it slowed the model: `make bench`, 0.86 against
# 0.96 x the embedder alone on 2 cores). Each group is sorted by length before batching:
# large groups carry little padding (../shared/corpus at 16,384-token batches: 94.7 % of
# padded tokens are real in 1M-token groups, 91.6 % at 256k, 82.3 % at 64k).
PIECE_TOKENS = 1 << 16
GROUP_TOKENS = 1 << 20


def shard_path(output: str, shard: int) -> str:
    return f"{output}/shards/shard-{shard:06d}.parquet"


def rejects_path(output: str, shard: int) -> str:
    return f"{output}/rejects/shard-{shard:06d}.jsonl"


def shard_label(shard: int, total_shards: int) -> str:
    """How messages name a shard: its number as in its file name and task, and the count."""
    return f"shard {shard} of {total_shards}"


def worker_name() -> str:
    """Which process made a shard: with several workers on several machines, the
    shard says where it came from."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _text_or_none(value: Any) -> Any:
    """A front-matter value as column text: strings as they are, anything else as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def chunk_rows(document: Document, chunks: list[Chunk]) -> list[dict[str, Any]]:
    """Shard rows (without vectors) for the chunks of one document."""
    fields = document.front_matter
    shared = {name: _text_or_none(fields.get(name)) for name in PROMOTED_FIELDS}
    shared.update(
        path=document.path,
        front_matter=front_matter_json(document),
        front_matter_error=document.front_matter_error,
        encoding=document.encoding,
    )
    return [
        {
            "doc_id": document.doc_id,
            "chunk_id": chunk.chunk_id,
            "text": chunk.text,
            "token_ids": chunk.token_ids,  # for the model; not a column
            "metadata": {
                **shared,
                "heading_path": list(chunk.heading_path),
                "char_start": chunk.char_start,
                "char_end": chunk.char_end,
                "token_count": chunk.token_count,
            },
        }
        for chunk in chunks
    ]


def _chunks_or_rejection(document: Document, tokenizer, settings) -> list[Chunk] | Rejected:
    try:
        chunks = chunk_document(document.text, document.body_start, tokenizer, settings)
    except Exception as exc:  # one odd document must not sink its shard
        return Rejected("chunking_failed", f"{exc.__class__.__name__}: {exc}")
    return chunks or Rejected("no_text", "nothing to embed after the front matter")


def read_documents(corpus: str, rows: list[dict[str, Any]], tokenizer, settings) -> Iterator[tuple]:
    """(manifest row, its chunk rows or its rejection, whether its front matter was
    broken) for each row, in order: the reading a reader process does (``readers``)."""
    for row, document in iter_documents(corpus, rows):
        outcome = document if isinstance(document, Rejected) else _chunks_or_rejection(document, tokenizer, settings)
        if isinstance(outcome, Rejected):
            yield row, outcome, False
        else:
            yield row, chunk_rows(document, outcome), document.front_matter_error is not None


@dataclass
class _Piece:
    """Chunk rows of whole documents, and the documents they close (embedded or rejected)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    documents: int = 0


def read_pieces(corpus: str, rows: list[dict[str, Any]], embedder: Embedder, rejects: list[dict[str, Any]],
                counts: Counter, readers: int = 0) -> Iterator[_Piece]:
    """Read and chunk the shard's documents (in ``readers`` processes, or in this
    thread) into pieces of about PIECE_TOKENS tokens, recording rejections as they
    come (``make bench`` chunks its corpus with it too)."""
    if readers:
        documents = read_in_processes(corpus, rows, embedder.tokenizer, embedder.chunker, readers)
    else:
        documents = read_documents(corpus, rows, embedder.tokenizer, embedder.chunker)
    piece = _Piece()
    for row, outcome, broken_front_matter in documents:
        piece.documents += 1
        if isinstance(outcome, Rejected):
            rejects.append({"doc_id": row["doc_id"], "path": row["path"], "reason": outcome.reason, "detail": outcome.detail})
            continue
        counts["front_matter_errors"] += broken_front_matter
        piece.rows.extend(outcome)
        piece.tokens += sum(len(chunk["token_ids"]) for chunk in outcome)
        if piece.tokens >= PIECE_TOKENS:
            yield piece
            piece = _Piece()
    if piece.documents:
        yield piece


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


def _groups(pieces: Iterator[_Piece], overlap: bool) -> Iterator[_Piece]:
    """Pieces merged into groups: with ``overlap``, whatever a background reader has
    ready each time the model asks; without, GROUP_TOKENS' worth read in this thread."""
    take = GROUP_TOKENS // PIECE_TOKENS
    for ready in read_ahead(pieces, capacity=take, take=take) if overlap else _in_lists(pieces, take):
        group = _Piece()
        for piece in ready:
            group.rows.extend(piece.rows)
            group.tokens += piece.tokens
            group.documents += piece.documents
        yield group


def _now_done(function, *args) -> Future:
    """``ThreadPoolExecutor.submit``'s result for work done in this thread."""
    done: Future = Future()
    try:
        done.set_result(function(*args))
    except Exception as error:
        done.set_exception(error)
    return done


def _write_group(writer: ShardWriter, group: _Piece, vectors, progress: Progress) -> None:
    if group.rows:
        writer.write(group.rows, vectors)
    progress.advance(group.documents, embedded=0.0 if group.rows else group.documents)


def run_shard(
    corpus: str,
    manifest: str,
    output: str,
    shard: int,
    embedder: Embedder,
    total_shards: int,
    report: Reporter | None = None,
    readers: int = 0,
    skip_duplicates: bool = False,
) -> dict[str, Any]:
    """Embed one shard and publish it with its rejects; returns the shard's stats.
    ``readers``: processes that read and chunk (0: this process does).
    ``skip_duplicates``: reject (reason ``duplicate``, unread) each document whose
    manifest content_hash an earlier document in manifest order has."""
    rows = manifest_rows(manifest, shard)
    if not rows:  # never publish an empty shard for documents this manifest copy lacks
        raise PipelineError(f"shard {shard} has no documents in {manifest}")
    if skip_duplicates:
        first_paths = duplicates_in_shard(manifest, shard)
        for row in rows:
            row["duplicate_of"] = first_paths.get(row["path"])
    destination = shard_path(output, shard)
    started_at, clock = _now(), time.monotonic()
    rejects: list[dict[str, Any]] = []
    counts = Counter()
    progress = Progress(len(rows), shard_label(shard, total_shards), report)
    schema = shard_schema(embedder.dimension, embedder.settings())
    try:
        with storage.atomic_output(destination, overwrite=False) as staged:
            writer = ShardWriter(staged.path, schema)
            try:
                # Reading and writing overlap the model only when it leaves the CPU free
                # (a GPU): on a CPU they would slow its threads more than they save.
                overlap = embedder.frees_cpu
                with ThreadPoolExecutor(1, thread_name_prefix="parquet") as background:
                    submit = background.submit if overlap else _now_done
                    written = _now_done(lambda: None)
                    for group in _groups(read_pieces(corpus, rows, embedder, rejects, counts, readers), overlap):
                        if group.rows:
                            token_ids = [row.pop("token_ids") for row in group.rows]
                            # Chunks, tokens and the documents' share count up batch by batch.
                            share = group.documents / group.tokens
                            vectors = embedder.embed(token_ids, on_batch=lambda n, t: progress.advance(0, n, t, t * share))
                            counts.update(chunks=len(group.rows), tokens=group.tokens)
                        written.result()  # the group before, in order; a failed write stops the shard here
                        written = submit(_write_group, writer, group, vectors if group.rows else None, progress)
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
            }
            writer.close(stats)
            _publish_rejects(output, shard, rejects)
    finally:
        progress.close()
    if not staged.published:
        log.info("shard %d already existed (another worker's, or this upload's whose answer was lost); kept it", shard)
    return stats


def _publish_rejects(output: str, shard: int, rejects: list[dict[str, Any]]) -> None:
    """Rejects go out before the shard, so a published shard always has its rejects."""
    path = rejects_path(output, shard)
    if not rejects:
        storage.delete(path)  # a rerun may have fixed what an earlier one rejected
        return
    with storage.atomic_output(path) as staged:
        staged.path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects), encoding="utf-8")
