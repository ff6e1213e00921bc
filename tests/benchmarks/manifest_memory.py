"""Benchmark: the manifest's peak memory does not grow with the corpus.

Lists corpora of different sizes from one fake-gcs-server on loopback, each in a
fresh child process, and prints each child's peak RSS side by side. The one-object
corpus is the baseline (imports, client, one page); the ratio of the largest to the
smallest real corpus is the figure that counts.

    .venv/bin/python tests/benchmarks/manifest_memory.py [--documents 5000 20000 40000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from helpers import NO_METADATA_PROBES, ROOT  # noqa: E402
from storage_servers import FakeGCS  # noqa: E402

CHILD = """
import json, resource, sys
from pipeline.core.corpus import write_manifest
count = write_manifest(sys.argv[1], "*.md", 1000, sys.argv[2])
print(json.dumps({"documents": count, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def preload(data: Path, bucket: str, documents: int) -> None:
    for i in range(documents):
        path = data / bucket / "corpus" / f"part-{i % 20:02d}" / f"doc-{i:07d}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"---\ntitle: Document %d\n---\n\nText of document %d.\n" % (i, i))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, nargs="+", default=[5000, 20000, 40000])
    args = parser.parse_args()
    sizes = [1, *args.documents]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for size in sizes:
            preload(folder / "data", f"corpus-{size}", size)
        server = FakeGCS(data=folder / "data", root=folder / "root")
        try:
            env = {**os.environ, **NO_METADATA_PROBES, **server.env()}
            rows = []
            for size in sizes:
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, f"gs://corpus-{size}/corpus", str(folder / f"manifest-{size}.parquet")],
                    cwd=ROOT, env=env, capture_output=True, text=True, check=True,
                )
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        finally:
            server.stop()
    base = rows[0]["peak_rss_bytes"]
    print(f"{'documents':>10} {'peak RSS':>10} {'over 1-doc baseline':>20}")
    for row in rows:
        print(f"{row['documents']:>10} {row['peak_rss_bytes'] / 2**20:>8.1f}MB {(row['peak_rss_bytes'] - base) / 2**20:>18.1f}MB")
    smallest, largest = rows[1], rows[-1]
    ratio = largest["peak_rss_bytes"] / smallest["peak_rss_bytes"]
    print(f"peak RSS at {largest['documents']} documents / at {smallest['documents']}: {ratio:.2f}x "
          f"for {largest['documents'] / smallest['documents']:.0f}x the documents")


if __name__ == "__main__":
    main()
