"""Markdown corpus -> Parquet shards of embeddings, as Luigi tasks.

``luigi --module pipeline EmbedAll`` finds the tasks through these re-exports. The public
Python API (docs/api.md): ``EmbeddingInterface`` embeds texts and files and resumes runs,
``RunpodOrchestrator`` starts and ends GPU pods, and the reader functions read an output
back. The search is ``pipeline.search.search`` (not re-exported: the function would hide
its module's name).
"""

from .interface import Checkpoint, EmbeddingInterface, RunFailed
from .pods import NoCapacity, PodError, PodLedger, PodSettings, PodStuck, RunpodOrchestrator
from .reader import EmbeddingBatch, embedding_stats, list_embedding_files, read_shard, stream_embeddings
from .runpod_task import RunpodEmbedAll
from .tasks import CorpusManifest, EmbedAll, EmbedShard

__all__ = [
    "CorpusManifest", "EmbedAll", "EmbedShard", "RunpodEmbedAll",
    "EmbeddingInterface", "Checkpoint", "RunFailed",
    "RunpodOrchestrator", "PodSettings", "PodLedger", "PodError", "NoCapacity", "PodStuck",
    "EmbeddingBatch", "embedding_stats", "list_embedding_files", "read_shard", "stream_embeddings",
]
