"""The Luigi tasks run in-process: model reuse, failure isolation, safety checks, config."""

import subprocess
import sys

import luigi
import pyarrow.parquet as pq
import pytest

import pipeline.core.embedder
from helpers import ROOT, luigi_env, shard_failing
from pipeline import CorpusManifest, EmbedAll, planning, web_view
from pipeline.errors import PipelineError
from pipeline.planning import check_output_matches_settings


def build(task) -> bool:
    return luigi.build([task], local_scheduler=True, log_level="WARNING")


def embed_all(corpus, output, **overrides):
    return EmbedAll(corpus=str(corpus), output=str(output), docs_per_shard=overrides.pop("docs_per_shard", 4), device="cpu", **overrides)


def test_the_model_loads_once_per_worker_however_many_shards(tmp_path, small_corpus, monkeypatch):
    pipeline.core.embedder.load_embedder.cache_clear()
    loads = []
    real_init = pipeline.core.embedder.Embedder.__init__
    monkeypatch.setattr(pipeline.core.embedder.Embedder, "__init__", lambda self, *a: loads.append(a) or real_init(self, *a))
    assert build(embed_all(small_corpus, tmp_path / "out"))
    assert len(list((tmp_path / "out" / "shards").glob("shard-*.parquet"))) == 3
    assert len(loads) == 1


def test_a_failed_shard_does_not_sink_the_others_and_a_rerun_finishes(tmp_path, small_corpus):
    output = tmp_path / "out"
    with shard_failing(1):
        assert not build(embed_all(small_corpus, output))
    shards = output / "shards"
    assert sorted(p.name for p in shards.glob("shard-*.parquet")) == ["shard-000000.parquet", "shard-000002.parquet"]
    assert not (output / "_SUCCESS.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.parquet")}

    assert build(embed_all(small_corpus, output))
    assert (output / "_SUCCESS.json").exists()
    assert all((shards / name).stat().st_mtime_ns == mtime for name, mtime in before.items())
    assert pq.read_table(shards / "shard-000001.parquet").num_rows > 0


def test_an_output_made_with_other_settings_is_refused(tmp_path, small_corpus):
    output = tmp_path / "out"
    assert build(embed_all(small_corpus, output))
    with pytest.raises(PipelineError, match="docs_per_shard"):
        check_output_matches_settings(embed_all(small_corpus, output, docs_per_shard=5))
    other = tmp_path / "other-corpus"
    other.mkdir()
    with pytest.raises(PipelineError, match="corpus"):
        check_output_matches_settings(embed_all(other, output))
    with pytest.raises(PipelineError, match="max_tokens"):
        check_output_matches_settings(embed_all(small_corpus, output, max_tokens=128))
    assert check_output_matches_settings(embed_all(small_corpus, output)) == 3


def test_a_finished_output_rerun_with_other_settings_fails_instead_of_doing_nothing(tmp_path, small_corpus):
    output = tmp_path / "out"
    assert build(embed_all(small_corpus, output))
    assert embed_all(small_corpus, output).complete()
    assert not embed_all(small_corpus, output, docs_per_shard=5).complete()
    assert not build(embed_all(small_corpus, output, docs_per_shard=5))
    assert build(embed_all(small_corpus, output))  # the original settings are still done


def test_no_corpus_means_the_generated_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    manifest = CorpusManifest(corpus="", output=str(tmp_path / "out"))
    assert build(manifest)
    rows = pq.read_table(manifest.manifest_path()).to_pylist()
    assert len(rows) == 200 and rows[0]["path"].endswith(".md")
    assert (tmp_path / "cache" / "embedding-pipeline" / "sample-v1" / rows[0]["path"]).is_file()
    # The sample is byte-identical wherever it is generated.
    from pipeline.core.sample import write_sample

    write_sample(tmp_path / "again")
    assert (tmp_path / "again" / rows[7]["path"]).read_bytes() == (
        tmp_path / "cache" / "embedding-pipeline" / "sample-v1" / rows[7]["path"]
    ).read_bytes()


PRINT_SETTINGS = """
import sys
from luigi.cmdline_parser import CmdlineParser
import pipeline
with CmdlineParser.global_instance(sys.argv[1:]) as parser:
    task = parser.get_task_obj()
    print(task.output_location, task.docs_per_shard, task.model, task.device)
"""


def settings_seen(cwd, *args, **env):
    command = [sys.executable, "-c", PRINT_SETTINGS, "EmbedAll", *args]
    env = luigi_env(LUIGI_CONFIG_PATH=str(ROOT / "luigi.cfg"), PYTHONPATH=str(ROOT), **env)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout.split()


