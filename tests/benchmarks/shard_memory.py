"""Benchmark: a worker's peak memory on a 1000-document shard that holds a 20 MB document.

A fresh child process loads the model as a worker does, then runs the whole shard job
(read, decode, chunk, tokenize, build and write Parquet) with the model's forward pass
replaced by the null embedder: on this CPU the 20 MB document alone would take the
model about ten minutes. The model's own activations are bounded by the batch token
budget and are in ``make bench``'s peak RSS. Prints the child's peak RSS.

    .venv/bin/python tests/benchmarks/shard_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from helpers import ROOT, write_corpus  # noqa: E402

CHILD = """
import json, resource, sys
from pipeline.core.corpus import write_manifest
from pipeline.core.embedder import EmbedderSettings, load_embedder
from pipeline.core.null_embedder import NullEmbedder
from pipeline.core.shard_job import ShardJob, run_shard
corpus, work = sys.argv[1], sys.argv[2]
embedder = load_embedder(EmbedderSettings(device="cpu", batch_tokens=16384))
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
write_manifest(corpus, "*.md", 1000, work + "/manifest.parquet")
stats = run_shard(ShardJob(corpus, work + "/manifest.parquet", work + "/out", 1), 0, NullEmbedder(embedder))
print(json.dumps({"documents": stats["documents"], "chunks": stats["chunks"], "tokens": stats["tokens"],
                  "rss_after_model_load_bytes": after_load,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="shard-memory-") as work:
        corpus = write_corpus(Path(work) / "corpus", documents=999, words=400)
        paragraph = " ".join(["The commune was the political form at last discovered."] * 90)
        huge = "---\ntitle: Huge\n---\n\n# Huge\n\n" + "\n\n".join([paragraph] * 4200) + "\n"
        (corpus / "huge.md").write_text(huge)
        size = (corpus / "huge.md").stat().st_size
        result = subprocess.run([sys.executable, "-c", CHILD, str(corpus), work], cwd=ROOT, capture_output=True, text=True, check=True)
        figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"1000-document shard with one {size / 1e6:.1f} MB document: {figures['chunks']:,} chunks, {figures['tokens']:,} tokens")
    print(f"worker RSS after loading the model: {figures['rss_after_model_load_bytes'] / 2**20:,.0f} MiB")
    print(f"worker peak RSS over the shard:     {figures['peak_rss_bytes'] / 2**20:,.0f} MiB (target: under 2 GiB)")


if __name__ == "__main__":
    main()
