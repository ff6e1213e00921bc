"""Benchmark: what a worker pays per shard as the corpus grows (issue 39's table).

For each size, a child process writes a generated manifest (the project's own writer;
documents of 300-600 bytes in 200 folders) and an output of that many shard files
(empty: only their names are listed), then times, with its peak RSS:

- writing the manifest;
- one shard finding its rows, and the bytes a bucket worker reads for them (the same
  ranged reads ``storage.RangeReader`` makes, counted on the local file);
- which shards are done: one listing, as ``EmbedShard.complete()`` asks it;
- ``--skip-duplicates``: the first shard's decision (every shard's, made once per process)
  and a later shard's;
- in a process of its own, a ``--sync`` with nothing changed: the manifest, the listing
  as the sync holds it and the diff, with that process's peak RSS.

The smallest size is the baseline; the ratios of the others to it are the figures that
count (a per-shard cost that stays near 1x is flat in the corpus).

    .venv/bin/python tests/benchmarks/scale.py [--documents 100000 1000000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import io, json, os, resource, sys, time
import pyarrow.parquet as pq
from pipeline import storage
from pipeline.core.corpus import duplicates_in_shard, manifest_rows, write_manifest_of
from pipeline.output.shard_listing import published_shards

documents, work = int(sys.argv[1]), sys.argv[2]
per_shard = 1000
shards = -(-documents // per_shard)

def listing():
    for i in range(documents):
        content = i - 1 if i % 50 == 0 else i  # one document in 50 repeats the one before it
        yield storage.Listed(f"folder-{i % 200:03d}/document-{i:08d}.md", 300 + i % 300, f"{content:032x}")

figures = {"documents": documents, "shards": shards}
manifest = os.path.join(work, "out", "manifest.parquet")
started = time.perf_counter()
write_manifest_of(listing(), "/corpus", "*.md", per_shard, manifest)
figures["write_manifest_s"] = time.perf_counter() - started
figures["manifest_mb"] = os.path.getsize(manifest) / 1e6
figures["row_groups"] = pq.ParquetFile(manifest).num_row_groups

started = time.perf_counter()
rows = manifest_rows(manifest, shards - 1)
figures["shard_rows_s"] = time.perf_counter() - started

class Counting(io.RawIOBase):
    def __init__(self, path):
        self.file, self.reads, self.bytes = open(path, "rb"), 0, 0
    def readable(self): return True
    def seekable(self): return True
    def seek(self, offset, whence=0): return self.file.seek(offset, whence)
    def tell(self): return self.file.tell()
    def readinto(self, buffer):
        data = self.file.read(len(buffer)); buffer[:len(data)] = data
        self.reads += 1; self.bytes += len(data); return len(data)

counted = Counting(manifest)
assert len(pq.read_table(io.BufferedReader(counted, 1 << 16), filters=[("shard", "=", shards - 1)])) == len(rows)
figures["bucket_reads_per_shard"], figures["bucket_mb_per_shard"] = counted.reads, counted.bytes / 1e6

folder = os.path.join(work, "out", "shards")
os.makedirs(folder)
for shard in range(shards):
    open(os.path.join(folder, f"shard-{shard:06d}.parquet"), "wb").close()
started = time.perf_counter()
done = published_shards(os.path.join(work, "out")).numbers
figures["done_shards_listing_s"] = time.perf_counter() - started
assert len(done) == shards

figures["peak_rss_before_duplicates_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
started = time.perf_counter()
copies = duplicates_in_shard(manifest, shards - 1)
figures["duplicates_first_shard_s"] = time.perf_counter() - started
started = time.perf_counter()
duplicates_in_shard(manifest, shards - 2)
figures["duplicates_later_shard_s"] = time.perf_counter() - started
figures["duplicates_in_last_shard"] = len(copies)
figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(figures))
"""

# A sync with nothing changed, in a process of its own (its peak is the figure): the
# manifest read, the corpus's listing as the sync holds it, and the diff.
SYNC_CHILD = r"""
import json, os, resource, sys, time
from pipeline import storage
from pipeline.core.corpus import write_manifest_of
from pipeline.core.sync import diff, listing_of, read_manifest

documents, work = int(sys.argv[1]), sys.argv[2]
def listing():
    for i in range(documents):
        yield storage.Listed(f"folder-{i % 200:03d}/document-{i:08d}.md", 300 + i % 300, f"{i:032x}")
manifest = os.path.join(work, "manifest.parquet")
write_manifest_of(listing(), "/corpus", "*.md", 1000, manifest)
started = time.perf_counter()
now = listing_of(listing())  # as listing_table holds the corpus's listing
changes = diff(read_manifest(manifest), now, -(-documents // 1000), 1000, 1, set(range(-(-documents // 1000))))
assert changes.num_rows == 0
print(json.dumps({"sync_nothing_changed_s": time.perf_counter() - started,
                  "sync_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PER_SHARD = ("shard_rows_s", "bucket_reads_per_shard", "bucket_mb_per_shard", "duplicates_later_shard_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    results = []
    for documents in args.documents:
        with tempfile.TemporaryDirectory() as work:
            figures = {}
            for child in (CHILD, SYNC_CHILD):
                out = subprocess.run([sys.executable, "-c", child, str(documents), work], capture_output=True, text=True,
                                     check=True, timeout=3600)
                figures.update(json.loads(out.stdout.splitlines()[-1]))
        results.append(figures)
    base = results[0]
    names = [name for name in base if name not in ("documents",)]
    print(f"{'figure':<28}" + "".join(f"{r['documents']:>14,}" for r in results) + "   ratio to the first")
    for name in names:
        ratios = "  ".join(f"{r[name] / base[name]:.2f}x" if base[name] else "-" for r in results[1:])
        flat = "  (per shard)" if name in PER_SHARD else ""
        print(f"{name:<28}" + "".join(f"{r[name]:>14,.3f}" if isinstance(r[name], float) else f"{r[name]:>14,}"
                                      for r in results) + f"   {ratios}{flat}")


if __name__ == "__main__":
    main()
