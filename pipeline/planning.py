"""What a run will do, decided before Luigi schedules its shards: the manifest written
when missing (or grown with ``--add-new-documents``), the output checked against the
run's settings, and how many shards there are.

These are plain functions of a run's parameters (an ``EmbedAll``, or anything with its
methods), so they are tested without a scheduler and the Luigi tasks keep no state.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline import storage
from pipeline.core.corpus import manifest_info, write_manifest
from pipeline.core.matryoshka import check_dimensions
from pipeline.core.profiles import profile
from pipeline.core.manifest_growth import add_new_documents
from pipeline.core.sync import SyncResult, sync_output
from pipeline.core.output_identity import recorded_identity, refusal
from pipeline.core.shard_file import SHARED_SETTINGS, settings_mismatch
from pipeline.core.shard_job import shard_settings
from pipeline.errors import PipelineError
from pipeline.output.footers import ShardFooter
from pipeline.output.shard_listing import forget_listings

if TYPE_CHECKING:
    from pipeline.tasks import RunParameters

log = logging.getLogger("luigi-interface")


@dataclass(frozen=True)
class RunPlan:
    """A run's shards, as the manifest held them when the run was planned."""

    shards: int


def plan_run(run: "RunParameters") -> RunPlan:
    """Write the manifest if it is missing, else sync it with the corpus when ``sync``
    (or grow it when ``add_new_documents``);
    then refuse an output made from another corpus or with other settings (PipelineError)."""
    check_vector_settings(run)
    if not storage.exists(run.manifest_path()):
        write_run_manifest(run)
    elif run.sync:
        sync_manifest(run)
    elif run.add_new_documents:
        grow_manifest(run)
    return RunPlan(shards=check_output_matches_settings(run))


# Luigi asks a task for its requirements when it schedules it and again just before it
# runs it. The second answer must name the same shards (another worker's
# --add-new-documents may have grown the manifest meanwhile: EmbedAll.run takes those
# on), and must not list the corpus again; so each run is planned once per build.
# Keyed by every parameter, as Luigi's own task cache is: ``--add-new-documents`` does not
# change a task's id, but it changes the plan.
_plans: dict[str, RunPlan] = {}


def planned(run: "RunParameters") -> RunPlan:
    """The run's plan, made on the first call of a build (``plan_run``)."""
    key = repr(sorted(run.param_kwargs.items()))
    if key not in _plans:
        _plans[key] = plan_run(run)
    return _plans[key]


def forget_plans() -> None:
    """Before another build in this process: plan afresh (list new shards and documents,
    and the shards published)."""
    _plans.clear()
    forget_listings()


def write_run_manifest(run: "RunParameters") -> int:
    """List the corpus into the manifest; the number of documents. Atomic: with several
    workers writing at once, the first complete manifest stands."""
    storage.ensure_writable_dir(run.output_location)
    return write_manifest(run.corpus_location(), run.pattern, run.docs_per_shard, run.manifest_path())


def grow_manifest(run: "RunParameters") -> int:
    """``--add-new-documents``: append the corpus's new documents to the manifest as new
    shards, after checking it is this corpus's manifest; how many."""
    check_manifest_matches(run)  # never append another corpus's files
    added = add_new_documents(run.corpus_location(), run.pattern, run.manifest_path())
    log.info("%d documents added to the corpus since the manifest was written: new shards", added)
    return added


def sync_manifest(run: "RunParameters") -> SyncResult:
    """``--sync``: record what changed in the corpus since the manifest (new, changed,
    moved and deleted documents) as a new generation; the new shards are then the run's
    missing shards."""
    check_output_matches_settings(run)  # never sync another corpus's output, or one made otherwise
    result = sync_output(run.corpus_location(), run.pattern, run.output_location, skip_duplicates=run.skip_duplicates)
    log.info("%s: %s", run.output_location, result.describe())
    return result


def check_vector_settings(run: "RunParameters") -> None:
    """Refuse an unknown vector dtype or compact column, or dimensions the model is not
    trained for, before anything is listed or embedded (loads no model)."""
    model_profile = profile(run.model)
    dimension = check_dimensions(model_profile, run.dimensions) or model_profile.dimension
    run.vector_format().check(dimension)


def check_manifest_matches(run: "RunParameters") -> int:
    """Refuse an output listed from another corpus, pattern or shard size (its manifest
    says); the manifest's shard count. Loads no model (the Runpod launcher asks too)."""
    info = manifest_info(run.manifest_path())
    listed = {name: info[name] for name in ("corpus", "pattern", "docs_per_shard")}
    _refuse(run, run.identity().differences(listed, names=listed))
    return int(info["shards"])


def check_output_matches_settings(run: "RunParameters") -> int:
    """Refuse to add to an output made with another value of any setting that defines it
    (``OutputIdentity``: the manifest and the first shard say), or with the same settings
    and other weights or another chunker (the shard's own record); the manifest's shard
    count. Only the last check loads the model."""
    total = check_manifest_matches(run)
    first_shard = run.layout().first_shard()
    if first_shard:
        existing = ShardFooter.read(*first_shard)
        identity = run.identity()
        recorded = recorded_identity(existing.settings)
        if recorded is not None:
            _refuse(run, identity.differences(recorded))
        else:  # a shard made before shards recorded their identity: its stats and the summary say
            skipped = _skipped_duplicates(run, existing.stats)
            if skipped is not None and skipped != run.skip_duplicates:
                _refuse(run, [f"skip_duplicates: {skipped} in the output, {run.skip_duplicates} now"])
        _refuse(run, settings_mismatch(existing.settings, shard_settings(run.embedder(), identity.vector_format()),
                                       SHARED_SETTINGS))
    return total


def _skipped_duplicates(run: "RunParameters", stats: dict) -> bool | None:
    """Whether an older output's shards skip duplicates: their stats say, or for shards
    made before they did, the summary's parameters; None when nothing says."""
    if "skip_duplicates" in stats:
        return stats["skip_duplicates"]
    summary = run.layout().summary
    if storage.exists(summary):
        return json.loads(storage.read_text(summary)).get("parameters", {}).get("skip_duplicates", False)
    return None


def _refuse(run: "RunParameters", problems: list[str]) -> None:
    if problems:
        raise PipelineError(refusal(run.output_location, problems, run.identity()))
