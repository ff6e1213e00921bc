"""``python -m pipeline compact OUTPUT NEW_OUTPUT``: a synced output without its history.

Syncs never rewrite a shard, so superseded rows stay on disk. Compacting writes a new
output that holds only the current view: each shard with a current row, in order and
numbered again from 0, with its current rows under their current doc id and path (moved
documents need no re-keying there), its current rejections, footer stats counted afresh,
a manifest of generation 0 and a summary. ``OUTPUT`` is verified first and left as it is;
the new output is verified after. Every file is published in one step and the summary
last, so a compaction cut short leaves an output that ``verify`` calls unfinished, and a
rerun writes it again whole.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.core.corpus import manifest_info
from pipeline.core.generations import GENERATION_FIELDS, is_current, shard_view
from pipeline.core.output_identity import OutputIdentity, recorded_identity
from pipeline.core.shard_file import CHUNK_SCHEMA, footer_settings, rows_table, shard_metadata, shard_schema
from pipeline.core.shard_job import publish_rejects
from pipeline.core.sync import read_manifest
from pipeline.core.vector_format import VectorFormat, stored_vectors
from pipeline.errors import PipelineError
from pipeline.output.layout import OutputLayout
from pipeline.output.read_back import current_rows, read_shard
from pipeline.output.summary import run_summary
from pipeline.output.verify import Verdict, verify_output


def compact_output(output: str, destination: str, on_shard: Optional[Callable[[int], None]] = None,
                   vector_format: Optional[VectorFormat] = None) -> Verdict:
    """Write ``destination`` from ``output``'s current view (its vectors stored as
    ``vector_format`` says, if given); the destination's verdict."""
    source, target = OutputLayout.of(output), OutputLayout.of(destination)
    if source.root == target.root:
        raise PipelineError("compact writes a new output: give another folder or prefix than the output itself")
    if storage.exists(target.summary):
        raise PipelineError(f"{target.root} is already a finished output: compact into a new folder or prefix")
    before = verify_output(source.root)
    if not before.ok:
        raise PipelineError(f"{source.root} does not verify ({len(before.problems)} problem(s), first: "
                            f"{before.problems[0]}): compact only a whole output")
    if vector_format is not None:
        _check_conversion(source, vector_format)
    storage.ensure_writable_dir(target.root)
    manifest = read_manifest(source.manifest)
    current = manifest.filter(is_current(manifest))
    kept = sorted(set(current["shard"].to_pylist()))
    renumber = {old: new for new, old in enumerate(kept)}
    for old in kept:
        _copy_shard(source, target, old, renumber[old], manifest.filter(pc.equal(manifest["shard"], old)), vector_format)
        if on_shard:
            on_shard(len(kept))
    info = footer_settings(manifest.schema.metadata)
    rows = current.drop_columns([field.name for field in GENERATION_FIELDS]).set_column(
        current.schema.get_field_index("shard"), "shard",
        pa.array([renumber[s] for s in current["shard"].to_pylist()], pa.int32()))
    metadata = {f"pipeline.{key}": info[key] for key in ("corpus", "pattern", "docs_per_shard", "created_at") if key in info}
    metadata.update({"pipeline.documents": str(rows.num_rows), "pipeline.shards": str(len(kept)),
                     "pipeline.compacted_from": source.root, "pipeline.compacted_generation": info.get("generation", "0")})
    with storage.atomic_output(target.manifest) as staged:
        pq.write_table(rows.replace_schema_metadata(metadata), staged.path)
    parameters = _parameters(source)
    if vector_format is not None:  # the summary's identity says how the vectors are stored now
        parameters.update(vector_dtype=vector_format.dtype, compact_columns=",".join(vector_format.compact))
    with storage.atomic_output(target.summary) as staged:
        staged.path.write_text(json.dumps(run_summary(target.root, len(kept), parameters), indent=2))
    return verify_output(target.root)


def target_format(output: str, vector_dtype: Optional[str], compact_columns: Optional[str]) -> Optional[VectorFormat]:
    """The format ``--vector-dtype`` / ``--compact-columns`` ask for (what is not given
    stays as the output has it); None when neither is given."""
    if vector_dtype is None and compact_columns is None:
        return None
    first = OutputLayout.of(output).first_shard()
    now = VectorFormat.of(shard_metadata(first[1])) if first else VectorFormat()
    return VectorFormat.parse(vector_dtype or now.dtype, ",".join(now.compact) if compact_columns is None else compact_columns)


def _check_conversion(source: OutputLayout, vector_format: VectorFormat) -> None:
    first = source.first_shard()
    if first and VectorFormat.of(shard_metadata(first[1])).dtype == "float16" and vector_format.dtype == "float32":
        raise PipelineError(f"{source.root} stores float16 vectors: float32 would not bring their precision back")


def _copy_shard(source: OutputLayout, target: OutputLayout, old: int, new: int, rows: pa.Table,
                vector_format: Optional[VectorFormat]) -> None:
    """Shard ``old``'s current rows and rejections as shard ``new``, stats counted again."""
    view = shard_view(rows)
    table = current_rows(read_shard(source.shard(old), history=True), view)
    rejects = []
    if storage.exists(source.rejects_of(old)):
        for line in storage.read_text(source.rejects_of(old)).splitlines():
            record = json.loads(line)
            if view.keeps(record["doc_id"]):
                record["doc_id"], record["path"] = view.current[record["doc_id"]]
                rejects.append(record)
    embedded = set(table["doc_id"].to_pylist())
    settings = shard_metadata(source.shard(old))  # its stats are in the file's footer, not the schema's
    stats = json.loads(settings.pop("stats"))
    tokens = pc.sum(pc.struct_field(table["metadata"], "token_count")).as_py() or 0
    stats.update(shard=new, documents=len(view.current), embedded_documents=len(embedded),
                 rejected_documents=len(rejects), rejected_by_reason=dict(Counter(r["reason"] for r in rejects)),
                 chunks=table.num_rows, tokens=tokens)
    publish_rejects(target.root, new, rejects)
    if vector_format is not None:
        table, settings = _stored_as(table, settings, vector_format)
    metadata = {**{f"pipeline.{k}": v for k, v in settings.items()}, "pipeline.stats": json.dumps(stats, sort_keys=True)}
    with storage.atomic_output(target.shard(new)) as staged:
        pq.write_table(table.replace_schema_metadata(metadata), staged.path, compression="snappy")


def _stored_as(table: pa.Table, settings: dict[str, str], vector_format: VectorFormat) -> tuple[pa.Table, dict[str, str]]:
    """The rows with their vectors stored as ``vector_format`` says, and the settings
    that say so."""
    dimension = int(settings["dimension"])
    vector_format.check(dimension)
    settings = {key: value for key, value in settings.items() if key != "int8_range"}
    settings.update(vector_format.settings(dimension))
    recorded = recorded_identity(settings)
    if recorded is not None:  # the same output, stored otherwise: a run with these settings adds to it
        settings.update(OutputIdentity.of(recorded).with_vector_format(vector_format).footer())
    chunks = table.select([field.name for field in CHUNK_SCHEMA])
    return rows_table(shard_schema(dimension, settings), chunks, stored_vectors(table.column("embedding_vector"))), settings


def _parameters(source: OutputLayout) -> dict:
    if storage.exists(source.summary):
        return json.loads(storage.read_text(source.summary)).get("parameters", {})
    return {"corpus": manifest_info(source.manifest).get("corpus")}
