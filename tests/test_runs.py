"""The luigi command line for real: subprocesses, SIGKILL and resume, error lines, luigid."""

import json
import sqlite3
import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import ROOT, api, embed_here, kill_while_writing, luigi_command, luigi_env, read_output_rows, run_luigi, running_luigid, write_corpus
from pipeline.core.shard_file import shard_stats

pytestmark = pytest.mark.slow


def embed_args(corpus, output, docs_per_shard=3, *extra):
    return ["EmbedAll", "--corpus", str(corpus), "--output", str(output), "--docs-per-shard", str(docs_per_shard), "--device", "cpu", *extra]


def shard_files(output):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (output / "shards").glob("shard-*.parquet")}


def test_a_failed_run_exits_nonzero_even_outside_the_repository(tmp_path):
    result = run_luigi(*embed_args(tmp_path / "missing", tmp_path / "out"), "--local-scheduler", cwd=tmp_path, PYTHONPATH=str(ROOT))
    assert result.returncode == 30, result.stderr[-2000:]
    assert f"ERROR: corpus path {tmp_path / 'missing'} does not exist" in result.stderr


def test_a_changed_vector_setting_on_a_finished_output_is_refused_not_called_complete(tmp_path):
    """A finished output says it is done only for the settings it was made with; the
    command then refuses the change in one line."""
    from pipeline import EmbedAll

    corpus, output = write_corpus(tmp_path / "corpus", documents=4, words=80), tmp_path / "out"
    embed_here(corpus, output, docs_per_shard=2)
    same = dict(corpus=str(corpus), output=str(output), docs_per_shard=2, device="cpu")
    assert EmbedAll(**same).complete()
    for change in ({"vector_dtype": "float16"}, {"compact_columns": "binary"}, {"compact_columns": "int8"},
                   {"model_path": str(tmp_path / "other-weights")}):
        assert not EmbedAll(**same, **change).complete(), change
    before = shard_files(output)
    rerun = run_luigi(*embed_args(corpus, output, 2, "--vector-dtype", "float16"), "--local-scheduler")
    assert rerun.returncode == 30, rerun.stderr[-3000:]
    assert "vector_dtype: 'float32' in the output, 'float16' now" in rerun.stderr and "use a new --output" in rerun.stderr
    assert shard_files(output) == before


