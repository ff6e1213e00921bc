"""``python -m pipeline evaluate OUTPUT``: how well an output's vectors retrieve, without
labelled data, so every storage choice (docs/schema.md, "Smaller vectors") shows what it
costs.

The queries come from the output itself: for a sample of its documents, one sentence of
each (8 to 40 words, picked by a seed from the document's id), whose answer is its own
document. Documents are ranked by their best chunk; recall@1, recall@10 and MRR@10 are
reported for each way the output can be searched: its vectors as stored, its int8
column, and candidates from its binary column rescored on the vectors. A sentence found
in its own document is an easy query: the figures are for comparing storage choices with
each other, not with published benchmarks.

Where the vectors are stored at less than full precision (float16, or cut to fewer
dimensions), a sample of documents is embedded again in float32 at full dimension, and
both are scored on that sample alone: the difference is what the choice costs.

Shards are read one at a time, so memory holds a shard and the queries, whatever the
size of the output.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from pipeline.core.vector_format import (BINARY_COLUMN, INT8_COLUMN, VectorFormat, binary_rows, dequantize_int8,
                                         hamming_distances, list_rows, pack_signs, stored_vectors)
from pipeline import storage
from pipeline.errors import PipelineError
from pipeline.output.layout import OutputLayout
from pipeline.output.read_back import current_shard_rows, embedding_stats, list_embedding_files
from pipeline.core.shard_file import refuse_stand_in, shard_metadata

TOP = 10  # recall@10 and MRR@10
SENTENCE = re.compile(r"(?<=[.!?])\s+")
MIN_WORDS, MAX_WORDS = 8, 40
# Binary search takes this many candidate chunks per query, then rescores them (on the
# shared corpus: recall@10 0.829 with 100, 0.854 with 300, 0.857 with 1,000 and exact).
BINARY_CANDIDATES = 300


@dataclass
class Retrieval:
    """Ranks of each query's own document (0: not in the top ``TOP``)."""

    ranks: list[int] = field(default_factory=list)

    def figures(self) -> dict[str, float]:
        ranks = np.asarray(self.ranks)
        if not len(ranks):
            return {"recall_at_1": 0.0, "recall_at_10": 0.0, "mrr_at_10": 0.0}
        found = (ranks >= 1) & (ranks <= TOP)
        return {"recall_at_1": round(float(np.mean(ranks == 1)), 4),
                "recall_at_10": round(float(np.mean(found)), 4),
                "mrr_at_10": round(float(np.mean(np.where(found, 1.0 / np.maximum(ranks, 1), 0.0))), 4)}


class TopDocuments:
    """Each query's ``TOP`` best documents so far, by their best chunk's score."""

    def __init__(self, queries: int):
        self.scores = np.full((queries, TOP), -np.inf, dtype=np.float32)
        self.docs = np.full((queries, TOP), None, dtype=object)

    def add(self, scores: np.ndarray, doc_ids: list[str]) -> None:
        """``scores`` ``[queries, chunks]`` of chunks whose documents are ``doc_ids``; a
        document's chunks are consecutive and never split across two calls."""
        if not doc_ids:
            return
        starts = np.flatnonzero([True] + [a != b for a, b in zip(doc_ids, doc_ids[1:])])
        best = np.maximum.reduceat(scores, starts, axis=1)
        names = np.asarray([doc_ids[i] for i in starts], dtype=object)
        merged_scores = np.concatenate([self.scores, best], axis=1)
        merged_docs = np.concatenate([self.docs, np.broadcast_to(names, best.shape)], axis=1)
        keep = np.argsort(-merged_scores, axis=1, kind="stable")[:, :TOP]
        self.scores = np.take_along_axis(merged_scores, keep, axis=1)
        self.docs = np.take_along_axis(merged_docs, keep, axis=1)

    def ranks(self, answers: list[str]) -> list[int]:
        return [next((i + 1 for i, doc in enumerate(row) if doc == answer), 0) for row, answer in zip(self.docs, answers)]


