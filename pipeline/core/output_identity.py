"""What an output is: the values of the settings that change a vector or the layout (those
declared ``defines_output`` in pipeline/settings.py).

One value, recorded in ``_SUCCESS.json`` and in every shard's footer, and compared by
everything that decides whether an output is done or may be added to: ``EmbedAll.complete``,
the check before a run (``planning``), ``EmbeddingInterface``'s cache and the shard job.
So "done" and "refused" follow from one rule: an output made with another value of any
of these settings is another output.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from pipeline.core.vector_format import VectorFormat
from pipeline.settings import DEFINING, declared

FOOTER_KEY = "identity"  # a shard's ``pipeline.identity`` metadata
# A change of these a finished output can take without embedding again (python -m pipeline compact).
CONVERTIBLE = ("vector_dtype", "compact_columns")


def _normal(name: str, value: Any) -> Any:
    setting = declared(name)
    return setting.parse(setting.text(value))


@dataclass(frozen=True)
class OutputIdentity:
    """The defining settings' values, in declaration order."""

    values: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> "OutputIdentity":
        """From a run's settings (every defining one must be there; others are ignored)."""
        missing = [name for name in DEFINING if name not in settings]
        if missing:
            raise KeyError(f"an output's identity needs {missing}")
        return cls(tuple((name, _normal(name, settings[name])) for name in DEFINING))

    def __getitem__(self, name: str) -> Any:
        return dict(self.values)[name]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def key(self) -> str:
        """A short stable digest, for names of things made with this identity."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def vector_format(self) -> VectorFormat:
        return VectorFormat.parse(self["vector_dtype"], self["compact_columns"])

    def differences(self, recorded: Mapping[str, Any], names: Optional[Iterable[str]] = None) -> list[str]:
        """Each defining setting (of ``names`` only, where given) whose value ``recorded``
        (an output's) differs from this one's, as "name: then in the output, now now". A
        setting an older output did not record had its default then."""
        compared = set(DEFINING if names is None else names)
        problems = []
        for name, now in self.values:
            if name not in compared:
                continue
            then = _normal(name, recorded[name] if name in recorded else declared(name).default)
            if then != now:
                problems.append(f"{name}: {then!r} in the output, {now!r} now")
        return problems

    def footer(self) -> dict[str, str]:
        """What a shard records: one metadata entry."""
        return {FOOTER_KEY: json.dumps(self.as_dict(), sort_keys=True)}

    def with_vector_format(self, vector_format: VectorFormat) -> "OutputIdentity":
        """The same output stored otherwise (what ``compact`` makes of it)."""
        return OutputIdentity.of({**self.as_dict(), "vector_dtype": vector_format.dtype,
                                  "compact_columns": ",".join(vector_format.compact)})


def recorded_identity(footer_settings: Mapping[str, str]) -> Optional[dict[str, Any]]:
    """The identity a shard recorded; None for a shard made before shards recorded one."""
    text = footer_settings.get(FOOTER_KEY)
    return json.loads(text) if text else None


def refusal(output: str, problems: list[str], now: OutputIdentity) -> str:
    """The one line that refuses to add to ``output``: each difference, and what to do."""
    convertible = [name for name in CONVERTIBLE if any(problem.startswith(name + ":") for problem in problems)]
    only_convertible = len(convertible) == len(problems)
    options = " ".join(f"--{name.replace('_', '-')} '{now[name]}'" for name in convertible)
    hint = (f"; a finished output can be converted into a new one stored so: python -m pipeline compact {output} "
            f"NEW_OUTPUT {options}" if convertible and only_convertible else "")
    return (f"output {output} was made with other settings ({'; '.join(problems)}); use a new --output, or the settings "
            f"it was made with{hint}")
