"""Luigi tasks: thin wiring of targets to the plain functions that do the work.

CorpusManifest -> EmbedShard(0..N-1) -> EmbedAll. The shard files are the checkpoint:
a shard that exists is done, so rerunning the same command resumes.
"""

from __future__ import annotations

import json
import logging
import traceback

import luigi

from pipeline import config, planning, web_view
from pipeline.core.corpus import manifest_info
from pipeline.core.embedder import Embedder, EmbedderSettings, load_embedder
from pipeline.errors import PipelineError
from pipeline.core.manifest_growth import documents_not_in_manifest
from pipeline.core.reader_pool import reader_processes
from pipeline.core.sample import ensure_sample_corpus
from pipeline.output.layout import OutputLayout
from pipeline.output.shard_listing import forget_listings, note_published, published_shards
from pipeline.core.shard_job import ShardJob, run_shard, shard_label
from pipeline.core.output_identity import OutputIdentity
from pipeline.core.vector_format import VectorFormat
from pipeline.settings import DEFINING
from pipeline import storage
from pipeline.output.summary import publish_summary, run_summary

log = logging.getLogger("luigi-interface")

class StoredTarget(luigi.Target):
    """A Luigi target in any backend: ``exists()`` is one cheap call (a stat or a HEAD)."""

    def __init__(self, path: str):
        self.path = path

    def exists(self) -> bool:
        return storage.exists(self.path)


def target(path: str) -> StoredTarget:
    return StoredTarget(path)


class LocationParameter(config.TextSetting):
    """A corpus or output location, refused when it is parsed if nothing can serve it,
    so a bad ``--output`` is one clear line before any work starts."""

    def normalize(self, value):
        value = super().normalize(value)
        if value:
            storage.backend_for(value)  # unknown scheme or missing credentials: say so now
            if len(value) > 1:
                value = value.rstrip("/")  # "out/" and "out" are one output, never "out//shards"
        return value


class OutputParameter(LocationParameter):
    """``--output``, the output folder, in its one spelling (``storage.canonical``: an
    absolute local path, a bucket URL without a trailing slash), by which pods, leases and
    the ledger find it.

    Luigi calls ``task.output()`` for a task's target, so a parameter named ``output``
    would hide that method. This one keeps the folder in ``task.output_location`` and
    leaves ``task.output`` meaning the task's ``output_target`` method.
    """

    def normalize(self, value):
        return storage.canonical(super().normalize(value))

    def __set__(self, task, value):
        task.__dict__["output_location"] = value

    def __get__(self, task, owner=None):
        return self if task is None else task.output_target


