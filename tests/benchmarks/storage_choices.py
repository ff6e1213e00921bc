"""Bytes per chunk and retrieval quality of each way to store vectors, side by side on one
corpus (docs/schema.md, "Smaller vectors"; figures in docs/performance.md).

The corpus is embedded once in float32 (or an output given as the argument is used);
each other choice is the same output rewritten by ``compact`` (no embedding again), and
``evaluate`` scores every one with the same queries. Run by ``make bench``:

    python tests/benchmarks/storage_choices.py [OUTPUT]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import SHARED_CORPUS  # noqa: E402
from pipeline.core.vector_format import VectorFormat  # noqa: E402
from pipeline.output.compact import compact_output  # noqa: E402
from pipeline.output.evaluate import evaluate  # noqa: E402
from pipeline.output.read_back import embedding_stats, list_embedding_files  # noqa: E402

CHOICES = {
    "float32": VectorFormat(),
    "float16": VectorFormat("float16"),
    "float16 + binary + int8": VectorFormat("float16", ("binary", "int8")),
}


def embed_float32(work: Path) -> str:
    import luigi

    from pipeline import EmbedAll

    corpus = str(SHARED_CORPUS) if SHARED_CORPUS.is_dir() else ""
    output = str(work / "float32")
    assert luigi.build([EmbedAll(corpus=corpus, output=output, docs_per_shard=100, device="cpu", precision="float32")],
                       local_scheduler=True, log_level="WARNING")
    return output


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="storage-choices-") as folder:
        work = Path(folder)
        source = argv[0] if argv else embed_float32(work)
        chunks = embedding_stats(source)["count"]
        print(f"storage choices on {source}: {chunks:,} chunks")
        print(f"{'stored as':<26} {'searched on':<16} {'bytes/chunk':>11} {'file bytes/chunk':>16} {'recall@1':>9} "
              f"{'recall@10':>10} {'MRR@10':>8} {'evaluate s':>10}")
        for name, vector_format in CHOICES.items():
            output = source if name == "float32" else str(work / name.replace(" + ", "-"))
            if output != source:
                compact_output(source, output, vector_format=vector_format)
            files = sum(Path(path).stat().st_size for path in list_embedding_files(output))
            started = time.monotonic()
            result = evaluate(output)
            seconds = time.monotonic() - started
            for searched, figures in result["retrieval"].items():
                size = result["bytes_per_chunk"].get(searched.split("_")[0], result["bytes_per_chunk"]["vectors"])
                print(f"{name:<26} {searched:<16} {size:>11,} {files / chunks:>16,.0f} {figures['recall_at_1']:>9.3f} "
                      f"{figures['recall_at_10']:>10.3f} {figures['mrr_at_10']:>8.3f} {seconds:>10.1f}")
            sample = result.get("full_precision_sample")
            if sample:
                print(f"{'':<26} {sample['documents']} documents embedded again, their queries' chunks among "
                      f"{sample['chunks']:,}: recall@10 {sample['stored']['recall_at_10']:.3f} as stored, "
                      f"{sample['full_precision']['recall_at_10']:.3f} in float32")


if __name__ == "__main__":
    main(sys.argv[1:])
