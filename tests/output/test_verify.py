"""``python -m pipeline verify``: passes on a finished output, and names each kind of
damage done to a copy of it by hand."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import finished_output
from pipeline.cli import main
from pipeline.output.layout import OutputLayout
from pipeline.output.verify import verify_output

SHARDS = 3


@pytest.fixture(scope="module")
def finished(tmp_path_factory, embedder):
    """A whole output: 3 shards, rejects in two of them, and its _SUCCESS.json."""
    return finished_output(tmp_path_factory.mktemp("verify"), embedder)


@pytest.fixture
def output(finished, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(finished, copy)
    return copy


def problems(output) -> list[str]:
    verdict = verify_output(str(output))
    assert not verdict.ok
    return verdict.problems


def rewrite_shard(path, change_table=lambda t: t, change_settings=lambda m: m, change_stats=lambda s: s):
    """Write a shard again with its rows, settings or stats changed, the way the
    pipeline writes them (settings in the schema, stats in the footer)."""
    parquet = pq.ParquetFile(path)
    table = change_table(parquet.read())
    settings = change_settings({k.decode(): v.decode() for k, v in table.schema.metadata.items()})
    stats = change_stats(json.loads(parquet.metadata.metadata[b"pipeline.stats"]))
    with pq.ParquetWriter(path, table.schema.with_metadata(settings)) as writer:
        writer.write_table(table.replace_schema_metadata(settings))
        writer.add_key_value_metadata({"pipeline.stats": json.dumps(stats)})


def with_vector(table, row, vector):
    vectors = table["embedding_vector"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1).copy()
    vectors[row] = vector
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1])
    return table.set_column(table.schema.get_field_index("embedding_vector"), table.schema.field("embedding_vector"), column)


def test_a_finished_output_passes_and_the_command_exits_0(finished, capsys):
    verdict = verify_output(str(finished))
    assert verdict.ok, verdict.problems
    summary = json.loads((finished / "_SUCCESS.json").read_text())
    assert verdict.totals["documents"] == summary["documents"] == 12
    assert verdict.totals["rejected_documents"] == 2 and verdict.totals["chunks"] == summary["chunks"] > 12
    assert main(["verify", str(finished)]) == 0
    assert capsys.readouterr().out.startswith(f"{finished}: ok: 3 shards, 12 documents (10 embedded, 2 rejected")


def test_a_deleted_shard_is_named_and_the_command_exits_1(output, capsys):
    (output / "shards" / "shard-000001.parquet").unlink()
    assert main(["verify", str(output)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "shard-000001.parquet: missing (its 4 documents are not embedded)"
    assert any(line.startswith("_SUCCESS.json: does not match the shards") for line in lines)
    assert lines[-1] == f"{output}: {len(lines) - 1} problem(s)"


def test_a_truncated_shard_is_unreadable(output):
    path = output / "shards" / "shard-000002.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert any(p.startswith("shard-000002.parquet: unreadable") for p in problems(output))


def test_a_shard_from_another_model_is_refused(output):
    rewrite_shard(output / "shards" / "shard-000001.parquet",
                  change_settings=lambda m: {**m, "pipeline.model_id": "other/model", "pipeline.prefix": "query: "})
    found = problems(output)
    assert found[0].startswith("shard-000001.parquet: made with other settings: model_id 'other/model' "
                               "(shard-000000: 'sentence-transformers/all-MiniLM-L6-v2'); prefix 'query: '")


def test_a_shard_made_with_other_weights_of_the_same_model_is_refused(output):
    """A new revision or a fine-tune keeps the model id; the weights' fingerprint tells them apart."""
    first = pq.ParquetFile(output / "shards" / "shard-000000.parquet").schema_arrow.metadata[b"pipeline.weights_sha256"]
    assert len(first) == 16
    rewrite_shard(output / "shards" / "shard-000001.parquet", change_settings=lambda m: {**m, "pipeline.weights_sha256": "0" * 16})
    assert problems(output)[0].startswith(f"shard-000001.parquet: made with other settings: weights_sha256 '{'0' * 16}' "
                                          f"(shard-000000: '{first.decode()}')")


def test_a_shard_made_before_weights_were_recorded_still_verifies_beside_newer_ones(output):
    rewrite_shard(output / "shards" / "shard-000001.parquet",
                  change_settings=lambda m: {k: v for k, v in m.items() if k != "pipeline.weights_sha256"})
    verdict = verify_output(str(output))
    assert verdict.ok, verdict.problems


