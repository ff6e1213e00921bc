"""Fault injection: a worker killed with SIGKILL again and again, at random moments, in
the middle of shards (embedding or writing Parquet) and in the middle of uploads, rerun each time; the output it ends with passes ``verify``
and equals an uninterrupted run's.

``make test`` runs a quick form (CHAOS_KILLS=2); ``make chaos`` a longer one
(CHAOS_KILLS=25). CHAOS_SEED repeats a sequence of kill moments; the seed used is
printed when a test fails.
"""

import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import EDITS, ROOT, assert_same_output, bucket_rows, luigi_command, luigi_env, run_luigi, write_corpus
from pipeline.core.shard_file import shard_stats
from pipeline.output.verify import verify_output
from storage_servers import FaultProxy

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("CHAOS_KILLS", "2"))
SEED = int(os.environ.get("CHAOS_SEED", str(random.randrange(1 << 30))))


def embed_args(corpus, output):
    return ["EmbedAll", "--local-scheduler", "--corpus", str(corpus), "--output", str(output),
            "--docs-per-shard", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The corpus, an uninterrupted run's output, and how long that run took."""
    folder = tmp_path_factory.mktemp("chaos")
    corpus = write_corpus(folder / "corpus", documents=14, words=300)
    (corpus / "bad").mkdir()
    (corpus / "bad" / "empty.md").write_bytes(b"")
    output = folder / "reference"
    clock = time.monotonic()
    result = run_luigi(*embed_args(corpus, output))
    assert result.returncode == 0, result.stderr[-3000:]
    return corpus, output, time.monotonic() - clock


def unpublished_temps(shards: Path) -> list[Path]:
    return [t for t in shards.glob(".shard-*.parquet.*.tmp")
            if not (shards / t.name[1:].split(".parquet.")[0]).with_suffix(".parquet").exists()]


def moment(shards: Path, log: Path) -> str:
    """Where a frozen worker stands, from what it left on disk."""
    temps = unpublished_temps(shards)
    if temps:
        return "mid-shard, rows written" if max(t.stat().st_size for t in temps) > 4 else "mid-shard, embedding"
    if "loading model" not in log.read_text(errors="replace"):
        return "starting (imports, manifest)"
    return "model loading or between shards"


def wait_for_moment(process, shards: Path, rng: random.Random, seconds: float) -> None:
    """Half the rounds, any moment of the run; the others, a moment inside a shard
    (most of a short run is its start, which would take most random kills)."""
    if rng.random() < 0.5:
        deadline = time.monotonic() + rng.uniform(0.2, 0.8 * seconds)
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return
    while process.poll() is None and not unpublished_temps(shards):
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.5))


def assert_only_whole_shards(output: Path) -> None:
    """After any kill: every published shard is complete, and no summary before the end."""
    shards = sorted((output / "shards").glob("shard-*.parquet")) if (output / "shards").exists() else []
    for shard in shards:
        assert pq.read_table(shard).num_rows == shard_stats(str(shard))["chunks"], f"{shard.name} is partial"
    if len(shards) < 8:
        assert not (output / "_SUCCESS.json").exists()


