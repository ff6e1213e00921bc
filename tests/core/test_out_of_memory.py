"""Out of memory on the device: a batch token budget far too large for the memory there
is, and the shard still gets made, batch by smaller batch, with the same vectors.

The device here is the CPU, its memory capped with RLIMIT_AS in a child process, so
the allocator really fails (a RuntimeError, as torch raises it on a CPU; CUDA's
OutOfMemoryError takes the same path)."""

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import ROOT, luigi_env, write_corpus
from pipeline.core.corpus import write_manifest
from pipeline.core.embedder import is_out_of_memory
from pipeline.output.layout import OutputLayout
from pipeline.core.shard_job import ShardJob, run_shard

CHILD = """
import json, logging, resource, sys
import torch
torch.set_num_threads(1)  # no thread starts after the cap
from pipeline.core.embedder import EmbedderSettings, load_embedder
from pipeline.core.shard_job import ShardJob, run_shard
corpus, manifest, output = sys.argv[1:4]
warnings = []
logging.getLogger("luigi-interface").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: warnings.append(r.getMessage())})())
embedder = load_embedder(EmbedderSettings(device="cpu", batch_tokens=10_000_000, precision="float32"))
embedder.embed_texts(["warm up"])
in_use = int(open("/proc/self/statm").read().split()[0]) * 4096
resource.setrlimit(resource.RLIMIT_AS, (in_use + 400 * 2**20, resource.RLIM_INFINITY))
stats = run_shard(ShardJob(corpus, manifest, output, 1), 0, embedder)
print(json.dumps({"stats": stats, "warnings": warnings, "batch_tokens": embedder.batch_tokens}))
"""


@pytest.mark.slow  # a model in a memory-capped subprocess: not in the fast tier
def test_a_batch_too_large_for_memory_is_split_and_the_shard_is_made(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "corpus", documents=12, words=1600)
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(str(corpus), "*.md", 100, manifest)
    # glibc maps large blocks and unmaps them when freed, so a failed batch's memory goes
    # back to the capped address space (its heap would keep it: that is the cap, not us).
    env = luigi_env(MALLOC_MMAP_THRESHOLD_="131072")
    child = subprocess.run([sys.executable, "-c", CHILD, str(corpus), manifest, str(tmp_path / "capped")], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    splits = [w for w in report["warnings"] if w.startswith("out of memory on cpu with a batch of")]
    assert splits, "the budget was not too large: nothing ran out of memory"
    assert report["batch_tokens"] < 10_000_000 and "batch split and run again" in splits[0]

    run_shard(ShardJob(str(corpus), manifest, str(tmp_path / "plain"), 1), 0, embedder)
    capped, plain = (pq.read_table(OutputLayout.of(str(tmp_path / out)).shard(0)) for out in ("capped", "plain"))
    assert capped.num_rows == plain.num_rows == report["stats"]["chunks"] > 100
    assert capped["doc_id"].to_pylist() == plain["doc_id"].to_pylist()
    assert capped["chunk_id"].to_pylist() == plain["chunk_id"].to_pylist()
    vectors = [t["embedding_vector"].combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1) for t in (capped, plain)]
    assert np.allclose(vectors[0], vectors[1], atol=1e-5)


def test_only_out_of_memory_errors_split_a_batch():
    torch = pytest.importorskip("torch")
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 100663296 bytes"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(MemoryError())  # Python's own: not a batch too large for the device
