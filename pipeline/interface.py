"""The pipeline as a Python object: embed texts, embed a few files, see and resume a run.

``EmbeddingInterface`` is for code that drives the pipeline from Python (a notebook, an
importer, a scheduler of its own). It holds the same settings as ``EmbedAll`` and goes
through the same code: texts through the run's embedder, files through ``run_shard``,
runs through the Luigi tasks (in this process, on a local scheduler), so its vectors
and shards are the pipeline's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import luigi
import numpy as np

from pipeline import planning, storage
from pipeline.core.corpus import write_manifest_of
from pipeline.config import prepare_run
from pipeline.core.embedder import Embedder
from pipeline.errors import PipelineError
from pipeline.output import layout
from pipeline.output.layout import OutputLayout
from pipeline.output.verify import shard_numbers
from pipeline.core.output_identity import OutputIdentity
from pipeline.core.shard_job import ShardJob, run_shard
from pipeline.core.shard_file import PIPELINE_VERSION
from pipeline.output.summary import publish_summary, run_summary
from pipeline.tasks import CorpusManifest, EmbedAll, EmbedShard


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where a run stands, read from its targets: which shard files are published.

    ``total_shards`` is None before the run has written its manifest (nothing started).
    ``finished``: every shard is published and ``_SUCCESS.json`` records this run's
    parameters and the manifest's shard count.
    Plain data (``dataclasses.asdict``) so it can be saved as JSON and passed back.
    """

    output: str
    parameters: dict[str, Any]
    total_shards: Optional[int]
    done: tuple[int, ...]
    finished: bool

    @property
    def missing(self) -> tuple[int, ...]:
        """Shards still to make (all of them are unknown until the manifest exists: empty)."""
        return tuple(sorted(set(range(self.total_shards or 0)) - set(self.done)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Checkpoint":
        return cls(**{**data, "done": tuple(data["done"])})


class RunFailed(PipelineError):
    """Some shards of a resumed run failed (the others are kept); ``checkpoint`` says
    which are still missing. Rerunning resumes from there."""

    def __init__(self, message: str, checkpoint: Checkpoint):
        super().__init__(message)
        self.checkpoint = checkpoint


class EmbeddingInterface:
    """One output and its settings (``corpus``, ``model``, ``docs_per_shard``, … as
    ``EmbedAll`` takes them; unset ones come from luigi.cfg / ``PIPELINE_*``).
    ``add_new_documents=True``: each resume first appends the corpus's new documents;
    ``sync=True``: each resume first follows the corpus's changes (``--sync``)."""

    def __init__(self, output: str | os.PathLike, corpus: str | os.PathLike | None = None, **settings: Any):
        prepare_run(exit_codes=False)  # .env (credentials), the hub off, one-line errors in Luigi's log
        self.add_new_documents = bool(settings.pop("add_new_documents", False))
        self.sync = bool(settings.pop("sync", False))
        if corpus is not None:
            settings["corpus"] = os.fspath(corpus)
        self.run = EmbedAll(output=os.fspath(output), **settings)
        self.output = self.run.output_location

    def embedder(self) -> Embedder:
        """The run's model, loaded once per process and settings (shared with the tasks)."""
        return self.run.embedder()

    def generate_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``[len(texts), dimension]``, L2-normalised, each text with the model's
        document prefix, as the pipeline embeds a chunk: the same text gives the same
        vector as in a shard. A text longer than the model's input is cut to fit (the
        pipeline's chunker never makes one)."""
        if isinstance(texts, str):
            raise PipelineError("generate_embeddings takes a list of texts, not one string")
        texts = list(texts)
        wrong = [type(text).__name__ for text in texts if not isinstance(text, str)]
        if wrong:
            raise PipelineError(f"generate_embeddings takes texts (str), not {wrong[0]}")
        return self.embedder().embed_texts(texts)

    def get_checkpoint(self) -> Checkpoint:
        """Which shards are done, from the published shard files (one listing, no file
        opened), and whether the run's summary is written. An output made from another
        corpus, pattern or shard size is refused (PipelineError)."""
        parameters = self.run.identity().as_dict()
        if not storage.exists(self.run.manifest_path()):
            return Checkpoint(self.output, parameters, None, (), False)
        total = self.run.check_manifest_matches()
        listing = OutputLayout.of(self.output).list_shards()
        done = tuple(sorted(shard_numbers(listing, layout.SHARDS, layout.SHARD_SUFFIX, total, problems=[])))
        return Checkpoint(self.output, parameters, total, done, len(done) == total and self.run.complete())

    def resume_from_checkpoint(self, checkpoint: Checkpoint | dict[str, Any]) -> Checkpoint:
        """Run what is missing (the shards not published now, then the summary) through
        the Luigi tasks on a local scheduler in this process, and return the new
        checkpoint. A checkpoint of another output or other settings is refused. When a
        task fails, the others still run and ``RunFailed`` says what failed and what is
        left."""
        if isinstance(checkpoint, dict):
            checkpoint = Checkpoint.from_dict(checkpoint)
        identity = self.run.identity()
        if checkpoint.output != self.output or identity.differences(checkpoint.parameters):
            raise PipelineError(f"this checkpoint is of another run ({checkpoint.output}, {checkpoint.parameters}), "
                                f"not of {self.output} with {identity.as_dict()}")
        if self.sync and storage.exists(self.run.manifest_path()):
            self.run.sync_manifest()
        elif self.add_new_documents and storage.exists(self.run.manifest_path()):
            self.run.grow_manifest()
        before = self.get_checkpoint()
        if before.missing and self.run.complete():
            storage.delete(OutputLayout.of(self.output).summary)  # it counts shards that are gone; rebuilt at the end
        planning.forget_plans()  # a new build: list the shards and new documents afresh
        with _failures_recorded() as failures:
            result = luigi.build([self.run], local_scheduler=True, detailed_summary=True, log_level="INFO")
        now = self.get_checkpoint()
        if not now.finished:
            left = ", ".join(map(str, now.missing[:10])) + (" …" if len(now.missing) > 10 else "")
            raise RunFailed(f"{self.output}: the run did not finish ({'; '.join(failures[:5]) or result.one_line_summary}); "
                            f"{len(now.missing)} shard(s) missing ({left}), the others are kept", now)
        return now

    def batch_process(self, file_paths: Iterable[str | os.PathLike]) -> str:
        """Embed these files (local ones) into one Parquet shard and return its path.

        The files make a small output of their own under ``{output}/batches/``, named by
        the files' paths and contents and the run's model settings, with its manifest,
        rejects and ``_SUCCESS.json``, so the reader, ``verify`` and ``search`` work on it.
        Asking again for the same unchanged files returns the shard already made without
        loading the model. Paths are relative to the corpus when every file is inside it
        (so document ids match the corpus run's), else to the files' common folder. A
        file that cannot be embedded is rejected with its reason, as in a run."""
        files = sorted({_local_file(path) for path in file_paths})
        if not files:
            raise PipelineError("batch_process needs at least one file")
        root = _batch_root(files, self.run.corpus_location())
        listed = []
        for file in files:
            content_hash, size = storage.hash_file(file)
            listed.append(storage.Listed(file.relative_to(root).as_posix(), size, content_hash))
        # A small output of its own: the run's identity (everything that changes a vector, nothing
        # that only changes speed) with these files as its corpus and one shard.
        identity = OutputIdentity.of({**self.run.identity().as_dict(), "corpus": str(root), "pattern": "",
                                      "docs_per_shard": len(listed)})
        making = [[(d.relative, d.content_hash) for d in listed], PIPELINE_VERSION, identity.as_dict()]
        batch = OutputLayout.of(self.output).batch_output(hashlib.sha256(json.dumps(making).encode()).hexdigest()[:16])
        output, shard = batch.root, batch.shard(0)
        if storage.exists(batch.summary):
            return shard
        if not storage.exists(shard):
            storage.ensure_writable_dir(output)
            manifest = batch.manifest
            write_manifest_of(listed, str(root), "", len(listed), manifest)
            run_shard(ShardJob.of_output(identity, manifest, output, 1), 0, self.embedder())
        publish_summary(output, run_summary(output, 1, identity.as_dict()))
        return shard


@contextlib.contextmanager
def _failures_recorded() -> Iterator[list[str]]:
    """The one-line errors of the pipeline's tasks that fail in this process meanwhile."""
    failures: list[str] = []
    _recorders.append(failures)
    try:
        yield failures
    finally:
        _recorders.remove(failures)


_recorders: list[list[str]] = []


def _record_failure(task, exception) -> None:
    if _recorders:
        shard = f" {task.shard}" if isinstance(task, EmbedShard) else ""
        what = str(exception) if isinstance(exception, PipelineError) else f"{type(exception).__name__}: {exception}"
        _recorders[-1].append(f"{task.task_family}{shard}: {what}")


for _task_class in (CorpusManifest, EmbedShard, EmbedAll):  # our tasks only: no handler on every luigi.Task
    _task_class.event_handler(luigi.Event.FAILURE)(_record_failure)


def _local_file(path: str | os.PathLike) -> Path:
    if storage.is_remote(str(path)):
        raise PipelineError(f"batch_process embeds local files; {path} is in a bucket: run EmbedAll on its corpus")
    file = Path(path).resolve()
    if not file.is_file():
        raise PipelineError(f"batch_process: {path} is not a file")
    return file


def _batch_root(files: list[Path], corpus: str) -> Path:
    """The corpus, when it holds every file, else the files' common folder."""
    if not storage.is_remote(corpus):
        base = Path(corpus).resolve()
        if all(file.is_relative_to(base) for file in files):
            return base
    return Path(os.path.commonpath([file.parent for file in files]))
