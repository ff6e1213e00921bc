"""Benchmark: ``verify``'s peak memory does not grow with the number of shards.

Writes outputs of different sizes (small shards of random unit vectors, written by the
pipeline's own shard writer, with a manifest and a summary), verifies each in a fresh
child process and prints each child's peak RSS side by side with the time it took.

    .venv/bin/python tests/benchmarks/verify_memory.py [--shards 100 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.core.corpus import MANIFEST_SCHEMA, doc_id_for  # noqa: E402
from pipeline.output.layout import OutputLayout  # noqa: E402
from pipeline.core.shard_file import ShardWriter, shard_schema  # noqa: E402
from pipeline.output.summary import run_summary  # noqa: E402

DOCS_PER_SHARD, CHUNKS_PER_DOC, DIMENSION = 4, 3, 384
SETTINGS = {"model_profile": "minilm", "model_id": "sentence-transformers/all-MiniLM-L6-v2", "dimension": str(DIMENSION),
            "prefix": "", "max_tokens": "256", "normalized": "true", "precision": "float32",
            "chunk_max_tokens": "254", "chunk_overlap_tokens": "32"}
CHILD = """
import json, resource, sys, time
from pipeline.output.verify import verify_output
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
done, at_tenth = [0], [0]
def tick(total):
    done[0] += 1
    if done[0] == max(total // 10, 1):
        at_tenth[0] = peak()
clock = time.monotonic()
verdict = verify_output(sys.argv[1], on_shard=tick)
print(json.dumps({"ok": verdict.ok, "problems": verdict.problems[:3], "shards": verdict.totals["shards"],
                  "seconds": time.monotonic() - clock, "peak_rss_bytes": peak(), "peak_rss_at_tenth_bytes": at_tenth[0]}))
"""


def write_output(folder: Path, shards: int, rng: np.random.Generator) -> None:
    (folder / "shards").mkdir(parents=True)
    paths = [f"doc-{i:07d}.md" for i in range(shards * DOCS_PER_SHARD)]
    schema = MANIFEST_SCHEMA.with_metadata({"pipeline.corpus": "/nowhere", "pipeline.pattern": "*.md",
                                            "pipeline.docs_per_shard": str(DOCS_PER_SHARD),
                                            "pipeline.documents": str(len(paths)), "pipeline.shards": str(shards)})
    pq.write_table(pa.table({"doc_id": [doc_id_for(p) for p in paths], "path": paths, "bytes": [100] * len(paths),
                             "content_hash": ["0" * 32] * len(paths),
                             "shard": [i // DOCS_PER_SHARD for i in range(len(paths))]}, schema=schema),
                   folder / "manifest.parquet")
    schema = shard_schema(DIMENSION, SETTINGS)
    for shard in range(shards):
        rows = [{"doc_id": doc_id_for(path), "chunk_id": chunk, "text": f"chunk {chunk} of {path}",
                 "metadata": {"path": path, "token_count": 10, "heading_path": [], "char_start": 0, "char_end": 1}}
                for path in paths[shard * DOCS_PER_SHARD:(shard + 1) * DOCS_PER_SHARD] for chunk in range(CHUNKS_PER_DOC)]
        vectors = rng.standard_normal((len(rows), DIMENSION)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        writer = ShardWriter(OutputLayout.of(str(folder)).shard(shard), schema)
        writer.write(rows, vectors)
        writer.close({"shard": shard, "documents": DOCS_PER_SHARD, "embedded_documents": DOCS_PER_SHARD,
                      "rejected_documents": 0, "rejected_by_reason": {}, "chunks": len(rows), "tokens": 10 * len(rows),
                      "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:00:01+00:00",
                      "seconds": 1.0, "device": "cpu"})
    (folder / "_SUCCESS.json").write_text(json.dumps(run_summary(str(folder), shards, {})))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 10000])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for shards in args.shards:
            output = Path(folder) / f"out-{shards}"
            write_output(output, shards, rng)
            child = subprocess.run([sys.executable, "-c", CHILD, str(output)], cwd=ROOT, capture_output=True, text=True, check=True)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            assert rows[-1]["ok"] and rows[-1]["shards"] == shards, rows[-1]
    print(f"{'shards':>8} {'peak RSS':>10} {'after 1/10':>11} {'seconds':>8} {'shards/s':>9}")
    for row in rows:
        print(f"{row['shards']:>8} {row['peak_rss_bytes'] / 2**20:>8.1f}MB {row['peak_rss_at_tenth_bytes'] / 2**20:>9.1f}MB "
              f"{row['seconds']:>8.1f} {row['shards'] / row['seconds']:>9.0f}")
    largest = rows[-1]
    print(f"verify's peak RSS over the last nine tenths of {largest['shards']} shards: "
          f"{largest['peak_rss_bytes'] / largest['peak_rss_at_tenth_bytes']:.2f}x its peak after the first tenth "
          "(flat: memory does not grow with the shards read)")


if __name__ == "__main__":
    main()
