"""Test corpora and process helpers shared by the test modules."""

from __future__ import annotations

import configparser
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from pipeline.core.sample import _paragraph

ROOT = Path(__file__).resolve().parent.parent
SHARED_CORPUS = ROOT.parent / "shared" / "corpus"


def write_corpus(folder: Path, documents: int = 12, words: int = 250, seed: int = 7) -> Path:
    """Small markdown documents with front matter, headings and several paragraphs."""
    rng = random.Random(seed)
    for i in range(documents):
        path = folder / f"part-{i % 3}" / f"doc-{i:03d}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        paragraphs = [_paragraph(rng, words // 4) for _ in range(4)]
        path.write_text(
            f"---\ntitle: Document {i}\nauthor: Tester {i % 4}\ndate: 1900-01-0{1 + i % 9}\n---\n\n"
            f"# Document {i}\n\n{paragraphs[0]}\n\n## Part one\n\n{paragraphs[1]}\n\n{paragraphs[2]}\n\n"
            f"## Part two\n\n{paragraphs[3]}\n",
            encoding="utf-8",
        )
    return folder


def finished_output(root: Path, embedder, docs_per_shard: int = 4) -> Path:
    """A whole output made without Luigi: 12 documents (two of them rejected) in shards
    of ``docs_per_shard``, and its _SUCCESS.json."""
    from pipeline.core.corpus import write_manifest
    from pipeline.core.shard_job import ShardJob, run_shard
    from pipeline.output.summary import run_summary

    corpus = write_corpus(root / "corpus", documents=10, words=120)
    (corpus / "part-0" / "empty.md").write_bytes(b"")
    (corpus / "part-1" / "binary.md").write_bytes(b"\x00\x01" * 100)
    output = root / "out"
    manifest = str(output / "manifest.parquet")
    shards = -(-write_manifest(str(corpus), "*.md", docs_per_shard, manifest) // docs_per_shard)
    for shard in range(shards):
        run_shard(ShardJob(str(corpus), manifest, str(output), shards), shard, embedder)
    (output / "_SUCCESS.json").write_text(json.dumps(run_summary(str(output), shards, {})))
    return output



@contextmanager
def shard_failing(number: int) -> Iterator[None]:
    """Inside, shard ``number`` fails as its work starts (the luigi task's ``run_shard``
    raises) and the other shards run as usual."""
    import pipeline.tasks

    real_run_shard = pipeline.tasks.run_shard

    def run_shard(job, shard, *args, **kwargs):
        if shard == number:
            raise RuntimeError(f"injected failure in shard {number}")
        return real_run_shard(job, shard, *args, **kwargs)

    pipeline.tasks.run_shard = run_shard
    try:
        yield
    finally:
        pipeline.tasks.run_shard = real_run_shard

# Cloud SDKs look for credentials on metadata servers (169.254.169.254) when none are
# configured; tests only ever talk to 127.0.0.1, so those probes are switched off.
NO_METADATA_PROBES = {"NO_GCE_CHECK": "true", "AWS_EC2_METADATA_DISABLED": "true"}
CLOUD_CREDENTIAL_VARIABLES = (
    "GOOGLE_APPLICATION_CREDENTIALS",
    "STORAGE_EMULATOR_HOST",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
)


def luigi_env(**extra: str) -> dict[str, str]:
    """The environment for a luigi subprocess: no PIPELINE_* or cloud credentials leaking
    in from outside, no metadata-server probes, the session's cache folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_") and k not in CLOUD_CREDENTIAL_VARIABLES}
    env.update(NO_METADATA_PROBES)
    if os.environ.get("PIPELINE_TEST_SESSION_TMP") and "XDG_CACHE_HOME" not in env:
        # One cache for the session's subprocesses, whatever HOME a test gives them: the
        # sample corpus is generated, and --precision auto measures this CPU, once.
        env["XDG_CACHE_HOME"] = os.path.join(os.environ["PIPELINE_TEST_SESSION_TMP"], "cache")
    env.update(extra)
    return env


def luigi_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "luigi", "--module", "pipeline", *args]


def run_luigi(*args: str, cwd: Path = ROOT, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        luigi_command(*args), cwd=cwd, env=luigi_env(**env), capture_output=True, text=True, timeout=timeout
    )


def embed_here(corpus, output, docs_per_shard: int, **settings) -> None:
    """EmbedAll in this process, for a reference output that a test compares with or
    builds on: the command line's tasks, without a process that imports torch again
    (about 10 CPU-seconds each)."""
    import luigi

    from pipeline import EmbedAll

    task = EmbedAll(corpus=str(corpus), output=str(output), docs_per_shard=docs_per_shard, device="cpu", **settings)
    assert luigi.build([task], local_scheduler=True, log_level="WARNING"), f"the reference run of {corpus} failed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def read_output_rows(output: Path) -> dict[tuple[str, int], dict]:
    """Every row of every shard keyed by (doc_id, chunk_id); fails on duplicates."""
    rows = {}
    for shard in sorted((output / "shards").glob("shard-*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            key = (row["doc_id"], row["chunk_id"])
            assert key not in rows, f"duplicate row {key}"
            row["embedding_vector"] = np.asarray(row["embedding_vector"], dtype=np.float32)
            rows[key] = row
    return rows


def bucket_rows(bucket, prefix, tmp_path):
    """Download an output prefix and read it like a local one."""
    copy = tmp_path / "downloaded"
    for key in bucket.keys(prefix):
        path = copy / key[len(prefix) + 1 :]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bucket.get(key))
    return copy


def assert_same_output(reference, actual):
    expected, got = read_output_rows(reference), read_output_rows(actual)
    assert got.keys() == expected.keys()
    for key, row in expected.items():
        assert got[key]["text"] == row["text"] and got[key]["metadata"] == row["metadata"]
        assert np.allclose(got[key]["embedding_vector"], row["embedding_vector"], atol=1e-5)
    a, b = (json.loads((o / "_SUCCESS.json").read_text()) for o in (reference, actual))
    for key in ("documents", "embedded_documents", "rejected_documents", "rejected_by_reason", "chunks", "tokens", "shards"):
        assert a[key] == b[key], key
    rejects = [sorted(p.name for p in (o / "rejects").glob("*")) for o in (actual, reference)]
    assert rejects[0] == rejects[1]


@contextmanager
def running_luigid(folder: Path, **scheduler: object) -> Iterator[int]:
    """A real central scheduler on loopback (its port), with task history in sqlite under
    ``folder``; ``scheduler`` overrides ``[scheduler]`` settings. Stopped by PID."""
    from storage_servers import stop, wait_for_port

    port = free_port()
    (folder / "log").mkdir(parents=True)
    settings = configparser.ConfigParser(interpolation=None)
    settings.read(ROOT / "luigi.cfg")
    settings["task_history"]["db_connection"] = f"sqlite:///{folder}/history.db"
    settings["scheduler"].update({name: str(value) for name, value in scheduler.items()})
    config = folder / "luigi.cfg"
    with config.open("w") as file:
        settings.write(file)
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from luigi.cmdline import luigid; luigid(sys.argv[1:])",
         "--address", "127.0.0.1", "--port", str(port), "--state-path", str(folder / "state.pickle"), "--logdir", str(folder / "log")],
        cwd=folder, env=luigi_env(LUIGI_CONFIG_PATH=str(config)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process, "luigid")
        yield port
    finally:
        stop(process)


def api(port: int, method: str, **data: object) -> dict:
    """A call to luigid's JSON API, as its web view makes them."""
    query = urllib.parse.urlencode({"data": json.dumps(data)})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/{method}?{query}", timeout=10) as response:
        return json.loads(response.read())["response"]


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def kill_while_writing(process: subprocess.Popen, shards: Path, shard: str = "*") -> list[Path]:
    """SIGKILL ``process`` if it is in the middle of writing a shard (``shard``: its
    number as in the file name, or any): frozen first with SIGSTOP, so nothing can be
    published between the look and the kill; otherwise it goes on (SIGCONT). Returns
    the staging files of unpublished shards it was writing ([] when not killed)."""
    process.send_signal(signal.SIGSTOP)
    temps = [temp for temp in shards.glob(f".shard-{shard}.parquet.*.tmp")
             if not (shards / temp.name[1:].split(".parquet.")[0]).with_suffix(".parquet").exists()]
    if temps:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return temps
    process.send_signal(signal.SIGCONT)
    return []


# Three rounds of edits to a write_corpus(documents=10) corpus, for the --sync tests: documents
# added, changed, moved (and moved back), deleted, made unreadable and mended, shortened.
EDITS = [
    lambda c: [(c / "part-0" / "doc-000.md").write_text((c / "part-0" / "doc-000.md").read_text() + "\nA correction.\n"),
               (c / "part-0" / "doc-003.md").rename(c / "part-2" / "doc-003-moved.md"),
               (c / "part-0" / "doc-006.md").unlink(),
               (c / "part-1" / "new-a.md").write_text("# New A\n\nA translation added later.\n"),
               (c / "part-1" / "doc-004.md").write_bytes(b"\xff\xfe\x00\x00" * 50),  # unreadable now
               (c / "part-2" / "doc-005.md").write_text((c / "part-2" / "doc-005.md").read_text() * 4)],  # longer
    lambda c: [(c / "part-1" / "doc-004.md").write_text("# Mended\n\nReadable again.\n"),
               (c / "part-2" / "doc-003-moved.md").rename(c / "part-0" / "doc-003.md"),  # moved back
               (c / "part-1" / "new-a.md").write_text("# New A\n\nA translation, corrected.\n"),
               (c / "part-2" / "doc-005.md").write_text("# Shorter\n\nMuch shorter now.\n"),  # fewer chunks
               (c / "part-1" / "new-b.md").write_text((c / "part-2" / "doc-008.md").read_text())],  # a copy
    lambda c: [(c / "part-2" / "doc-008.md").unlink(),
               shutil.move(c / "part-1" / "doc-007.md", c / "part-1" / "doc-007-renamed.md"),
               (c / "part-0" / "doc-009.md").write_text((c / "part-0" / "doc-009.md").read_text() * 2)],
]
