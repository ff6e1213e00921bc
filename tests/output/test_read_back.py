"""pipeline/output/read_back.py: an output read back, as a stream, locally and from a bucket, gives
exactly the rows of its shards; the stats come from footers and match the summary."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline
from helpers import finished_output
from pipeline.output.read_back import EmbeddingBatch, embedding_stats, list_embedding_files, read_shard, stream_embeddings

SHARDS = 3


@pytest.fixture(scope="module")
def finished(tmp_path_factory, embedder):
    """A whole output: 3 shards, rejects in two of them, and its _SUCCESS.json."""
    return finished_output(tmp_path_factory.mktemp("reader"), embedder)


def expected_rows(output) -> dict:
    """Every shard read whole by pyarrow, as plain columns."""
    table = pq.read_table(output / "shards")
    return {
        "doc_ids": table["doc_id"].to_pylist(),
        "chunk_ids": table["chunk_id"].to_pylist(),
        "vectors": table["embedding_vector"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1),
        "texts": table["text"].to_pylist(),
        "metadata": table["metadata"].to_pylist(),
    }


def streamed(output: str, batch_size: int) -> tuple[list[EmbeddingBatch], dict]:
    batches = list(stream_embeddings(output, batch_size=batch_size))
    rows = {
        "doc_ids": [d for b in batches for d in b.doc_ids],
        "chunk_ids": [int(c) for b in batches for c in b.chunk_ids],
        "vectors": np.vstack([b.vectors for b in batches]),
        "texts": [t for b in batches for t in b.texts],
        "metadata": [m for b in batches for m in b.metadata],
    }
    return batches, rows


def assert_same_rows(got: dict, want: dict) -> None:
    assert got["doc_ids"] == want["doc_ids"]
    assert got["chunk_ids"] == want["chunk_ids"]
    assert got["texts"] == want["texts"]
    assert got["metadata"] == want["metadata"]
    assert got["vectors"].dtype == np.float32 and np.array_equal(got["vectors"], want["vectors"])


def test_shard_files_are_listed_in_order_without_temp_files(finished, tmp_path):
    import shutil

    output = tmp_path / "out"
    shutil.copytree(finished, output)
    (output / "shards" / ".shard-000001.parquet.4242@worker-1.1a2b3c4d.tmp").write_bytes(b"half a shard")
    (output / "shards" / "notes.txt").write_text("not a shard")
    files = list_embedding_files(str(output) + "/")
    assert files == [f"{output}/shards/shard-{i:06d}.parquet" for i in range(SHARDS)]
    assert list_embedding_files(str(tmp_path / "nothing")) == []


def test_stream_gives_exactly_the_rows_of_the_shards_in_small_batches(finished):
    want = expected_rows(finished)
    assert len(want["doc_ids"]) > 20, "the test needs shards of several batches"
    batches, got = streamed(str(finished), batch_size=7)
    assert_same_rows(got, want)
    assert all(1 <= len(b) <= 7 for b in batches)
    for batch in batches:
        assert isinstance(batch, EmbeddingBatch)
        assert batch.chunk_ids.dtype == np.int32 and batch.vectors.shape == (len(batch), 384)
        assert len(batch.doc_ids) == len(batch.texts) == len(batch.metadata) == len(batch)
        assert np.allclose(np.linalg.norm(batch.vectors, axis=1), 1, atol=1e-3)
    # One big batch per shard at most: a batch never spans two shards.
    assert len(list(stream_embeddings(str(finished), batch_size=100_000))) == SHARDS


def test_read_shard_is_the_shard_with_its_settings(finished):
    path = list_embedding_files(str(finished))[1]
    table = read_shard(path)
    assert table.equals(pq.read_table(path))
    assert table.schema.metadata[b"pipeline.model_profile"] == b"minilm"


def test_stats_come_from_the_footers_and_match_the_summary(finished):
    summary = json.loads((finished / "_SUCCESS.json").read_text())
    stats = embedding_stats(str(finished))
    assert stats["count"] == summary["chunks"] == pq.read_table(finished / "shards").num_rows
    assert stats["documents"] == summary["embedded_documents"] == 10
    assert stats["shards"] == summary["shards"] == SHARDS
    assert stats["dimension"] == summary["dimension"] == 384
    assert stats["model"] == summary["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert stats["model_profile"] == "minilm" and stats["prefix"] == ""


def test_a_gcs_copy_reads_the_same(finished, gcs_bucket):
    gcs_bucket.upload_folder(finished, "out")
    output = f"{gcs_bucket.url}/out"
    assert list_embedding_files(output + "/") == [f"{output}/shards/shard-{i:06d}.parquet" for i in range(SHARDS)]
    batches, got = streamed(output, batch_size=11)
    assert all(len(b) <= 11 for b in batches)
    assert_same_rows(got, expected_rows(finished))
    assert embedding_stats(output) == embedding_stats(str(finished))
    local = read_shard(str(finished / "shards" / "shard-000002.parquet"))
    assert read_shard(f"{output}/shards/shard-000002.parquet").equals(local)


def test_the_package_re_exports_the_reader():
    assert pipeline.stream_embeddings is stream_embeddings and pipeline.embedding_stats is embedding_stats
    assert {"list_embedding_files", "read_shard", "EmbeddingBatch"} <= set(pipeline.__all__)
