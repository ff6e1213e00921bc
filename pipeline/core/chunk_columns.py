"""Documents read and chunked into columns: what a reader hands to the model's worker.

Chunk rows travel as one Arrow table and their token ids as one flat array with
offsets, not as a dict per chunk: a reader process pickles a few buffers, and the
worker that feeds the GPU spends well under a microsecond per token taking them in
(`make bench`: worker process CPU per token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from pipeline.core.chunking import Chunk, chunk_document
from pipeline.core.corpus import Document, Rejected, front_matter_json, iter_documents
from pipeline.core.shard_file import CHUNK_SCHEMA, PROMOTED_FIELDS


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


@dataclass
class ChunkColumns:
    """Whole documents read and chunked: each document's outcome (its manifest row, its
    rejection or None, whether its front matter was broken) and its chunks' rows and
    token ids as columns."""

    outcomes: list[tuple[dict[str, Any], Rejected | None, bool]]
    chunks: pa.Table  # CHUNK_SCHEMA: a shard's columns but the vectors
    token_ids: np.ndarray  # every chunk's ids, one after the other (int32)
    offsets: np.ndarray  # chunk i's ids are token_ids[offsets[i]:offsets[i + 1]]

    @property
    def documents(self) -> int:
        return len(self.outcomes)

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    def token_id_list(self) -> list[np.ndarray]:
        """Each chunk's ids, as views into the flat array."""
        return np.split(self.token_ids, self.offsets[1:-1]) if self.chunks.num_rows else []

    @classmethod
    def join(cls, parts: Sequence["ChunkColumns"]) -> "ChunkColumns":
        """Several reads as one, in order."""
        if len(parts) == 1:
            return parts[0]
        starts = np.cumsum([0] + [part.tokens for part in parts[:-1]])
        offsets = [parts[0].offsets[:1]] + [part.offsets[1:] + start for part, start in zip(parts, starts)]
        return cls([outcome for part in parts for outcome in part.outcomes],
                   pa.concat_tables([part.chunks for part in parts]) if parts else CHUNK_SCHEMA.empty_table(),
                   np.concatenate([part.token_ids for part in parts] or [np.zeros(0, np.int32)]),
                   np.concatenate(offsets or [np.zeros(1, np.int64)]))


def read_documents(corpus: str, rows: list[dict[str, Any]], tokenizer, settings) -> Iterator[tuple]:
    """(manifest row, its chunks or its rejection, the document) for each row, in order."""
    for row, document in iter_documents(corpus, rows):
        outcome = document if isinstance(document, Rejected) else _chunks_or_rejection(document, tokenizer, settings)
        yield row, outcome, document


def read_columns(corpus: str, rows: list[dict[str, Any]], tokenizer, settings) -> ChunkColumns:
    """Read and chunk ``rows``' documents into columns: the work a reader does."""
    outcomes, chunk_dicts, ids = [], [], []
    for row, outcome, document in read_documents(corpus, rows, tokenizer, settings):
        if isinstance(outcome, Rejected):
            outcomes.append((row, outcome, False))
            continue
        outcomes.append((row, None, document.front_matter_error is not None))
        chunk_dicts.extend(chunk_rows(document, outcome))
        ids.extend(chunk.token_ids for chunk in outcome)
    lengths = np.fromiter((len(chunk_ids) for chunk_ids in ids), dtype=np.int64, count=len(ids))
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    flat = np.concatenate(ids).astype(np.int32, copy=False) if ids else np.zeros(0, np.int32)
    return ChunkColumns(outcomes, pa.Table.from_pylist(chunk_dicts, schema=CHUNK_SCHEMA), flat, offsets)
