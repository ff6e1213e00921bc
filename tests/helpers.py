"""Test corpora and process helpers shared by the test modules."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.sample import _paragraph

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
    in from outside, no metadata-server probes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_") and k not in CLOUD_CREDENTIAL_VARIABLES}
    env.update(NO_METADATA_PROBES)
    env.update(extra)
    return env


def luigi_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "luigi", "--module", "pipeline", *args]


def run_luigi(*args: str, cwd: Path = ROOT, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        luigi_command(*args), cwd=cwd, env=luigi_env(**env), capture_output=True, text=True, timeout=timeout
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