def test_an_output_has_one_spelling_however_it_is_typed(tmp_path, monkeypatch):
    """Pods, leases and the ledger match an output by its name: a relative and an absolute
    spelling of one folder were two outputs to a relaunch, ``pods sweep`` and ``cost``."""
    import pipeline.storage
    from pipeline import RunpodEmbedAll

    monkeypatch.chdir(tmp_path)
    spellings = [str(tmp_path) + "/out", "out", "./out/", "sub/../out", str(tmp_path) + "//out/"]
    assert {EmbedAll(output=spelling).output_location for spelling in spellings} == {str(tmp_path / "out")}
    assert len({EmbedAll(output=spelling).task_id for spelling in spellings}) == 1
    env = RunpodEmbedAll(output="out", corpus=str(tmp_path), image="img").pod_env()
    assert env["PIPELINE_OUTPUT"] == str(tmp_path / "out")
    assert pipeline.storage.canonical("s3://bucket//a/b/") == "s3://bucket/a/b"
    assert pipeline.storage.canonical("gs://bucket/") == "gs://bucket"
    assert EmbedAll(output=str(tmp_path) + "/").output_location == str(tmp_path)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # anonymous client, no call made
    pipeline.storage.forget_clients()
    try:
        task = EmbedAll(output="gs://bucket/out/", corpus="gs://bucket/corpus/")
        assert (task.output_location, task.corpus) == ("gs://bucket/out", "gs://bucket/corpus")
        assert task.output().path == "gs://bucket/out/_SUCCESS.json"
    finally:
        pipeline.storage.forget_clients()


def test_settings_come_from_luigi_cfg_then_env_then_command_line(tmp_path):
    """(The output, in its one spelling: an absolute path.)"""
    out = str(tmp_path.resolve())
    assert settings_seen(tmp_path) == [f"{out}/output", "1000", "minilm", "auto"]
    (tmp_path / ".env").write_text("PIPELINE_OUTPUT=from-dotenv\nPIPELINE_DEVICE=cpu\n")
    assert settings_seen(tmp_path) == [f"{out}/from-dotenv", "1000", "minilm", "cpu"]
    assert settings_seen(tmp_path, PIPELINE_OUTPUT="from-env", PIPELINE_DOCS_PER_SHARD="50") == [
        f"{out}/from-env", "50", "minilm", "cpu"]
    assert settings_seen(tmp_path, "--output", "cli", "--docs-per-shard", "7", PIPELINE_DOCS_PER_SHARD="50") == [
        f"{out}/cli",
        "7",
        "minilm",
        "cpu",
    ]


class _Probe(luigi.Task):
    """Posts through web_view while a real worker runs it."""

    seen: list = []

    def run(self):
        web_view.show(self, "half way", 50)
        self.seen.append(web_view.scheduler_of(self))

    def complete(self):
        return bool(self.seen)


def test_a_running_task_reaches_its_workers_scheduler_the_one_private_way():
    assert web_view.scheduler_of(_Probe()) is None  # outside a worker
    assert build(_Probe())
    scheduler = _Probe.seen[0]
    assert scheduler.get_task_status_message(_Probe().task_id)["statusMessage"] == "half way"
    assert scheduler.get_task_progress_percentage(_Probe().task_id)["progressPercentage"] == 50


def test_which_shards_are_done_comes_from_one_listing_not_a_request_per_shard(tmp_path, small_corpus, monkeypatch):
    """On a bucket each request is a round trip: a worker starting on an output of 10,000
    shards asked 10,000 times. Counted here on a local output of one shard per document."""
    from pipeline import storage
    from pipeline.output.layout import OutputLayout

    output = tmp_path / "out"
    assert build(embed_all(small_corpus, output, docs_per_shard=1))
    shards = sorted((output / "shards").glob("shard-*.parquet"))
    (output / "_SUCCESS.json").unlink()
    shards[3].unlink()
    before = {p.name: p.stat().st_mtime_ns for p in shards if p.exists()}
    calls = {"exists": 0, "listings": 0}
    real_exists, real_list = storage.exists, OutputLayout.list_shards
    monkeypatch.setattr(storage, "exists", lambda path: calls.__setitem__("exists", calls["exists"] + 1) or real_exists(path))
    monkeypatch.setattr(OutputLayout, "list_shards",
                        lambda self: calls.__setitem__("listings", calls["listings"] + 1) or real_list(self))
    planning.forget_plans()
    assert build(embed_all(small_corpus, output, docs_per_shard=1))
    assert shards[3].exists() and all((output / "shards" / name).stat().st_mtime_ns == mtime for name, mtime in before.items())
    assert calls["exists"] <= 8 < len(shards), calls  # the manifest, the summary, the one shard made: not one per shard
    assert calls["listings"] <= 4, calls
