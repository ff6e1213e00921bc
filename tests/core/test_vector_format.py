"""Smaller vectors (pipeline/core/vector_format.py, --dimensions in the embedder): float16
storage read back as float32, binary and int8 columns that follow from the vectors, the
Matryoshka transform against a hand computation, and every refusal in one clear line."""

import dataclasses

import luigi
import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import write_corpus
from pipeline import EmbedAll
from pipeline.core.corpus import write_manifest
from pipeline.core.embedder import Embedder, EmbedderSettings, load_embedder
from pipeline.core.matryoshka import check_dimensions
from pipeline.core.profiles import PROFILES
from pipeline.core.shard_job import ShardJob, run_shard
from pipeline.core.vector_format import (BINARY_COLUMN, INT8_COLUMN, VectorFormat, binary_rows, dequantize_int8,
                                         hamming_distances, int8_range, pack_signs, quantize_int8)
from pipeline.errors import PipelineError
from pipeline.output.layout import OutputLayout
from pipeline.output.read_back import read_shard, stream_embeddings
from pipeline.output.verify import verify_output


def test_formats_parse_in_a_fixed_order_and_refuse_what_they_do_not_know():
    assert VectorFormat.parse("float16", " int8 ,binary") == VectorFormat("float16", ("binary", "int8"))
    assert VectorFormat.parse("float32", "") == VectorFormat()
    assert VectorFormat.of({}) == VectorFormat()  # a shard from before the format was recorded
    with pytest.raises(PipelineError, match="unknown vector dtype 'bfloat16'; choose one of float32, float16"):
        VectorFormat.parse("bfloat16", "")
    with pytest.raises(PipelineError, match="unknown compact column 'pq'"):
        VectorFormat.parse("float32", "binary,pq")
    with pytest.raises(PipelineError, match="100 is not a multiple of 8"):
        VectorFormat.parse("float32", "binary").check(100)


def test_sign_bits_pack_highest_first_and_hamming_counts_differing_bits():
    vectors = np.array([[0.5, -0.1, 0.0, 0.2, -0.3, 0.1, 0.1, -0.9, 0.4, -0.4, 0.3, 0.3, -0.2, -0.2, 0.1, 0.1]])
    # bits: 1 0 0 1 0 1 1 0 | 1 0 1 1 0 0 1 1
    assert pack_signs(vectors).tolist() == [[0b10010110, 0b10110011]]
    rows = np.array([[0b10010110, 0b10110011], [0b01101001, 0b01001100], [0b10010111, 0b10110011]], dtype=np.uint8)
    assert hamming_distances(rows, pack_signs(vectors)[0]).tolist() == [0, 16, 1]


def test_int8_covers_a_unit_vectors_spread_and_rounds_within_half_a_step():
    assert int8_range(384) == pytest.approx(8 / np.sqrt(384)) and int8_range(16) == 1.0
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    values = quantize_int8(vectors)
    assert values.dtype == np.int8 and np.abs(values).max() <= 127
    step = int8_range(384) / 127
    assert np.abs(dequantize_int8(values, int8_range(384)) - vectors).max() <= step / 2 + 1e-7
    assert quantize_int8(np.full((1, 384), 0.9, np.float32)).tolist() == [[127] * 384]  # beyond the range: clipped


@pytest.fixture(scope="module")
def small_outputs(tmp_path_factory, embedder):
    """The same six documents stored as float32, and as float16 with both compact columns."""
    root = tmp_path_factory.mktemp("formats")
    corpus = write_corpus(root / "corpus", documents=6, words=300)
    outputs = {}
    for name, vector_format in {"plain": VectorFormat(), "small": VectorFormat("float16", ("binary", "int8"))}.items():
        output = root / name
        manifest = str(output / "manifest.parquet")
        write_manifest(str(corpus), "*.md", 3, manifest)
        for shard in range(2):
            run_shard(ShardJob(str(corpus), manifest, str(output), 2, vector_format=vector_format), shard, embedder)
        outputs[name] = output
    return corpus, outputs


def test_float16_with_compact_columns_is_recorded_read_back_as_float32_and_verifies(small_outputs):
    _, outputs = small_outputs
    small = pq.read_table(OutputLayout.of(outputs["small"]).shard(0))
    assert str(small.schema.field("embedding_vector").type) == "fixed_size_list<element: halffloat>[384]"
    assert small.schema.names[2:5] == ["embedding_vector", BINARY_COLUMN, INT8_COLUMN]
    settings = {k.decode(): v.decode() for k, v in small.schema.metadata.items()}
    assert settings["pipeline.vector_dtype"] == "float16" and settings["pipeline.compact_columns"] == "binary,int8"
    assert float(settings["pipeline.int8_range"]) == int8_range(384)

    plain, half = (np.concatenate([b.vectors for b in stream_embeddings(str(outputs[n]))]) for n in ("plain", "small"))
    assert half.dtype == np.float32 and half.shape == plain.shape
    assert 0 < np.abs(half - plain).max() < 1e-3  # float16's rounding, and no more
    # The compact columns follow from the vectors as stored.
    stored = read_shard(OutputLayout.of(outputs["small"]).shard(0))
    vectors = stored["embedding_vector"].combine_chunks().flatten().to_numpy().astype(np.float32).reshape(stored.num_rows, -1)
    assert np.array_equal(binary_rows(stored[BINARY_COLUMN]), pack_signs(vectors))
    assert np.array_equal(stored[INT8_COLUMN].combine_chunks().flatten().to_numpy().reshape(stored.num_rows, -1),
                          quantize_int8(vectors))
    for output in outputs.values():
        assert verify_output(str(output)).problems == ["_SUCCESS.json: missing (EmbedAll writes it once every shard exists)"]


