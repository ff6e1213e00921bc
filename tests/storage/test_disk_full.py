"""Disk full while writing a shard: the shard fails with a clear error and publishes
nothing, the other shards are not lost, and a rerun once there is room finishes the
run, equal to a run that never hit the limit.

The limit is RLIMIT_FSIZE on the luigi process (a write past it fails with EFBIG, as a
full disk fails with ENOSPC; both are the same error to the pipeline): the manifest and
the small shards fit, the large shards do not. Only that run needs a process of its own;
the reference run and the rerun are built in this one, with the session's model settings
so the loaded model is reused."""

import subprocess
import sys

import luigi
import pytest

from helpers import ROOT, assert_same_output, luigi_env, write_corpus
from pipeline import EmbedAll
from pipeline.output.verify import verify_output

pytestmark = pytest.mark.slow

LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process dying
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv[0] = "luigi"
runpy.run_module("luigi", run_name="__main__")
"""


SETTINGS = {"docs_per_shard": 2, "device": "cpu", "batch_tokens": 16384, "precision": "float32"}


def embed_args(corpus, output):
    settings = [arg for name, value in SETTINGS.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    return ["--module", "pipeline", "EmbedAll", "--local-scheduler", "--corpus", str(corpus), "--output", str(output), *settings]


def embed_here(corpus, output) -> bool:
    return luigi.build([EmbedAll(corpus=str(corpus), output=str(output), **SETTINGS)], local_scheduler=True, log_level="WARNING")


def test_a_shard_that_does_not_fit_fails_clearly_publishes_nothing_and_a_rerun_finishes(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=6, words=200)
    for i, big in enumerate(sorted(write_corpus(tmp_path / "big", documents=2, words=2400, seed=9).rglob("*.md"))):
        (corpus / "z-big").mkdir(exist_ok=True)  # shard 3: two documents ten times larger
        big.rename(corpus / "z-big" / f"big-{i}.md")
    reference = tmp_path / "reference"
    assert embed_here(corpus, reference)
    sizes = sorted(p.stat().st_size for p in (reference / "shards").glob("*.parquet"))
    limit = (sizes[-2] + sizes[-1]) // 2  # room for every shard but the largest

    output = tmp_path / "out"
    full = subprocess.run([sys.executable, "-c", LIMITED, str(limit), *embed_args(corpus, output)], cwd=ROOT,
                          env=luigi_env(), capture_output=True, text=True, timeout=600)
    assert full.returncode != 0
    assert "no space left to write" in full.stderr and "shard-000003.parquet" in full.stderr, full.stderr[-3000:]
    assert "free space and rerun" in full.stderr
    shards = sorted(p.name for p in (output / "shards").iterdir())
    assert shards == ["shard-000000.parquet", "shard-000001.parquet", "shard-000002.parquet"], "no partial file, others kept"
    assert not (output / "_SUCCESS.json").exists()

    assert embed_here(corpus, output)
    assert verify_output(str(output)).ok
    assert_same_output(reference, output)
