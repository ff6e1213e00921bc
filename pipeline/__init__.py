"""Markdown corpus -> Parquet shards of embeddings, as Luigi tasks.

``luigi --module pipeline EmbedAll`` finds the tasks through these re-exports. The
reader functions (pipeline/reader.py, docs/api.md) read an output back; the search is
``pipeline.search.search`` (not re-exported: the function would hide its module's name).
"""

from .reader import EmbeddingBatch, embedding_stats, list_embedding_files, read_shard, stream_embeddings
from .runpod_task import RunpodEmbedAll
from .tasks import CorpusManifest, EmbedAll, EmbedShard

__all__ = ["CorpusManifest", "EmbedAll", "EmbedShard", "RunpodEmbedAll",
           "EmbeddingBatch", "embedding_stats", "list_embedding_files", "read_shard", "stream_embeddings"]
