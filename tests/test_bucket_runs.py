"""EmbedAll with corpus and output in buckets on loopback servers, through the luigi
command line: killed and resumed, under injected faults, and equal to a local run."""

import json
import os
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from helpers import ROOT, assert_same_output, bucket_rows, embed_here, luigi_command, luigi_env, run_luigi, write_corpus
from storage_servers import FaultProxy

pytestmark = pytest.mark.slow


def embed_args(corpus, output, docs_per_shard=2):
    return ["EmbedAll", "--local-scheduler", "--corpus", str(corpus), "--output", str(output),
            "--docs-per-shard", str(docs_per_shard), "--device", "cpu"]


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The corpus, and the output of an uninterrupted local run of it."""
    folder = tmp_path_factory.mktemp("reference")
    corpus = write_corpus(folder / "corpus", documents=12, words=400)
    (corpus / "bad").mkdir()
    (corpus / "bad" / "binary.md").write_bytes(b"\x00\x01\x02" * 100)
    output = folder / "output"
    embed_here(corpus, output, docs_per_shard=2)
    return corpus, output


def test_gcs_run_killed_mid_shard_then_resumed_equals_the_local_run(gcs_bucket, local_reference, tmp_path, fast_retries):
    bucket = gcs_bucket
    corpus, reference = local_reference
    bucket.upload_folder(corpus, "corpus")
    staging = tmp_path / "tmp"
    staging.mkdir()
    env = luigi_env(**bucket.env, **fast_retries, TMPDIR=str(staging))
    args = embed_args(f"{bucket.url}/corpus", f"{bucket.url}/out")
    process = subprocess.Popen(luigi_command(*args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while True:
            assert process.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline, "never caught the run in the middle of a shard"
            if len([k for k in bucket.keys("out/shards") if k.endswith(".parquet")]) >= 2:
                os.kill(process.pid, signal.SIGSTOP)
                if list((staging / "embedding-pipeline-staging").glob(".shard-*.tmp")):
                    os.kill(process.pid, signal.SIGKILL)
                    break
                os.kill(process.pid, signal.SIGCONT)
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    published = {k: bucket.get(k) for k in bucket.keys("out/shards")}
    assert 2 <= len(published) < 7 and all(k.endswith(".parquet") for k in published)
    assert "out/_SUCCESS.json" not in bucket.keys("out")

    rerun = subprocess.run(luigi_command(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for key, data in published.items():
        assert bucket.get(key) == data, f"{key} was rewritten"
    assert_same_output(reference, bucket_rows(bucket, "out", tmp_path))


def test_s3_run_equals_the_local_run(s3_bucket, local_reference, tmp_path, fast_retries):
    bucket = s3_bucket
    corpus, reference = local_reference
    bucket.upload_folder(corpus, "corpus")
    result = run_luigi(*embed_args(f"{bucket.url}/corpus", f"{bucket.url}/out"), **bucket.env, **fast_retries)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_output(reference, bucket_rows(bucket, "out", tmp_path))


def test_a_run_through_injected_faults_retries_and_loses_nothing(bucket, local_reference, tmp_path, fast_retries):
    """Every seventh request fails (503, 429, 500, reset or reset mid-upload) or is
    answered a second late, and the run
    still finishes with every shard whole and equal to the local run."""
    corpus, reference = local_reference
    bucket.upload_folder(corpus, "corpus")
    faults = ["503", "429", "reset", "reset-mid-body", "500", "slow"]
    proxy = FaultProxy(bucket.server.port, plan=lambda method, path, number: faults[number // 7 % len(faults)] if number % 7 == 0 else None)
    try:
        env = dict(bucket.env, **({"STORAGE_EMULATOR_HOST": proxy.url} if bucket.kind == "gcs" else {"AWS_ENDPOINT_URL": proxy.url}))
        result = run_luigi(*embed_args(f"{bucket.url}/corpus", f"{bucket.url}/out"), **env, **fast_retries)
    finally:
        proxy.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    assert len([f for f in proxy.faults() if f[2] != "slow"]) >= 10 and any(f[2] == "slow" for f in proxy.faults())
    assert result.stderr.count("; retry ") >= 10, "the retries were not logged"
    output = bucket_rows(bucket, "out", tmp_path)
    for shard in (output / "shards").glob("*.parquet"):
        assert pq.read_table(shard).num_rows == json.loads(pq.ParquetFile(shard).metadata.metadata[b"pipeline.stats"])["chunks"]
    assert_same_output(reference, output)