class RunParameters:
    """The parameters every task of a run shares (``--corpus``, ``--output``, …)."""

    corpus = config.parameter("corpus", LocationParameter)
    output = config.parameter("output", OutputParameter)
    pattern = config.parameter("pattern")
    docs_per_shard = config.parameter("docs_per_shard")
    model = config.parameter("model")
    model_path = config.parameter("model_path")
    max_tokens = config.parameter("max_tokens")
    batch_tokens = config.parameter("batch_tokens")
    device = config.parameter("device")
    precision = config.parameter("precision")
    vector_dtype = config.parameter("vector_dtype")
    dimensions = config.parameter("dimensions")
    compact_columns = config.parameter("compact_columns")
    readers = config.parameter("readers", significant=False)
    add_new_documents = config.parameter("add_new_documents")
    sync = config.parameter("sync")
    skip_duplicates = config.parameter("skip_duplicates")

    def clone(self, cls=None, **kwargs):
        """Luigi's clone, reading values from ``param_kwargs`` (see OutputParameter)."""
        cls = cls or self.__class__
        shared = {name: self.param_kwargs[name] for name, _ in cls.get_params() if name in self.param_kwargs}
        return cls(**{**shared, **kwargs})

    def corpus_location(self) -> str:
        if not self.corpus:
            return ensure_sample_corpus()
        if storage.is_remote(self.corpus):
            return self.corpus  # LocationParameter already dropped a trailing slash
        return str(storage.local_path(self.corpus).resolve())

    def layout(self) -> OutputLayout:
        return OutputLayout.of(self.output_location)

    def manifest_path(self) -> str:
        return self.layout().manifest

    def embedder(self) -> Embedder:
        return load_embedder(EmbedderSettings(self.model, self.model_path, self.device, self.max_tokens, self.batch_tokens,
                                              self.precision, self.dimensions))

    def identity(self) -> OutputIdentity:
        """What the output this run makes is (``core/output_identity.py``)."""
        return OutputIdentity.of({name: getattr(self, name) for name in DEFINING} | {"corpus": self.corpus_location()})

    def vector_format(self) -> VectorFormat:
        return VectorFormat.parse(self.vector_dtype, self.compact_columns)

    def total_shards(self) -> int:
        return int(manifest_info(self.manifest_path())["shards"])

    def on_failure(self, exception):
        """The error text the web view shows for a failed task: the one line for a
        problem the user can fix, else the error first and its traceback under it."""
        if isinstance(exception, PipelineError):
            return f"{self.task_family}: {exception}"
        trace = "".join(traceback.format_exception(type(exception), exception, exception.__traceback__))
        return f"{self.task_family} failed: {type(exception).__name__}: {exception}\n\n{trace}"


class CorpusManifest(RunParameters, luigi.Task):
    """Lists the corpus once; shard membership never moves after this."""

    def output_target(self):
        return target(self.manifest_path())

    def run(self):
        count = self.write()
        self.set_status_message(f"{count} documents in {-(-count // self.docs_per_shard)} shards")

    def write(self) -> int:
        return planning.write_run_manifest(self)


class EmbedShard(RunParameters, luigi.Task):
    """One Parquet shard of ``docs_per_shard`` documents, published atomically."""

    shard = luigi.IntParameter()

    def requires(self):
        return self.clone(CorpusManifest)

    def output_target(self):
        return target(self.layout().shard(self.shard))

    def complete(self):
        """Published, as one listing of the output's shards shared by every shard's task
        in this process says (``shard_listing``), not one request per shard."""
        return self.shard in published_shards(self.output_location).numbers

    def run(self):
        if storage.exists(self.output().path):  # published since the listing this task was scheduled by
            log.info("%s is already published (by another worker): nothing to do", self.output().path)
            return
        self._post_run_figures()
        try:
            total, embedder = self.total_shards(), self.embedder()
            job = ShardJob.of_output(self.identity(), self.manifest_path(), self.output_location, total,
                                     readers=reader_processes(self.readers, embedder.runs_off_cpu))
            stats = run_shard(job, self.shard, embedder, report=lambda message, percent: web_view.show(self, message, percent))
            note_published(self.output_location, self.shard)
        except Exception:  # the run's figures say so too; on_failure comes too late to post them
            self._post_run_figures(failed=True)
            raise
        web_view.show(self, f"{shard_label(self.shard, total)}: {stats['embedded_documents']} documents embedded, "
                            f"{stats['rejected_documents']} rejected, {stats['chunks']:,} chunks, "
                            f"{stats['tokens'] / max(stats['seconds'], 1e-9):,.0f} tokens/s", 100)
        self._post_run_figures()

    def _post_run_figures(self, failed: bool = False) -> None:
        """The whole run's figures on its EmbedAll, which waits while its shards run."""
        web_view.post_run_figures(self, self.clone(EmbedAll).task_id, self.output_location, self.total_shards(), self.shard,
                                  failed=failed)


