"""Several Luigi workers on one real luigid share a run: each shard embedded once, every
worker busy, and a worker SIGKILLed mid-shard has its shard finished by another."""

import json
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from helpers import EDITS, ROOT, api, embed_here, kill_while_writing, luigi_command, luigi_env, read_output_rows, running_luigid, write_corpus
from pipeline.core.shard_file import shard_stats
from pipeline.output.status import run_status
from pipeline.output.verify import verify_output
from pipeline.runpod.watchdog import SHARED_RUN_FLAGS

pytestmark = pytest.mark.slow

WORKERS = 3
# The flags `make worker` adds, read from the Makefile so that the test runs what users run.
WORKER_FLAGS = next(line for line in (ROOT / "Makefile").read_text().splitlines()
                    if line.startswith("WORKER_FLAGS =")).split("=", 1)[1].split()


def test_make_worker_and_the_pods_run_shared_workers_alike():
    assert tuple(WORKER_FLAGS) == SHARED_RUN_FLAGS
SHARDS = 32


def running_shards(port):
    """{worker id: shard} for the shards luigid has handed out and not yet seen finish."""
    tasks = api(port, "task_list", status="RUNNING", upstream_status="", search="EmbedShard")
    return {task["worker_running"]: int(task["params"]["shard"]) for task in tasks.values() if task["name"] == "EmbedShard"}


def publishers(output):
    """The pids of the worker processes that made the shards published so far."""
    folder = output / "shards"
    paths = folder.glob("shard-*.parquet") if folder.is_dir() else []
    return {int(shard_stats(str(path))["worker"].split(" pid ")[1]) for path in paths}


def test_three_workers_share_the_shards_and_finish_a_killed_workers_shard(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=2 * SHARDS, words=600)
    output = tmp_path / "out"
    # luigid notices a silent worker when the others next ask for work (prune_on_get_work)
    # once worker_disconnect_delay has passed, fails its shard, and offers it again after
    # retry_delay.
    history = tmp_path / "luigid" / "history.db"
    with running_luigid(tmp_path / "luigid", worker_disconnect_delay=2, retry_delay=1) as port:
        workers = {
            f"worker-{n}": subprocess.Popen(
                luigi_command("EmbedAll", "--corpus", str(corpus), "--output", str(output), "--docs-per-shard", "2",
                              "--device", "cpu", "--scheduler-host", "127.0.0.1", "--scheduler-port", str(port),
                              "--worker-id", f"worker-{n}", *WORKER_FLAGS),
                cwd=ROOT, env=luigi_env(HOME=str(tmp_path)),
                stdout=subprocess.DEVNULL, stderr=(tmp_path / f"worker-{n}.log").open("w"))
            for n in range(WORKERS)
        }
        try:
            deadline = time.monotonic() + 480  # three model loads and shards on a busy 2-core machine
            while True:  # kill a worker that has published a shard, in the middle of its next one
                assert time.monotonic() < deadline, "no worker was ever seen running a shard after publishing one"
                done_by = publishers(output)
                running = {name: shard for name, shard in running_shards(port).items() if workers[name].pid in done_by}
                if running:
                    victim, killed_shard = next(iter(running.items()))
                    if kill_while_writing(workers[victim], output / "shards", f"{killed_shard:06d}"):
                        break
                time.sleep(0.05)
            # `pipeline status` reads the task history: the killed worker's shard was last seen running.
            assert killed_shard in run_status(str(output), history)["running"]
            survivors = {name: process for name, process in workers.items() if name != victim}
            for name, process in survivors.items():
                process.wait(timeout=600)
                assert process.returncode == 0, f"{name}: {(tmp_path / f'{name}.log').read_text()[-3000:]}"
        finally:
            for process in workers.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()

    summary = json.loads((output / "_SUCCESS.json").read_text())
    shards = sorted((output / "shards").glob("*"))
    assert [p.name for p in shards] == [f"shard-{i:06d}.parquet" for i in range(SHARDS)]  # nothing partial or extra
    rows = read_output_rows(output)  # fails on a duplicate (doc_id, chunk_id)
    manifest = pq.read_table(output / "manifest.parquet").to_pylist()
    assert {doc_id for doc_id, _ in rows} == {row["doc_id"] for row in manifest}
    assert summary["documents"] == 2 * SHARDS and summary["chunks"] == len(rows)
    # Every worker did its share; the killed worker's shard was made by another one.
    assert publishers(output) == {process.pid for process in workers.values()}
    killed_shard_by = shard_stats(str(output / "shards" / f"shard-{killed_shard:06d}.parquet"))["worker"]
    assert int(killed_shard_by.split(" pid ")[1]) in {process.pid for process in survivors.values()}
    status = run_status(str(output), history)
    assert (status["done"], status["running"], status["failed"], status["finished"]) == (SHARDS, [], [], True)
    assert status["documents_done"] == 2 * SHARDS and len(status["workers"]) == WORKERS


