"""``python -m pipeline search OUTPUT "query"``: exact nearest chunks to a query.

A check that the vectors make sense (a question about one document should find that
document), not a search engine: every vector is read once, as a stream, so memory holds
one batch and the k best so far, and the time grows with the output. The query is
embedded by the model that made the output (named in its first shard), with the
model's query prefix (``search_query: `` for nomic, none for minilm), so it lands in
the same space as the chunks.
"""

from __future__ import annotations

from typing import Any, Optional

from pipeline.output import layout
from pipeline.errors import PipelineError
from pipeline.output.read_back import list_embedding_files, stream_embeddings
from pipeline.core.shard_file import refuse_stand_in, shard_metadata

BATCH_ROWS = 8192


def query_embedder(output: str, device: str = "cpu"):
    """The embedder an output's vectors came from: its first shard's model profile and
    max tokens, in float32 (a single query needs no speed, and fp16 is CUDA-only)."""
    from pipeline.core.embedder import EmbedderSettings, load_embedder

    files = list_embedding_files(output)
    if not files:
        raise PipelineError(f"{output}: no shards ({layout.SHARDS}/{layout.SHARD_FILE_PATTERN}) to search")
    settings = shard_metadata(files[0])
    refuse_stand_in(settings, output)
    return load_embedder(EmbedderSettings(model=settings["model_profile"], device=device, max_tokens=int(settings["max_tokens"]),
                                          precision="float32", dimensions=query_dimensions(settings)))


def query_dimensions(settings: dict[str, str]) -> int:
    """``--dimensions`` as the output's shards record it: queries are cut the same way."""
    return int(settings["dimension"]) if settings.get("matryoshka_from") else 0


def embed_query(embedder, query: str):
    """The query's unit vector, framed with the profile's query prefix."""
    return embedder.embed_texts([query], prefix=embedder.profile.query_prefix)[0]


def search(output: str, query: str, k: int = 5, embedder: Optional[Any] = None,
           batch_size: int = BATCH_ROWS, binary_candidates: int = 0) -> list[dict[str, Any]]:
    """The ``k`` chunks of ``output`` most similar to ``query``, best first: dicts with
    ``score`` (cosine similarity: vectors are unit length, so a dot product), ``doc_id``,
    ``chunk_id``, ``title``, ``path`` and ``text``.

    Args:
        output: a finished output (a folder or bucket prefix).
        query: the text searched for; the profile's query prefix is put before it.
        k: how many chunks to return.
        embedder: the one to embed the query with (default: the output's model, loaded
            on the CPU); it must be the model that made the output, which is checked by
            dimension.
        batch_size: rows read at a time.
        binary_candidates: first take this many candidates by Hamming distance on the
            output's binary column (it must have one), then rescore only those on the
            full vectors; 0 scores every row on the full vectors."""
    import numpy as np

    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    if embedder is None:
        embedder = query_embedder(output)
    vector = np.asarray(embed_query(embedder, query), dtype=np.float32)
    batches = stream_embeddings(output, batch_size)
    if binary_candidates:
        batches = candidate_batches(output, vector, max(binary_candidates, k))
    best: list[tuple[float, int, dict[str, Any]]] = []  # (score, order, row); order breaks ties stably
    seen = 0
    for batch in batches:
        if batch.vectors.shape[1] != vector.shape[0]:
            raise PipelineError(f"{output}: vectors have {batch.vectors.shape[1]} dimensions, the query's model "
                                f"{embedder.profile.model_id} gives {vector.shape[0]}")
        scores = batch.vectors @ vector
        take = min(k, len(scores))
        top = np.argpartition(-scores, take - 1)[:take] if take < len(scores) else np.arange(len(scores))
        for i in top:
            meta = batch.metadata[i] or {}
            best.append((float(scores[i]), seen + int(i), {
                "score": float(scores[i]), "doc_id": batch.doc_ids[i], "chunk_id": int(batch.chunk_ids[i]),
                "title": meta.get("title"), "path": meta.get("path"), "text": batch.texts[i],
            }))
        best.sort(key=lambda item: (-item[0], item[1]))
        del best[k:]
        seen += len(scores)
    return [row for _, _, row in best]


def candidate_batches(output: str, vector, count: int):
    """The ``count`` rows nearest ``vector`` by Hamming distance between sign bits (the
    binary column: a few bytes a row are read, not the vectors), as ``EmbeddingBatch``es
    of their full rows, one per shard that holds any."""
    import heapq

    import numpy as np

    from pipeline.core.vector_format import BINARY_COLUMN, VectorFormat, binary_rows, hamming_distances, pack_signs
    from pipeline.output.read_back import current_shard_rows, embedding_batch

    files = list_embedding_files(output)
    if files and "binary" not in VectorFormat.of(shard_metadata(files[0])).compact:
        raise PipelineError(f"{output} has no binary column to take candidates from (embed with --compact-columns binary)")
    query = pack_signs(vector[None, :])[0]
    nearest: list[tuple[int, int, int, int]] = []  # (-distance, -shard, -row, shard): a max-heap of the count nearest
    for shard, table in current_shard_rows(output, ["doc_id", "chunk_id", BINARY_COLUMN]):
        distances = hamming_distances(binary_rows(table.column(BINARY_COLUMN)), query)
        take = min(count, len(distances))
        for row in np.argpartition(distances, take - 1)[:take] if take < len(distances) else range(len(distances)):
            item = (-int(distances[row]), -shard, -int(row), shard)
            if len(nearest) < count:
                heapq.heappush(nearest, item)
            elif item > nearest[0]:
                heapq.heapreplace(nearest, item)
    rows_of: dict[int, list[int]] = {}
    for _, _, row, shard in nearest:
        rows_of.setdefault(shard, []).append(-row)
    for shard, table in current_shard_rows(output, None, shards=set(rows_of)):
        for record_batch in table.take(sorted(rows_of[shard])).to_batches():
            yield embedding_batch(record_batch)


def excerpt(text: str, width: int = 100) -> str:
    """The text on one line, cut to ``width`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def format_results(results: list[dict[str, Any]]) -> str:
    """One block per hit: rank, score, title and path, then an excerpt."""
    if not results:
        return "no results (the output holds no chunks)"
    lines = []
    for rank, hit in enumerate(results, 1):
        title = hit["title"] or "(no title)"
        lines.append(f"{rank:>2}. {hit['score']:.4f}  {title}  [{hit['path']} #{hit['chunk_id']}]")
        lines.append(f"    {excerpt(hit['text'])}")
    return "\n".join(lines)