def test_verify_finds_a_binary_column_that_is_not_the_vectors_signs(small_outputs, tmp_path):
    import shutil

    _, outputs = small_outputs
    tampered = tmp_path / "tampered"
    shutil.copytree(outputs["small"], tampered)
    path = OutputLayout.of(tampered).shard(1)
    table = pq.read_table(path)
    flipped = binary_rows(table[BINARY_COLUMN]).copy()
    flipped[2, 0] ^= 0b1000_0000
    import pyarrow as pa

    column = pa.FixedSizeBinaryArray.from_buffers(table.schema.field(BINARY_COLUMN).type, len(flipped),
                                                  [None, pa.py_buffer(np.ascontiguousarray(flipped))])
    pq.write_table(table.set_column(table.schema.get_field_index(BINARY_COLUMN), table.schema.field(BINARY_COLUMN),
                                    column), path)
    problems = verify_output(str(tampered)).problems
    assert any("shard-000001.parquet: 1 vector(s) binary column not the vectors' signs" in p for p in problems), problems


def test_an_output_refuses_another_vector_format_and_old_shards_count_as_float32(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=4, words=60)
    settings = dict(corpus=str(corpus), output=str(tmp_path / "out"), docs_per_shard=2, device="cpu",
                    batch_tokens=16384, precision="float32")
    assert luigi.build([EmbedAll(**settings, vector_dtype="float16", compact_columns="binary")], local_scheduler=True,
                       log_level="WARNING")
    (tmp_path / "out" / "shards" / "shard-000001.parquet").unlink()
    (tmp_path / "out" / "_SUCCESS.json").unlink()
    from pipeline import planning

    with pytest.raises(PipelineError, match=r"vector_dtype: 'float16' in the output, 'float32' now; "
                                            r"compact_columns: 'binary' in the output, '' now"):
        planning.plan_run(EmbedAll(**settings))
    assert luigi.build([EmbedAll(**settings, vector_dtype="float16", compact_columns="binary")], local_scheduler=True,
                       log_level="WARNING")
    assert verify_output(str(tmp_path / "out")).ok


def test_unknown_formats_and_untrained_dimensions_fail_before_anything_is_listed(tmp_path):
    from pipeline import planning

    run = dict(corpus=str(write_corpus(tmp_path / "corpus", documents=2, words=40)), output=str(tmp_path / "out"))
    with pytest.raises(PipelineError, match="unknown vector dtype 'int4'"):
        planning.plan_run(EmbedAll(**run, vector_dtype="int4"))
    with pytest.raises(PipelineError, match=r"model minilm is not trained for shorter vectors \(Matryoshka\).*works with: nomic"):
        planning.plan_run(EmbedAll(**run, dimensions=128))
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    assert check_dimensions(PROFILES["minilm"], 384) == 0  # the model's own: nothing to cut
    assert check_dimensions(PROFILES["nomic"], 256) == 256
    with pytest.raises(PipelineError, match=r"--dimensions 32 is outside what nomic is trained for \(64 to 768\)"):
        check_dimensions(PROFILES["nomic"], 32)


def test_matryoshka_cuts_after_a_layer_norm_and_normalises_again_as_its_authors_do(embedder):
    """The offline model is not trained for it, so only the mechanics are tested: a
    profile that says it is gives what a hand computation gives, for chunks and queries."""
    trained = dataclasses.replace(PROFILES["minilm"], matryoshka_dimensions=(64, 384))
    cut = Embedder(trained, "", "cpu", 0, 16384, "float32", dimensions=128)
    assert cut.dimension == 128 and cut.settings()["dimension"] == "128" and cut.settings()["matryoshka_from"] == "384"
    texts = ["The tides follow the moon.", "Bees make honey from nectar in the hive."]
    raw = embedder.model.encode(texts, normalize_embeddings=False, convert_to_numpy=True).astype(np.float64)
    by_hand = (raw - raw.mean(axis=1, keepdims=True)) / np.sqrt(raw.var(axis=1, keepdims=True) + 1e-5)
    by_hand = by_hand[:, :128] / np.linalg.norm(by_hand[:, :128], axis=1, keepdims=True)
    assert np.abs(cut.embed_texts(texts) - by_hand).max() < 1e-5
    assert np.abs(cut.embed_texts(texts[:1], prefix="")[0] - by_hand[0]).max() < 1e-5  # a query: the same transform
    assert load_embedder(EmbedderSettings(device="cpu", dimensions=0)).dimension == 384