def test_a_failing_shard_is_reported_failed_and_the_others_are_done(tmp_path):
    """A shard whose rejects file cannot be written (a folder is in its place) fails;
    the others are published, and `pipeline status` names the failed one from luigid's
    task history."""
    corpus = write_corpus(tmp_path / "corpus", documents=8, words=200)
    output = tmp_path / "out"
    (output / "rejects" / "shard-000001.jsonl").mkdir(parents=True)
    with running_luigid(tmp_path / "luigid") as port:
        result = subprocess.run(
            luigi_command("EmbedAll", "--corpus", str(corpus), "--output", str(output), "--docs-per-shard", "2",
                          "--device", "cpu", "--scheduler-host", "127.0.0.1", "--scheduler-port", str(port)),
            cwd=ROOT, env=luigi_env(HOME=str(tmp_path)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 30, result.stderr[-3000:]
    status = run_status(str(output), tmp_path / "luigid" / "history.db")
    assert (status["done"], status["shards"], status["failed"], status["running"], status["finished"]) == (3, 4, [1], [], False)
    shown = subprocess.run([sys.executable, "-m", "pipeline", "status", str(output), "--history", str(tmp_path / "luigid" / "history.db")],
                           cwd=ROOT, env=luigi_env(HOME=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "3/4 shards done" in shown.stdout and "failed: 1 (1)" in shown.stdout and "ETA" in shown.stdout


def test_two_workers_syncing_at_once_make_one_generation_and_embed_each_change_once(tmp_path):
    """Two workers started together with --sync on one luigid: both plan a sync, one
    change log stands (the other worker applies it), and each new shard runs once."""
    corpus = write_corpus(tmp_path / "corpus", documents=10, words=120)
    output = tmp_path / "out"
    args = ["EmbedAll", "--corpus", str(corpus), "--output", str(output), "--docs-per-shard", "2", "--device", "cpu"]
    embed_here(corpus, output, docs_per_shard=2)
    before = {path.name for path in (output / "shards").glob("shard-*.parquet")}
    EDITS[0](corpus)  # 1 added, 3 changed, 1 moved, 1 deleted: 4 documents to embed, 2 shards
    logs = [tmp_path / f"sync-{n}.log" for n in range(2)]
    with running_luigid(tmp_path / "luigid") as port:
        workers = [subprocess.Popen(luigi_command(*args, "--sync", "--scheduler-host", "127.0.0.1", "--scheduler-port",
                                                  str(port), "--worker-id", f"sync-{n}", *WORKER_FLAGS),
                                    cwd=ROOT, env=luigi_env(HOME=str(tmp_path)), stdout=subprocess.DEVNULL,
                                    stderr=logs[n].open("w")) for n in range(2)]
        try:
            for n, process in enumerate(workers):
                assert process.wait(timeout=600) == 0, logs[n].read_text()[-3000:]
        finally:
            for process in workers:
                if process.poll() is None:
                    process.kill()
    assert sorted(path.name for path in (output / "changes").iterdir()) == ["generation-000001.parquet"]
    assert pq.read_metadata(output / "manifest.parquet").metadata[b"pipeline.generation"] == b"1"
    new = sorted({path.name for path in (output / "shards").glob("shard-*.parquet")} - before)
    assert len(new) == 2 and sum(shard_stats(str(output / "shards" / name))["documents"] for name in new) == 4
    runs = [line for log in logs for line in log.read_text().splitlines() if "running   EmbedShard(" in line]
    assert sorted(line.rsplit("shard=", 1)[1].rstrip(")") for line in runs) == [
        str(int(name[len("shard-"):-len(".parquet")])) for name in new], runs
    assert verify_output(str(output)).ok