class EmbedAll(RunParameters, luigi.Task):
    """Every shard of the corpus, then ``_SUCCESS.json`` with the run's figures."""

    def requires(self):
        """The manifest and every shard. Listing the shards here, when Luigi schedules,
        rather than yielding them from ``run``, is what lets several worker processes
        share one run on a central scheduler: luigid gives a task only to workers that
        scheduled it, so each worker must schedule every shard. The plan (``planning``)
        writes the manifest when missing, so that workers started at the same moment
        all see it, and is made once per build.

        Any problem (a missing corpus, an output made with other settings) leaves just
        the manifest: its own task, or ``run``, then reports it as one clear line."""
        manifest = self.clone(CorpusManifest)
        forget_listings(self.output_location)  # the shards' complete() below: one listing, made now
        try:
            plan = planning.planned(self)
        except Exception:  # reported by the tasks that run, not as a scheduling traceback
            return manifest
        return [manifest, *self.shards(plan.shards)]

    def grow_manifest(self) -> int:
        return planning.grow_manifest(self)

    def sync_manifest(self):
        return planning.sync_manifest(self)

    def check_manifest_matches(self) -> int:
        return planning.check_manifest_matches(self)

    def shards(self, total: int) -> list[EmbedShard]:
        return [self.clone(EmbedShard, shard=i) for i in range(total)]

    def output_target(self):
        return target(self.layout().summary)

    def complete(self):
        """Done when ``_SUCCESS.json`` exists, records this run's identity (every setting
        that defines the output) and counts the manifest's shards as it is now (it may have
        grown since). A rerun with another identity is not 'done': it runs, and the check
        before it refuses it in one line naming the setting, instead of exiting 0 having
        done nothing."""
        path = self.output().path
        if self.add_new_documents or self.sync or not storage.exists(path):
            return False  # asked to look for changes in the corpus: requires() looks
        summary = json.loads(storage.read_text(path))
        return not self.identity().differences(summary.get("parameters", {})) and summary.get("shards") == self.total_shards()

    def run(self):
        planning.planned(self)  # a plan that failed in requires() fails here, as one line
        total = planning.check_output_matches_settings(self)
        while True:
            shards = self.shards(total)
            done = sum(shard.complete() for shard in shards)
            web_view.show(self, f"{done}/{total} shards done", int(100 * done / total))
            yield shards  # already done when requires() listed them (one worker) or others ran them
            grown = self.total_shards()
            if grown == total:
                break
            log.info("the manifest grew to %d shards during this run (--add-new-documents elsewhere): those too", grown)
            total = grown
        summary = run_summary(self.output_location, total, self.identity().as_dict())
        if self.add_new_documents or self.sync:  # asked to follow the corpus: what it gained during the run
            summary["documents_not_in_manifest"] = self._documents_left_out()
        info = manifest_info(self.manifest_path())
        if "generation" in info:  # a synced output: its totals count every generation's rows
            summary.update(generation=int(info["generation"]), current_documents=int(info["current_documents"]))
        publish_summary(self.output_location, summary)
        web_view.show(self, f"{total}/{total} shards, {summary['documents']} documents ({summary['rejected_documents']} rejected), "
                            f"{summary['chunks']} chunks, {summary['tokens_per_second']:.0f} tokens/s"
                            + (f"; {summary['documents_not_in_manifest']} documents added to the corpus since the manifest "
                               "are not in this run (--add-new-documents)" if summary.get("documents_not_in_manifest") else ""),
                     100)

    def _documents_left_out(self) -> int:
        """Documents the corpus gained after the manifest was brought up to date at the
        start of this run (``--add-new-documents``, ``--sync``): the next such run takes
        them. A run not asked to follow the corpus never lists it again here: at 10
        million documents that is a second full listing (and, for a local corpus, a read
        of every byte)."""
        count, first = 0, None
        for document in documents_not_in_manifest(self.corpus_location(), self.pattern, self.manifest_path()):
            count, first = count + 1, first or document.relative
        if count:
            log.warning("%d document(s) in the corpus are not in the manifest (first: %s): added after it was written, "
                        "they are not in this run; rerun with --add-new-documents to embed them as new shards", count, first)
        return count
