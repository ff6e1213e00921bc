"""Markdown corpus -> Parquet shards of embeddings, as Luigi tasks.

``luigi --module pipeline EmbedAll`` finds the tasks through these re-exports.
"""

from .runpod_task import RunpodEmbedAll
from .tasks import CorpusManifest, EmbedAll, EmbedShard

__all__ = ["CorpusManifest", "EmbedAll", "EmbedShard", "RunpodEmbedAll"]