def stop_mid_shard(process, shards, published_before_kill=2, timeout=300):
    """SIGKILL the run while a shard's temp file is open: freeze it with SIGSTOP,
    check that a shard is in progress, and only then kill it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run finished before it could be killed"
        if shards.is_dir() and len(list(shards.glob("shard-*.parquet"))) >= published_before_kill:
            temps = kill_while_writing(process, shards)
            if temps:
                return temps
        time.sleep(0.005)
    raise AssertionError("never caught the run in the middle of a shard")


def test_sigkill_in_the_middle_of_a_shard_then_rerun_resumes_and_matches(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=16, words=500)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    embed_here(corpus, reference, docs_per_shard=2)

    command = luigi_command(*embed_args(corpus, resumed, 2), "--local-scheduler")
    process = subprocess.Popen(command, cwd=ROOT, env=luigi_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        temps = stop_mid_shard(process, resumed / "shards")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert all(t.exists() for t in temps), "killed between shards, not in one"
    published = shard_files(resumed)
    assert 2 <= len(published) < 8
    for name in published:  # no partial shard: every published file is whole
        path = resumed / "shards" / name
        assert pq.read_table(path).num_rows == shard_stats(str(path))["chunks"]
    assert not (resumed / "_SUCCESS.json").exists()

    rerun = run_luigi(*embed_args(corpus, resumed, 2), "--local-scheduler")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = shard_files(resumed)
    assert len(after) == 8
    assert all(after[name] == published[name] for name in published), "a finished shard was recomputed"
    assert not list((resumed / "shards").glob(".*.tmp")), "a temp file was left behind"

    expected, actual = read_output_rows(reference), read_output_rows(resumed)
    assert actual.keys() == expected.keys()
    for key, row in expected.items():
        assert actual[key]["text"] == row["text"]
        assert actual[key]["metadata"] == row["metadata"]
        assert np.allclose(actual[key]["embedding_vector"], row["embedding_vector"], atol=1e-5)
    a, b = (json.loads((o / "_SUCCESS.json").read_text()) for o in (reference, resumed))
    assert {k: a[k] for k in ("documents", "chunks", "tokens")} == {k: b[k] for k in ("documents", "chunks", "tokens")}


@pytest.mark.parametrize(
    "case, expected, exit_code",
    [
        ("missing", "corpus path {corpus} does not exist", 30),
        ("empty", "corpus {corpus} has no files matching '*.md'", 30),
        ("unwritable", "cannot write to output {output}: Not a directory", 30),
        ("gs-without-credentials", "no Google Cloud credentials for gs:// paths: set GOOGLE_APPLICATION_CREDENTIALS", 40),
        ("s3-without-credentials", "no AWS credentials for s3:// paths: set AWS_ACCESS_KEY_ID", 40),
        ("unknown-scheme", "{output}: unsupported location; use a local folder, gs://bucket/prefix or s3://bucket/prefix", 40),
    ],
)
def test_bad_corpus_or_output_gives_one_clear_line_and_nonzero_exit(tmp_path, case, expected, exit_code):
    corpus, output = tmp_path / "corpus", tmp_path / "out"
    if case == "empty":
        corpus.mkdir()
    if case != "missing" and case != "empty":
        write_corpus(corpus, documents=1)
    if case == "unwritable":
        (tmp_path / "a-file").write_text("not a folder")
        output = tmp_path / "a-file" / "out"
    output = {"gs-without-credentials": "gs://some-bucket/out", "s3-without-credentials": "s3://some-bucket/out", "unknown-scheme": "ftp://host/out"}.get(case, output)
    result = run_luigi(*embed_args(corpus, output), "--local-scheduler", HOME=str(tmp_path))  # no ~/.aws, no gcloud
    assert result.returncode == exit_code  # luigi.cfg [retcode]: task_failed 30, unhandled_exception 40
    lines = [line.strip() for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 1 and lines[0].startswith("ERROR: " + expected.format(corpus=corpus, output=output)), lines
    assert "Traceback" not in result.stderr


@pytest.fixture
def luigid(tmp_path):
    with running_luigid(tmp_path / "luigid") as port:
        yield port, tmp_path / "luigid"


def test_embed_all_against_a_real_luigid_reports_status_and_history_and_a_rerun_recomputes_nothing(tmp_path, small_corpus, luigid):
    port, folder = luigid
    output = tmp_path / "out"
    result = run_luigi(*embed_args(small_corpus, output), "--scheduler-host", "127.0.0.1", "--scheduler-port", str(port))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output / "_SUCCESS.json").exists()
    done = api(port, "task_list", status="DONE", upstream_status="", search="")
    by_family = {}
    for task in done.values():
        by_family.setdefault(task["name"], []).append(task)
    assert sorted(by_family) == ["CorpusManifest", "EmbedAll", "EmbedShard"]
    shards = by_family["EmbedShard"]
    assert len(shards) == 4
    for task in shards:
        assert task["progress_percentage"] == 100
        assert "documents embedded" in task["status_message"] and "tokens/s" in task["status_message"]
    assert "4/4 shards" in by_family["EmbedAll"][0]["status_message"]
    with sqlite3.connect(folder / "history.db") as db:
        recorded = {name for (name,) in db.execute("select name from tasks")}
    assert {"CorpusManifest", "EmbedShard", "EmbedAll"} <= recorded
    assert_rerun_recomputes_nothing(small_corpus, output)


def assert_rerun_recomputes_nothing(corpus, output):
    """The finished run's summary, then the same command again (with a local scheduler
    this time): it finds everything complete and touches no shard. Part of the luigid
    test, whose run it reruns, to spare a run that loads the model."""
    summary = json.loads((output / "_SUCCESS.json").read_text())
    assert summary["documents"] == 12 and summary["shards"] == 4 and summary["rejected_documents"] == 0
    assert summary["dimension"] == 384 and summary["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert summary["chunks"] == sum(pq.read_table(p).num_rows for p in (output / "shards").glob("*.parquet"))
    assert summary["tokens"] > 0 and summary["tokens_per_second"] > 0 and summary["wall_seconds"] > 0
    before = shard_files(output)
    assert len(before) == 4

    again = run_luigi(*embed_args(corpus, output), "--local-scheduler")
    assert again.returncode == 0
    assert "1 complete ones were encountered" in again.stderr
    assert "ran successfully" not in again.stderr
    assert shard_files(output) == before
