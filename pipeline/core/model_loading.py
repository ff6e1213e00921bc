"""Loading a model folder with sentence-transformers, never executing a checkpoint's own code.

Every profile's architecture must ship in the installed transformers: a checkpoint's
remote code (``auto_map``, ``trust_remote_code``) was written for whatever transformers
its authors had, and nomic's fails under transformers 5. So the stack has floors, checked
before the libraries load, and a checkpoint whose ``model_type`` the installed
transformers does not know is refused with one line naming what to upgrade.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

from pipeline.core import nomic_layout
from pipeline.errors import PipelineError

# The oldest of each that runs every profile: transformers ships NomicBert (and its
# renaming of nomic's tensor names) from 5.5; the transformers an install resolves today
# disables PyTorch older than 2.6 and needs Python 3.11; sentence-transformers 6 has
# get_embedding_dimension. pyproject.toml and the image's default base carry the same.
PYTHON_FLOOR = (3, 11)
PACKAGE_FLOORS = {"torch": "2.6", "transformers": "5.5", "sentence-transformers": "6.0"}
# The first transformers that knows a model_type a profile needs.
MODEL_TYPE_FLOORS = {nomic_layout.MODEL_TYPE: "5.5"}


def stack_problems(python: tuple[int, int] | None = None, installed: dict[str, str] | None = None) -> list[str]:
    """What in this Python and its packages is below the floors (empty: all is well).
    ``python`` and ``installed`` stand in for this process's (tests)."""
    from packaging.version import Version

    python = python or sys.version_info[:2]
    problems = []
    if python < PYTHON_FLOOR:
        problems.append(f"Python {'.'.join(map(str, python))} (needs {'.'.join(map(str, PYTHON_FLOOR))} or newer)")
    for package, floor in PACKAGE_FLOORS.items():
        try:
            version = (installed or {}).get(package) or metadata.version(package)
        except metadata.PackageNotFoundError:
            problems.append(f"{package} is not installed (needs {floor} or newer)")
            continue
        if Version(version.split("+")[0]) < Version(floor):
            problems.append(f"{package} {version} (needs {floor} or newer)")
    return problems


def check_stack() -> None:
    """One line, before any model loads, where the stack cannot run the profiles."""
    problems = stack_problems()
    if not problems:
        return
    remedies = []
    if any(problem.startswith("Python") for problem in problems):
        remedies.append(f"use Python {'.'.join(map(str, PYTHON_FLOOR))} or newer")
    if any(not problem.startswith("Python") for problem in problems):
        floors = " ".join(f"'{package}>={floor}'" for package, floor in PACKAGE_FLOORS.items())
        remedies.append(f"upgrade with pip install -U {floors}")
    raise PipelineError(f"this environment cannot load the models: {'; '.join(problems)}; {', then '.join(remedies)}")


def check_model_type(config: dict, where: str) -> None:
    """Refuse, in one line, a checkpoint whose architecture the installed transformers lacks
    (its remote code is never run instead)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not model_type or model_type in CONFIG_MAPPING:
        return
    floor = MODEL_TYPE_FLOORS.get(model_type)
    needs = f"transformers>={floor}" if floor else "a transformers that ships it"
    raise PipelineError(f"model at {where} has model_type {model_type!r}, which transformers {metadata.version('transformers')} "
                        f"does not know, and its remote code is never run: upgrade to {needs} (pip install -U '{needs}')")


def read_config(model_path: str) -> dict:
    """A model folder's config.json (empty where it has none)."""
    path = Path(model_path) / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot read {path}: {exc}") from exc


def config_overrides(config: dict, where: str) -> dict:
    """What transformers' config class must be told to build the checkpoint's shape."""
    if config.get("model_type") == nomic_layout.MODEL_TYPE:
        return nomic_layout.native_config(config, where)
    return {}


def load_sentence_transformer(path: str, device: str):
    """A sentence-transformers model from a local folder, offline, with transformers' own
    modelling code only."""
    check_stack()
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    # transformers draws a "Loading weights" bar on stderr: noise in a run's log and in the
    # answer of ``search``, which load a model in a fraction of a second.
    transformers_logging.disable_progress_bar()
    config = read_config(path)
    check_model_type(config, path)
    try:
        return SentenceTransformer(path, device=device, trust_remote_code=False, local_files_only=True,
                                   config_kwargs=config_overrides(config, path))
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: weights of another shape than the config's
        raise PipelineError(f"cannot load model from {path}: {exc}") from exc
