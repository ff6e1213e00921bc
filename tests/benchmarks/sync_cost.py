"""Benchmark: the cost of ``--sync`` follows the change, not the corpus.

Embeds a corpus with ``EmbedAll`` (in this process, a local scheduler, the offline model on
the CPU), changes 1 % of its documents (half edited, half new), then runs ``EmbedAll
--sync`` and a sync with nothing changed, and prints side by side: tokens embedded and
seconds, each against the full run's. The shared corpus is used where it is present.

    .venv/bin/python tests/benchmarks/sync_cost.py [--documents 400] [--percent 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import luigi  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from helpers import SHARED_CORPUS, write_corpus  # noqa: E402
from pipeline import EmbedAll  # noqa: E402
from pipeline.config import prepare_run  # noqa: E402
from pipeline.planning import forget_plans  # noqa: E402


def tokens_in(output: Path, shards: set[str] | None = None) -> int:
    """Tokens of the shard files (those named in ``shards``, else all)."""
    return sum(json.loads(pq.read_metadata(path).metadata[b"pipeline.stats"])["tokens"]
               for path in (output / "shards").glob("shard-*.parquet") if shards is None or path.name in shards)


def timed_build(**settings) -> float:
    forget_plans()
    clock = time.perf_counter()
    result = luigi.build([EmbedAll(**settings)], local_scheduler=True, log_level="WARNING", detailed_summary=True)
    assert result.scheduling_succeeded, result.summary_text
    return time.perf_counter() - clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=400, help="documents of the corpus (at most the shared corpus's)")
    parser.add_argument("--percent", type=float, default=1.0, help="share of the documents to change")
    args = parser.parse_args()
    prepare_run(exit_codes=False)
    folder = Path(tempfile.mkdtemp(prefix="sync-bench-"))
    try:
        corpus = folder / "corpus"
        shared = sorted(SHARED_CORPUS.rglob("*.md")) if SHARED_CORPUS.is_dir() else []
        if shared:
            corpus.mkdir()
            for path in shared[: args.documents]:
                copy = corpus / path.relative_to(SHARED_CORPUS)
                copy.parent.mkdir(parents=True, exist_ok=True)
                copy.write_bytes(path.read_bytes())
        else:
            write_corpus(corpus, documents=args.documents, words=300)
        source = "the shared corpus" if shared else "a generated corpus"
        documents = sorted(corpus.rglob("*.md"))
        settings = dict(corpus=str(corpus), output=str(folder / "out"), docs_per_shard=50, device="cpu",
                        precision="float32", readers=0)
        full_seconds = timed_build(**settings)
        full_tokens = tokens_in(folder / "out")

        changed = max(2, round(len(documents) * args.percent / 100))
        for path in documents[: changed // 2]:
            path.write_text(path.read_text(errors="replace") + "\n\nA correction added later.\n")
        for i in range(changed - changed // 2):
            shutil.copy(documents[-1 - i], corpus / f"added-{i}.md")
            (corpus / f"added-{i}.md").write_text((corpus / f"added-{i}.md").read_text(errors="replace") + f"\n{i}\n")
        before = {path.name for path in (folder / "out" / "shards").glob("shard-*.parquet")}
        sync_seconds = timed_build(**settings, sync=True)
        new = {path.name for path in (folder / "out" / "shards").glob("shard-*.parquet")} - before
        sync_tokens = tokens_in(folder / "out", new)
        idle_seconds = timed_build(**settings, sync=True)

        print(f"sync cost, {len(documents)} documents of {source}, {full_tokens:,} tokens, minilm on the CPU")
        print(f"  full run:                        {full_seconds:7.1f} s  {full_tokens:>10,} tokens embedded")
        print(f"  sync, {changed} documents changed ({changed / len(documents):.1%}): {sync_seconds:7.1f} s "
              f"({sync_seconds / full_seconds:.1%})  {sync_tokens:>10,} tokens embedded ({sync_tokens / full_tokens:.1%})")
        print(f"  sync, nothing changed:           {idle_seconds:7.2f} s ({idle_seconds / full_seconds:.1%})  "
              f"{0:>10,} tokens embedded (one listing)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