class BinaryCandidates:
    """Each query's nearest chunks by Hamming distance on the binary column, with their
    exact scores; documents are then ranked by those exact scores alone."""

    def __init__(self, queries: np.ndarray, count: int = BINARY_CANDIDATES):
        self.packed = pack_signs(queries)
        self.count = count
        self.distances = np.full((len(queries), count), np.iinfo(np.int32).max, dtype=np.int32)
        self.scores = np.zeros((len(queries), count), dtype=np.float32)
        self.docs = np.full((len(queries), count), None, dtype=object)

    def add(self, packed_rows: np.ndarray, exact: np.ndarray, doc_ids: list[str]) -> None:
        distances = np.stack([hamming_distances(packed_rows, query) for query in self.packed])
        names = np.asarray(doc_ids, dtype=object)
        merged = np.concatenate([self.distances, distances], axis=1)
        keep = np.argsort(merged, axis=1, kind="stable")[:, : self.count]
        self.distances = np.take_along_axis(merged, keep, axis=1)
        self.scores = np.take_along_axis(np.concatenate([self.scores, exact], axis=1), keep, axis=1)
        self.docs = np.take_along_axis(np.concatenate([self.docs, np.broadcast_to(names, exact.shape)], axis=1), keep, axis=1)

    def ranks(self, answers: list[str]) -> list[int]:
        ranks = []
        for scores, docs, answer in zip(self.scores, self.docs, answers):
            best: dict[str, float] = {}
            for score, doc in zip(scores, docs):
                if doc is not None and score > best.get(doc, -np.inf):
                    best[doc] = float(score)
            ranked = sorted(best, key=lambda doc: -best[doc])[:TOP]
            ranks.append(ranked.index(answer) + 1 if answer in ranked else 0)
        return ranks


@dataclass(frozen=True)
class Query:
    doc_id: str
    text: str
    chunk_ids: tuple[int, ...]  # the chunks that hold the sentence (two where chunks overlap)


