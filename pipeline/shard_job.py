"""Embedding one shard: read its documents, chunk, embed, publish. No Luigi here.

A document that cannot be read, decoded or chunked is recorded in the shard's
rejects file with its reason; it never fails the shard. The shard file is published
only when every document is either embedded or rejected.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import Counter
from typing import Any

from .chunking import Chunk, chunk_document
from .corpus import Document, Rejected, front_matter_json, iter_documents, manifest_rows
from .embedder import Embedder
from .progress import Progress, Reporter
from .shards import PROMOTED_FIELDS, ShardWriter, shard_schema
from . import storage

log = logging.getLogger("luigi-interface")

# Chunks are embedded in groups of about this many batches' worth of tokens: big
# enough to sort by length usefully, small enough to keep memory flat and progress live.
GROUP_BATCHES = 4


def shard_path(output: str, shard: int) -> str:
    return f"{output}/shards/shard-{shard:06d}.parquet"


def rejects_path(output: str, shard: int) -> str:
    return f"{output}/rejects/shard-{shard:06d}.jsonl"


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
            "tokens": chunk.token_count,
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


def _chunks_or_rejection(document: Document, embedder: Embedder) -> list[Chunk] | Rejected:
    try:
        chunks = chunk_document(document.text, document.body_start, embedder.tokenizer, embedder.chunker)
    except Exception as exc:  # one odd document must not sink its shard
        return Rejected("chunking_failed", f"{exc.__class__.__name__}: {exc}")
    return chunks or Rejected("no_text", "nothing to embed after the front matter")


def run_shard(
    corpus: str,
    manifest: str,
    output: str,
    shard: int,
    embedder: Embedder,
    total_shards: int,
    report: Reporter | None = None,
) -> dict[str, Any]:
    """Embed one shard and publish it with its rejects; returns the shard's stats."""
    rows = manifest_rows(manifest, shard)
    destination = shard_path(output, shard)
    started_at, clock = _now(), time.monotonic()
    rejects: list[dict[str, Any]] = []
    counts = Counter()
    progress = Progress(len(rows), f"shard {shard + 1}/{total_shards}", report)
    group_tokens = GROUP_BATCHES * embedder.batch_tokens
    pending: list[dict[str, Any]] = []
    pending_documents = pending_tokens = 0

    def embed_pending(writer: ShardWriter) -> None:
        nonlocal pending_documents, pending_tokens
        tokens = [row.pop("tokens") for row in pending]
        writer.write(pending, embedder.embed([row["text"] for row in pending], tokens))
        counts.update(chunks=len(pending), tokens=sum(tokens))
        progress.advance(pending_documents, len(pending), sum(tokens))
        pending.clear()
        pending_documents = pending_tokens = 0

    schema = shard_schema(embedder.dimension, embedder.settings())
    try:
        with storage.atomic_output(destination, overwrite=False) as staged:
            writer = ShardWriter(staged.path, schema)
            try:
                for row, document in iter_documents(corpus, rows):
                    outcome = document if isinstance(document, Rejected) else _chunks_or_rejection(document, embedder)
                    if isinstance(outcome, Rejected):
                        rejects.append({"doc_id": row["doc_id"], "path": row["path"], "reason": outcome.reason, "detail": outcome.detail})
                        progress.advance(1)
                        continue
                    counts["front_matter_errors"] += document.front_matter_error is not None
                    pending.extend(chunk_rows(document, outcome))
                    pending_documents += 1
                    pending_tokens += sum(chunk.token_count for chunk in outcome)
                    if pending_tokens >= group_tokens:
                        embed_pending(writer)
                if pending:
                    embed_pending(writer)
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
                "chunks": counts["chunks"],
                "tokens": counts["tokens"],
                "started_at": started_at,
                "finished_at": _now(),
                "seconds": round(time.monotonic() - clock, 3),
                "device": embedder.device,
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
