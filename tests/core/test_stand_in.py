"""The stand-in model: nomic's published layout with random weights, loaded through the
production code anywhere, and nothing that uses vectors takes what it makes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors import safe_open

from helpers import ROOT, luigi_env, write_corpus
from pipeline.core import nomic_layout
from pipeline.core.corpus import write_manifest
from pipeline.core.embedder import Embedder
from pipeline.core.profiles import PROFILES
from pipeline.core.shard_job import ShardJob, run_shard
from pipeline.core.stand_in import MARKER, save_stand_in
from pipeline.errors import PipelineError
from pipeline.output.layout import OutputLayout
from pipeline.output.read_back import read_shard, stream_embeddings
from pipeline.output.search import query_embedder
from pipeline.output.verify import verify_output


@pytest.fixture(scope="module")
def stand_in_folder(tmp_path_factory):
    """nomic's layout, two of its twelve layers (the same code, less time)."""
    return Path(save_stand_in(str(tmp_path_factory.mktemp("stand-in") / "nomic"), "nomic", layers=2))


@pytest.fixture(scope="module")
def stand_in(stand_in_folder):
    return Embedder(PROFILES["nomic"], str(stand_in_folder), "cpu", 0, 4096, "float32")


def test_the_stand_in_is_nomics_published_layout(stand_in_folder):
    folder = stand_in_folder
    config = json.loads((folder / "config.json").read_text())
    assert config == dict(nomic_layout.PUBLISHED_CONFIG, n_layer=2)
    assert config["auto_map"]["AutoModel"].startswith("nomic-ai/nomic-bert-2048--")  # remote code it never runs
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        published = {name: (weights.get_slice(name).get_shape(), weights.get_slice(name).get_dtype()) for name in weights.keys()}
    assert published == {name: (list(shape), "F32") for name, shape in nomic_layout.published_tensors(2).items()}
    assert json.loads((folder / "modules.json").read_text()) == nomic_layout.MODULES
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True


def test_it_loads_as_transformers_nomicbert_with_its_own_shape_and_says_what_it_is(stand_in, embedder):
    model = stand_in.model[0].auto_model
    assert type(model).__name__ == "NomicBertModel" and type(model).__module__.startswith("transformers.models.nomic_bert")
    # nomic's key names are read: two layers, not NomicBertConfig's default twelve filled with random weights.
    assert model.config.num_hidden_layers == len(model.layers) == 2
    assert model.config.rope_parameters["rope_theta"] == 1000.0
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


def test_a_stand_in_is_only_made_for_nomic(tmp_path):
    with pytest.raises(PipelineError, match="no stand-in for model profile 'minilm'"):
        save_stand_in(str(tmp_path / "x"), "minilm")


def test_unmarked_it_is_the_same_layout_without_the_marker(nomic_home):
    folder = Path(nomic_home.snapshot)
    assert not (folder / MARKER).exists() and (folder / "model.safetensors").is_symlink()
    assert (folder.parents[1] / "refs" / "main").read_text() == folder.name
    assert (folder / "model.safetensors").stat().st_mode & 0o444 == 0o444  # readable by the image's other users
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    assert tokenizer["truncation"] is None and tokenizer["padding"] is None
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 8192


@pytest.mark.slow
def test_the_image_check_finds_it_in_a_hugging_face_cache_and_never_runs_nomics_remote_code(tmp_path):
    """As ``make image`` does: save into HF_HOME, then ``python -m pipeline model nomic``
    offline, with no --model-path. nomic's remote code sits beside it in the cache, as a
    download with trust_remote_code leaves it; run, it would fail the check. The cache
    records ONNX files the fetch left out; found the way ``snapshot_download`` finds a
    snapshot offline, it would be called incomplete."""
    home = tmp_path / "hf-home"
    env = luigi_env(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    save_stand_in(str(home), "nomic", layers=1, hf_home=True)  # the image build runs this through the CLI
    # As a fetch that left nomic's ONNX exports out leaves it: the hub's record of the
    # repository's listing names files the snapshot does not hold.
    repository = home / "hub" / "models--nomic-ai--nomic-embed-text-v1.5"
    commit = (repository / "refs" / "main").read_text()
    listed = {path.relative_to(repository / "snapshots" / commit).as_posix(): {"size": 1, "blob_id": "0" * 40}
              for path in (repository / "snapshots" / commit).rglob("*") if path.is_file()}
    listed["onnx/model.onnx"] = {"size": 522_000_000, "blob_id": "1" * 40}
    listed["onnx/config.json"] = {"size": 2_000, "blob_id": "2" * 40}
    (repository / "trees").mkdir()
    (repository / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listed}))
    remote = home / "hub" / "models--nomic-ai--nomic-bert-2048" / "snapshots" / ("0" * 40)
    remote.mkdir(parents=True)
    for name in ("modeling_hf_nomic_bert.py", "configuration_hf_nomic_bert.py"):
        (remote / name).write_text("raise RuntimeError('nomic remote code was executed')\n")
    (remote.parents[1] / "refs").mkdir()
    (remote.parents[1] / "refs" / "main").write_text("0" * 40)

    # Without the sentence-transformers files (a cache of the model alone), it loads with mean pooling.
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        (repository / "snapshots" / commit / name).unlink()
    checked = subprocess.run([sys.executable, "-m", "pipeline", "model", "nomic"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout.splitlines()[-1]) == {"profile": "nomic", "model_id": "nomic-ai/nomic-embed-text-v1.5",
                                                           "dimension": 768}
    assert "is a stand-in for nomic-ai/nomic-embed-text-v1.5" in checked.stderr
    assert "remote code was executed" not in checked.stderr and not (home / "modules").exists()