def sampled(doc_id: str, rate: float) -> bool:
    """Whether a document is in the sample: by a hash of its id, so the same documents
    are picked every time and no list of the output's documents is held."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:12], 16) / 16**12 < rate


def query_of(doc_id: str, chunks: dict[int, str]) -> Optional[Query]:
    """One sentence of 8 to 40 words from a document's chunks ``{chunk_id: text}`` (its
    headings and tables left out), picked by a seed from its id; None where it has none."""
    sentences = set()
    for text in chunks.values():
        for sentence in SENTENCE.split(" ".join(line for line in text.splitlines() if not line.lstrip().startswith(("#", "|")))):
            if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
                sentences.add(" ".join(sentence.split()))
    if not sentences:
        return None
    sentence = random.Random(doc_id).choice(sorted(sentences))
    return Query(doc_id, sentence, tuple(chunk_id for chunk_id, text in sorted(chunks.items()) if sentence in " ".join(text.split())))


def make_queries(output: str, documents: int) -> list[Query]:
    """A query for each of about ``documents`` sampled documents that has a sentence."""
    total = max(1, embedding_stats(output)["documents"])
    rate = min(1.0, documents / total)
    queries = []
    for _, table in current_shard_rows(output, ["doc_id", "chunk_id", "text"]):
        texts: dict[str, dict[int, str]] = {}
        for doc_id, chunk_id, text in zip(*(table.column(name).to_pylist() for name in ("doc_id", "chunk_id", "text"))):
            if sampled(doc_id, rate):
                texts.setdefault(doc_id, {})[chunk_id] = text
        queries += filter(None, (query_of(doc_id, chunks) for doc_id, chunks in texts.items()))
    return queries


def embed_queries(embedder, texts: list[str]) -> np.ndarray:
    """Queries' vectors, with the profile's query prefix, in one call (batched)."""
    return embedder.embed_texts(texts, prefix=embedder.profile.query_prefix)


def score_output(output: str, query_vectors: np.ndarray, answers: list[str], vector_format: VectorFormat,
                 settings: dict[str, str], only: Optional[set[str]] = None) -> dict[str, Retrieval]:
    """Each way of searching the output, scored over its shards: its vectors, its int8
    column, binary candidates rescored.

    Args:
        output: the output searched.
        query_vectors: one normalised row per query.
        answers: each query's answer, the doc_id it should find (its rank is scored).
        vector_format: the output's, which says which compact columns it has.
        settings: the output's settings (the int8 column's range).
        only: score only these documents; None scores all."""
    columns = ["doc_id", "embedding_vector", *vector_format.column_names()]
    top = {"vectors": TopDocuments(len(answers))}
    if "int8" in vector_format.compact:
        top["int8"] = TopDocuments(len(answers))
    binary = BinaryCandidates(query_vectors) if "binary" in vector_format.compact else None
    for _, table in current_shard_rows(output, columns):
        if only is not None:
            import pyarrow as pa
            import pyarrow.compute as pc

            table = table.filter(pc.is_in(table.column("doc_id"), value_set=pa.array(sorted(only), pa.string())))
        doc_ids = table.column("doc_id").to_pylist()
        exact = query_vectors @ stored_vectors(table.column("embedding_vector")).T
        top["vectors"].add(exact, doc_ids)
        if "int8" in top:
            dequantized = dequantize_int8(list_rows(table.column(INT8_COLUMN)), float(settings["int8_range"]))
            top["int8"].add(query_vectors @ dequantized.T, doc_ids)
        if binary is not None and doc_ids:
            binary.add(binary_rows(table.column(BINARY_COLUMN)), exact, doc_ids)
    results = {name: Retrieval(found.ranks(answers)) for name, found in top.items()}
    if binary is not None:
        results["binary_rescored"] = Retrieval(binary.ranks(answers))
    return results


def full_precision_sample(output: str, embedder, queries: list[Query], documents: int) -> dict[str, Any]:
    """The chunks of a sample of the queries' documents embedded again in float32 at full
    dimension, and as stored: each query's chunks ranked among the sample's chunks (a
    finer test than documents among a few documents), both ways."""
    from pipeline.core.embedder import EmbedderSettings, load_embedder

    chosen = set(sorted({q.doc_id for q in queries}, key=lambda d: hashlib.sha256(d.encode()).hexdigest())[:documents])
    kept = [q for q in queries if q.doc_id in chosen and q.chunk_ids]
    full = load_embedder(EmbedderSettings(model=embedder.profile.name, device="cpu", max_tokens=embedder.max_tokens,
                                          precision="float32"))
    keys, texts, stored = [], [], []
    for _, table in current_shard_rows(output, ["doc_id", "chunk_id", "text", "embedding_vector"]):
        mine = [i for i, doc_id in enumerate(table.column("doc_id").to_pylist()) if doc_id in chosen]
        if mine:
            table = table.take(mine)
            keys += zip(table.column("doc_id").to_pylist(), table.column("chunk_id").to_pylist())
            texts += table.column("text").to_pylist()
            stored.append(stored_vectors(table.column("embedding_vector")))
    answers = [{(q.doc_id, chunk_id) for chunk_id in q.chunk_ids} for q in kept]

    def ranks(query_vectors: np.ndarray, chunk_vectors: np.ndarray) -> Retrieval:
        order = np.argsort(-(query_vectors @ chunk_vectors.T), axis=1, kind="stable")[:, :TOP]
        return Retrieval([next((i + 1 for i, row in enumerate(top) if keys[row] in answer), 0)
                          for top, answer in zip(order, answers)])

    as_stored = ranks(embed_queries(embedder, [q.text for q in kept]), np.concatenate(stored))
    remade = ranks(embed_queries(full, [q.text for q in kept]), full.embed_texts(texts))
    return {"documents": len(chosen), "queries": len(kept), "chunks": len(texts), "ranked": "chunks",
            "stored": as_stored.figures(), "full_precision": remade.figures()}


def evaluate(output: str, documents: int = 300, sample: int = 10, embedder=None) -> dict[str, Any]:
    """Retrieval figures of an output (see the module's docstring): ``documents`` is
    about how many documents give a query; ``sample`` how many of them are embedded
    again where the stored vectors are not full precision."""
    from pipeline.output.search import query_embedder

    files = list_embedding_files(output)
    if not files:
        raise PipelineError(f"{output}: no shards to evaluate")
    settings = shard_metadata(files[0])
    refuse_stand_in(settings, output)
    vector_format = VectorFormat.of(settings)
    embedder = embedder or query_embedder(output)
    queries = make_queries(output, documents)
    if not queries:
        raise PipelineError(f"{output}: no document has a sentence of {MIN_WORDS} to {MAX_WORDS} words to ask with")
    query_vectors = embed_queries(embedder, [q.text for q in queries])
    scored = score_output(output, query_vectors, [q.doc_id for q in queries], vector_format, settings)
    dimension = int(settings["dimension"])
    result = {
        "queries": len(queries),
        "vector_dtype": vector_format.dtype,
        "dimension": dimension,
        "compact_columns": list(vector_format.compact),
        "bytes_per_chunk": bytes_per_chunk(vector_format, dimension),
        "retrieval": {name: retrieval.figures() for name, retrieval in scored.items()},
    }
    if vector_format.dtype != "float32" or settings.get("matryoshka_from"):
        result["full_precision_sample"] = full_precision_sample(output, embedder, queries, sample)
    return result


def bytes_per_chunk(vector_format: VectorFormat, dimension: int) -> dict[str, int]:
    """What each searchable column holds per chunk, before Parquet's compression."""
    sizes = {"vectors": dimension * (2 if vector_format.dtype == "float16" else 4)}
    if "int8" in vector_format.compact:
        sizes["int8"] = dimension
    if "binary" in vector_format.compact:
        sizes["binary"] = dimension // 8
    return sizes


def publish_evaluation(output: str, result: dict[str, Any]) -> None:
    """Beside the shards (``layout.evaluation``), in one step, for the run report."""
    import datetime as dt

    stamped = {**result, "evaluated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    with storage.atomic_output(OutputLayout.of(output).evaluation) as staged:
        staged.path.write_text(json.dumps(stamped, indent=2))


def read_evaluation(output: str) -> Optional[dict[str, Any]]:
    """The last evaluation's figures, or None where none was made."""
    path = OutputLayout.of(output).evaluation
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def describe_evaluation(result: dict[str, Any]) -> str:
    """One line for the run report: recall@10 of each way of searching."""
    found = ", ".join(f"{figures['recall_at_10']:.3f} ({name.replace('_', ' ')})" for name, figures in result["retrieval"].items())
    return f"recall@10 {found} over {result['queries']} queries (evaluate, {result.get('evaluated_at', '?')})"


def format_evaluation(result: dict[str, Any]) -> Iterator[str]:
    yield (f"{result['queries']} queries (a sentence of a sampled document; its own document is the answer); "
           f"vectors {result['vector_dtype']}, {result['dimension']} dimensions")
    yield f"{'searched on':<18} {'bytes/chunk':>11} {'recall@1':>9} {'recall@10':>10} {'MRR@10':>8}"
    sizes = result["bytes_per_chunk"]
    for name, figures in result["retrieval"].items():
        size = sizes.get(name.split("_")[0], sizes["vectors"])
        yield (f"{name:<18} {size:>11,} {figures['recall_at_1']:>9.3f} {figures['recall_at_10']:>10.3f} "
               f"{figures['mrr_at_10']:>8.3f}")
    sample = result.get("full_precision_sample")
    if sample:
        yield (f"{sample['documents']} documents embedded again in float32 at full dimension; each query's chunk "
               f"among their {sample['chunks']:,} chunks ({sample['queries']} queries):")
        for name in ("stored", "full_precision"):
            figures = sample[name]
            yield (f"{name.replace('_', ' '):<18} {'':>11} {figures['recall_at_1']:>9.3f} {figures['recall_at_10']:>10.3f} "
                   f"{figures['mrr_at_10']:>8.3f}")
