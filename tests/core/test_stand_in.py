"""The stand-in model: nomic's shape with random weights measures throughput anywhere,
and nothing that uses vectors takes what it makes."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import write_corpus
from pipeline.core.profiles import PROFILES
from pipeline.core.corpus import write_manifest
from pipeline.core.embedder import Embedder
from pipeline.errors import PipelineError
from pipeline.output.read_back import read_shard, stream_embeddings
from pipeline.output.search import query_embedder
from pipeline.output.layout import OutputLayout
from pipeline.core.shard_job import ShardJob, run_shard
from pipeline.core.stand_in import SHAPES, save_stand_in
from pipeline.output.verify import verify_output


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """nomic's width and heads, two of its twelve layers (the same code, less time)."""
    folder = save_stand_in(str(tmp_path_factory.mktemp("stand-in") / "nomic"), "nomic", layers=2)
    return Embedder(PROFILES["nomic"], folder, "cpu", 0, 4096, "float32")


def test_the_stand_in_has_nomics_shape_and_vocabulary_and_says_what_it_is(stand_in, embedder):
    config = stand_in.model[0].auto_model.config
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (768, 12, 4608)
    assert SHAPES["nomic"]["num_hidden_layers"] == 12 and config.num_hidden_layers == 2
    assert stand_in.dimension == 768 and stand_in.max_tokens == 512
    text = "The philosophers have only interpreted the world."
    assert stand_in.tokenizer.encode(text).ids == embedder.tokenizer.encode(text).ids  # bert-base-uncased's vocabulary
    settings = stand_in.settings()
    assert settings["stand_in_for"] == "nomic-ai/nomic-embed-text-v1.5" and settings["prefix"] == "search_document: "
    assert settings["weights_sha256"] != embedder.settings()["weights_sha256"] and "stand_in_for" not in embedder.settings()
    vectors = stand_in.embed_texts([text, "Workers of the world, unite!"])
    assert vectors.shape == (2, 768) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_an_output_the_stand_in_made_is_refused_by_verify_search_and_readers(stand_in, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=3, words=60)
    output = tmp_path / "out"
    manifest = str(output / "manifest.parquet")
    write_manifest(str(corpus), "*.md", 10, manifest)
    run_shard(ShardJob(str(corpus), manifest, str(output), 1), 0, stand_in)
    shard = OutputLayout.of(str(output)).shard(0)
    assert pq.read_metadata(shard).num_rows > 0

    assert any("made by a stand-in for nomic-ai/nomic-embed-text-v1.5" in p for p in verify_output(str(output)).problems)
    for use in (lambda: next(stream_embeddings(str(output))), lambda: read_shard(shard), lambda: query_embedder(str(output))):
        with pytest.raises(PipelineError, match="stand-in .*its vectors mean nothing"):
            use()


def test_a_stand_in_is_only_made_for_a_profile_with_a_known_shape(tmp_path):
    with pytest.raises(PipelineError, match="no stand-in shape for model profile 'minilm'"):
        save_stand_in(str(tmp_path / "x"), "minilm")