def test_vectors_of_another_dimension_are_refused(output):
    def longer(table):
        vectors = table["embedding_vector"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
        wide = np.hstack([vectors, vectors]) / np.sqrt(2)
        column = pa.FixedSizeListArray.from_arrays(pa.array(wide.reshape(-1), pa.float32()), wide.shape[1])
        return table.drop_columns(["embedding_vector"]).add_column(2, "embedding_vector", column)

    rewrite_shard(output / "shards" / "shard-000002.parquet", change_table=longer)
    assert any(p.startswith("shard-000002.parquet: schema differs") for p in problems(output))


def test_a_nan_vector_and_a_vector_not_of_norm_1_are_named_by_document_and_chunk(output):
    path = output / "shards" / "shard-000000.parquet"
    table = pq.read_table(path)
    doc, chunk = table["doc_id"][3].as_py(), table["chunk_id"][3].as_py()
    broken = np.ones(table["embedding_vector"].type.list_size, dtype=np.float32)
    broken[5] = np.nan
    rewrite_shard(path, change_table=lambda t: with_vector(with_vector(t, 3, broken), 4, np.full_like(broken, 0.5)))
    found = problems(output)
    assert f"shard-000000.parquet: 1 vector(s) not finite (first: {doc} chunk {chunk})" in found
    assert any(p.startswith("shard-000000.parquet: 1 vector(s) norm not 1") for p in found)


def test_duplicate_rows_and_gaps_in_chunk_ids_are_named(output):
    path = output / "shards" / "shard-000000.parquet"
    rewrite_shard(path, change_table=lambda t: pa.concat_tables([t, t.slice(0, 1)]))
    found = problems(output)
    assert any("has duplicate chunk ids [0]" in p for p in found)
    assert any(p.startswith("shard-000000.parquet: its stats do not match its rows: chunks") for p in found)

    table = pq.read_table(path).slice(0, None)
    first_doc = table["doc_id"][0].as_py()
    ids = [row for row, doc in enumerate(table["doc_id"].to_pylist()) if doc == first_doc]
    assert len(ids) > 2, "the test needs a document of three chunks or more"
    rewrite_shard(path, change_table=lambda t: t.take([i for i in range(t.num_rows - 1) if i != ids[1]]),
                  change_stats=lambda s: s)
    assert any(f"document {first_doc} has chunk ids [0, 2" in p for p in problems(output))


def test_a_lost_rejects_file_leaves_documents_unaccounted_for(output):
    rejected = [p for p in (output / "rejects").glob("*.jsonl")]
    assert rejected
    for path in rejected:
        path.unlink()
    found = problems(output)
    assert any("document(s) neither embedded nor rejected, first: part-" in p for p in found)


def test_a_document_both_embedded_and_rejected_is_counted_twice(output):
    path = output / "shards" / "shard-000000.parquet"
    doc = pq.read_table(path)["doc_id"][0].as_py()
    with open(OutputLayout.of(str(output)).rejects_of(0), "a") as rejects:
        rejects.write(json.dumps({"doc_id": doc, "path": "x.md", "reason": "empty", "detail": "?"}) + "\n")
    assert any("counted twice" in p for p in problems(output))


def test_a_summary_that_does_not_add_up_and_stray_files_are_named(output):
    summary = json.loads((output / "_SUCCESS.json").read_text())
    (output / "_SUCCESS.json").write_text(json.dumps({**summary, "chunks": summary["chunks"] + 1}))
    shutil.copy(output / "shards" / "shard-000000.parquet", output / "shards" / "shard-000007.parquet")
    found = problems(output)
    assert f"_SUCCESS.json: does not match the shards: chunks {summary['chunks'] + 1} (found {summary['chunks']})" in found
    assert "shards/shard-000007.parquet: not a shard of the manifest's 3" in found


def test_an_unfinished_output_or_no_output_fails(output, tmp_path, capsys):
    (output / "_SUCCESS.json").unlink()
    assert problems(output) == ["_SUCCESS.json: missing (EmbedAll writes it once every shard exists)"]
    assert main(["verify", str(tmp_path / "nothing")]) == 1
    assert "manifest.parquet: missing" in capsys.readouterr().out


def test_json_verdict(output, capsys):
    (output / "shards" / "shard-000000.parquet").unlink()
    assert main(["verify", str(output), "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["ok"] is False and verdict["problems"][0].startswith("shard-000000.parquet: missing")
    assert verdict["model"] == "sentence-transformers/all-MiniLM-L6-v2" and verdict["dimension"] == "384"


def test_an_output_in_a_bucket_passes_and_a_deleted_object_is_named(finished, bucket):
    bucket.upload_folder(finished, "out")
    assert verify_output(f"{bucket.url}/out/").ok
    if bucket.kind == "gcs":
        bucket.client.bucket(bucket.name).blob("out/shards/shard-000002.parquet").delete()
    else:
        bucket.client.delete_object(Bucket=bucket.name, Key="out/shards/shard-000002.parquet")
    found = verify_output(f"{bucket.url}/out").problems
    assert found[0] == "shard-000002.parquet: missing (its 4 documents are not embedded)"