@pytest.mark.xdist_group("chaos")  # with the uploads scenario: one worker makes the reference once
def test_sigkill_at_random_moments_then_rerun_ends_whole_and_equal(reference, tmp_path):
    corpus, expected, seconds = reference
    rng, hits = random.Random(SEED), Counter()
    output, log = tmp_path / "out", tmp_path / "worker.log"
    for _ in range(KILLS):
        with open(log, "w") as stderr:
            process = subprocess.Popen(luigi_command(*embed_args(corpus, output)), cwd=ROOT, env=luigi_env(),
                                       stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_for_moment(process, output / "shards", rng, seconds)
            if process.poll() is not None:
                hits["finished before the kill"] += 1
                break
            process.send_signal(signal.SIGSTOP)  # frozen, so the look and the kill see one moment
            hits[moment(output / "shards", log)] += 1
            process.send_signal(signal.SIGKILL)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
        assert_only_whole_shards(output)
    print(f"CHAOS_SEED={SEED}: {dict(hits)}")
    final = run_luigi(*embed_args(corpus, output))
    assert final.returncode == 0, f"CHAOS_SEED={SEED}: {final.stderr[-3000:]}"
    verdict = verify_output(str(output))
    assert verdict.ok, (SEED, verdict.problems)
    assert not list((output / "shards").glob(".*.tmp")), "a temp file was left behind"
    assert_same_output(expected, output)
    if KILLS >= 10:  # the long form must have hit the worker in the middle of shards
        assert hits["mid-shard, embedding"] + hits["mid-shard, rows written"] >= 2, hits


@pytest.mark.xdist_group("chaos")
def test_sigkill_in_the_middle_of_uploads_then_rerun_ends_whole_and_equal(reference, gcs_bucket, tmp_path, fast_retries):
    """The worker is killed while the GCS server has half of one of its uploads (the
    manifest's, a shard's or a rejects file's), each round a later one."""
    corpus, expected, _ = reference
    bucket, rng = gcs_bucket, random.Random(SEED)
    bucket.upload_folder(corpus, "corpus")
    args = embed_args(f"{bucket.url}/corpus", f"{bucket.url}/out")
    uploads = sorted(rng.sample(range(1, 12), min(KILLS, 11)))
    killed = []
    for target in uploads:
        seen = []
        proxy = FaultProxy(bucket.server.port, plan=lambda method, path, number: (
            "hold" if path.startswith("/upload/") and (seen.append(path) or len(seen)) == target else None))
        try:
            env = luigi_env(**{**bucket.env, **fast_retries, "STORAGE_EMULATOR_HOST": proxy.url})
            process = subprocess.Popen(luigi_command(*args), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            try:
                while not proxy.holding.wait(0.05) and process.poll() is None:
                    pass
                if proxy.holding.is_set():
                    process.kill()
                    killed.append(target)
            finally:
                if process.poll() is None:
                    process.kill()
                process.wait()
                proxy.release.set()
        finally:
            proxy.stop()
        partial = [k for k in bucket.keys("out") if "/." in k or k.endswith(".tmp")]
        assert not partial, f"temp objects in the bucket: {partial}"
        if not proxy.holding.is_set():
            break  # fewer uploads were left than the target: the run finished
    assert killed, f"CHAOS_SEED={SEED}: no upload was cut off"
    final = run_luigi(*args, **bucket.env, **fast_retries)
    assert final.returncode == 0, f"CHAOS_SEED={SEED}: {final.stderr[-3000:]}"
    assert verify_output(f"{bucket.url}/out").ok
    assert_same_output(expected, bucket_rows(bucket, "out", tmp_path))


class SyncTarget:
    """Where the synced output lives: a local folder, or a prefix in a GCS bucket on
    loopback (read back through ``pipeline.storage``, downloaded to compare)."""

    def __init__(self, base: Path, tmp_path: Path, bucket=None):
        self.bucket, self.tmp_path = bucket, tmp_path
        if bucket is None:
            self.url = str(tmp_path / "out")
            shutil.copytree(base, self.url)
        else:
            bucket.upload_folder(base, "out")
            self.url = f"{bucket.url}/out"
        self.env = luigi_env(**(bucket.env if bucket else {}))

    def moment(self) -> str:
        """Where a frozen ``--sync`` stands, from what it left."""
        from pipeline import storage
        from pipeline.core.corpus import manifest_info

        if not storage.exists(f"{self.url}/changes/generation-000001.parquet"):
            return "listing and comparing (no change log yet)"
        if "generation" not in manifest_info(f"{self.url}/manifest.parquet"):
            return "change log published, manifest not yet"
        return "synced, embedding the changes"

    def change_log_published(self) -> bool:
        from pipeline import storage

        return bool(list(storage.list_files(f"{self.url}/changes", "*", hashes=False)))

    def local(self) -> Path:
        return Path(self.url) if self.bucket is None else bucket_rows(self.bucket, "out", self.tmp_path)


@pytest.fixture(scope="module")
def sync_reference(tmp_path_factory):
    """An output, the corpus edited after it, the same output after an uninterrupted
    ``--sync``, and how long that sync took: made once for both targets."""
    folder = tmp_path_factory.mktemp("chaos-sync")
    corpus = write_corpus(folder / "corpus", documents=10, words=120)
    base = folder / "base"
    result = run_luigi(*embed_args(corpus, base))
    assert result.returncode == 0, result.stderr[-3000:]
    uninterrupted = folder / "uninterrupted"
    shutil.copytree(base, uninterrupted)
    EDITS[0](corpus)
    clock = time.monotonic()
    result = run_luigi(*embed_args(corpus, uninterrupted), "--sync")
    assert result.returncode == 0, result.stderr[-3000:]
    return corpus, base, uninterrupted, time.monotonic() - clock


@pytest.mark.xdist_group("chaos-sync")  # one worker, so the reference is made once
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_sigkill_during_a_sync_then_rerun_ends_as_an_uninterrupted_sync(where, sync_reference, tmp_path, request):
    """``--sync`` killed at random moments, half of them the moment its change log is
    visible (between the log and the manifest, the commit point's window), then rerun:
    the output verifies and equals an uninterrupted sync's, manifest and change log too,
    in a local folder and in a bucket alike."""
    corpus, base, uninterrupted, seconds = sync_reference
    target = SyncTarget(base, tmp_path, request.getfixturevalue("gcs_bucket") if where == "gcs" else None)

    rng, hits = random.Random(SEED), Counter()
    for _ in range(KILLS):
        process = subprocess.Popen(luigi_command(*embed_args(corpus, target.url), "--sync"), cwd=ROOT, env=target.env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if rng.random() < 0.5:
                while process.poll() is None and not target.change_log_published():
                    time.sleep(0.002 if where == "local" else 0.02)
            else:
                deadline = time.monotonic() + rng.uniform(0.2, 0.9 * seconds)
                while process.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
            if process.poll() is not None:
                hits["finished before the kill"] += 1
                break
            process.send_signal(signal.SIGSTOP)
            hits[target.moment()] += 1
            process.send_signal(signal.SIGKILL)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    print(f"CHAOS_SEED={SEED}: {dict(hits)}")
    final = run_luigi(*embed_args(corpus, target.url), "--sync", **(target.bucket.env if target.bucket else {}))
    assert final.returncode == 0, f"CHAOS_SEED={SEED}: {final.stderr[-3000:]}"
    verdict = verify_output(target.url)
    assert verdict.ok, (SEED, verdict.problems)
    output = target.local()
    names = sorted(path.name for path in (uninterrupted / "shards").glob("shard-*.parquet"))
    assert names == sorted(path.name for path in (output / "shards").glob("shard-*.parquet"))
    for name in names:  # stored rows, shard by shard: a changed document's rows are in two shards
        a, b = (pq.read_table(folder / "shards" / name) for folder in (uninterrupted, output))
        assert a.select(["doc_id", "chunk_id", "text", "metadata"]).equals(b.select(["doc_id", "chunk_id", "text", "metadata"]))
        assert np.allclose(np.stack(a["embedding_vector"].to_numpy(zero_copy_only=False)),
                           np.stack(b["embedding_vector"].to_numpy(zero_copy_only=False)), atol=1e-5), name
    for name in ("manifest.parquet", "changes/generation-000001.parquet"):
        tables = [pq.read_table(folder / name) for folder in (uninterrupted, output)]
        assert tables[0].drop_columns(["time"] if "time" in tables[0].column_names else []).equals(
            tables[1].drop_columns(["time"] if "time" in tables[1].column_names else [])), name
