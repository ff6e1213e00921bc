"""Markdown corpus -> Parquet shards of embeddings, as Luigi tasks.

``luigi --module pipeline EmbedAll`` finds the tasks through these re-exports. The public
Python API (docs/api.md): ``EmbeddingInterface`` embeds texts and files and resumes runs,
``RunpodOrchestrator`` starts and ends GPU pods, and the reader functions read an output
back. The search is ``pipeline.output.search.search`` (not re-exported: the function would hide
its module's name).

A Python program that reads an output from a bucket whose credentials sit in ``.env``
loads that file itself (``pipeline.config.prepare_run`` does, among a run's other
preparations); ``EmbeddingInterface`` and the command lines do it for you.
"""

from pipeline.config import prepare_run, started_by_luigi_command_line
from pipeline.interface import Checkpoint, EmbeddingInterface, RunFailed
from pipeline.output.ledger import PodLedger
from pipeline.runpod.orchestrator import NoCapacity, PodError, PodSettings, PodStuck, RunpodOrchestrator
from pipeline.output.read_back import EmbeddingBatch, embedding_stats, list_embedding_files, read_shard, stream_embeddings
from pipeline.runpod.launcher import RunpodEmbedAll
from pipeline.tasks import CorpusManifest, EmbedAll, EmbedShard

__all__ = [
    "CorpusManifest", "EmbedAll", "EmbedShard", "RunpodEmbedAll",
    "EmbeddingInterface", "Checkpoint", "RunFailed",
    "RunpodOrchestrator", "PodSettings", "PodLedger", "PodError", "NoCapacity", "PodStuck",
    "EmbeddingBatch", "embedding_stats", "list_embedding_files", "read_shard", "stream_embeddings",
]

# Importing the package defines things and changes nothing else. Only when the luigi
# command line (`luigi --module pipeline …`) loads it to run a task does the run start
# here: .env, the hub off, and exit codes set before Luigi reads them.
if started_by_luigi_command_line():
    prepare_run()
