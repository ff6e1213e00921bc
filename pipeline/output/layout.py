"""Where everything of one output lives: the one module that spells its file and folder
names (tests/output/test_layout.py checks that no other module does).

An output folder, local or in a bucket, holds::

    manifest.parquet                 the corpus listing that fixes each shard's documents
    shards/shard-NNNNNN.parquet      the vectors, one file per shard: the checkpoint
    rejects/shard-NNNNNN.jsonl       the documents a shard rejected, and why
    changes/generation-NNNNNN.parquet  what each sync changed (``--sync``), its change log
    _SUCCESS.json                    the run summary, written last: the run is done
    _runs/pods/<pod id>.json         the pod ledger: what each Runpod pod cost
    _runs/launchers/<run id>.json    the leases of the launchers running pods for it
    _runs/evaluation.json            the last ``evaluate``'s retrieval figures (the report shows them)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from pipeline import storage

MANIFEST = "manifest.parquet"
SUMMARY = "_SUCCESS.json"
SHARDS = "shards"
REJECTS = "rejects"
CHANGES = "changes"
SHARD_SUFFIX = ".parquet"
REJECTS_SUFFIX = ".jsonl"
SHARD_FILE_PATTERN = "shard-NNNNNN.parquet"  # how messages name a shard file
_NUMBERED = re.compile(r"shard-(\d{6})")


def numbered_name(shard: int, suffix: str) -> str:
    return f"shard-{shard:06d}{suffix}"


def shard_number(name: str, suffix: str) -> int | None:
    """The number in a shard or rejects file name (``shard-000012.parquet``: 12); None
    for anything else, a hidden temp file a killed run left behind included."""
    match = _NUMBERED.fullmatch(name.removesuffix(suffix)) if name.endswith(suffix) else None
    return int(match.group(1)) if match else None


def require_manifest(output: "OutputLayout") -> str:
    """The output's manifest path; a clear error when no run has started there."""
    from pipeline.errors import PipelineError

    if not storage.exists(output.manifest):
        raise PipelineError(f"{output.root} has no {MANIFEST}: no run has started there")
    return output.manifest


@dataclass(frozen=True)
class Listing:
    """The numbered files of one folder of an output, from one listing."""

    numbers: dict[int, str]  # shard number -> file path
    strays: list[str]  # names in the folder that are no shard's file

    def paths(self) -> list[str]:
        return [self.numbers[number] for number in sorted(self.numbers)]


@dataclass(frozen=True)
class OutputLayout:
    """Every path of one output; ``OutputLayout.of("out/")`` and ``of("out")`` are one."""

    root: str

    @classmethod
    def of(cls, output: str | os.PathLike) -> "OutputLayout":
        output = os.fspath(output)
        return cls(output.rstrip("/") or output)

    @property
    def manifest(self) -> str:
        return f"{self.root}/{MANIFEST}"

    @property
    def summary(self) -> str:
        return f"{self.root}/{SUMMARY}"

    @property
    def shards(self) -> str:
        return f"{self.root}/{SHARDS}"

    @property
    def rejects(self) -> str:
        return f"{self.root}/{REJECTS}"

    @property
    def pods(self) -> str:
        return f"{self.root}/_runs/pods"

    @property
    def launchers(self) -> str:
        return f"{self.root}/_runs/launchers"

    @property
    def evaluation(self) -> str:
        return f"{self.root}/_runs/evaluation.json"

    @property
    def changes(self) -> str:
        return f"{self.root}/{CHANGES}"

    def change_log(self, generation: int) -> str:
        """The change log of the sync that made manifest generation ``generation``."""
        return f"{self.changes}/generation-{generation:06d}{SHARD_SUFFIX}"

    @classmethod
    def holding(cls, shard_path: str) -> tuple["OutputLayout", int]:
        """The output a shard file belongs to, and its number."""
        folder, _, name = shard_path.rpartition("/")
        root, _, shards = folder.rpartition("/")
        number = shard_number(name, SHARD_SUFFIX)
        if shards != SHARDS or number is None:
            raise ValueError(f"{shard_path} is not a shard of an output ({SHARDS}/{SHARD_FILE_PATTERN})")
        return cls.of(root), number

    def shard(self, number: int) -> str:
        return f"{self.shards}/{numbered_name(number, SHARD_SUFFIX)}"

    def rejects_of(self, number: int) -> str:
        return f"{self.rejects}/{numbered_name(number, REJECTS_SUFFIX)}"

    def pod_record(self, pod_id: str) -> str:
        return f"{self.pods}/{pod_id}.json"

    def batch_output(self, key: str) -> "OutputLayout":
        """The small output of its own that ``EmbeddingInterface.batch_process`` makes
        for one set of files (``key``: what names them)."""
        return OutputLayout(f"{self.root}/batches/batch-{key}")

    def launcher_lease(self, run_id: str) -> str:
        return f"{self.launchers}/{run_id}.json"

    def list_shards(self) -> Listing:
        """The published shard files, from one listing of ``shards/``."""
        return self._list(self.shards, SHARD_SUFFIX)

    def list_rejects(self) -> Listing:
        return self._list(self.rejects, REJECTS_SUFFIX)

    def first_shard(self) -> tuple[int, str] | None:
        """Any one published shard, (number, path): the first the listing meets, without
        listing them all."""
        for listed in storage.list_files(self.shards, f"*{SHARD_SUFFIX}", hashes=False):
            number = shard_number(listed.relative, SHARD_SUFFIX)
            if number is not None:
                return number, f"{self.shards}/{listed.relative}"
        return None

    @staticmethod
    def _list(folder: str, suffix: str) -> Listing:
        numbers, strays = {}, []
        for listed in storage.list_files(folder, f"*{suffix}", hashes=False):
            number = shard_number(listed.relative, suffix)
            if number is None or "/" in listed.relative:
                strays.append(f"{folder.rsplit('/', 1)[-1]}/{listed.relative}")
            else:
                numbers[number] = f"{folder}/{listed.relative}"
        return Listing(numbers, strays)
