"""Run settings, as Luigi parameters, and what a run does to its process when it starts.

Precedence, highest first: the Luigi command line (``--corpus …``), a task's own
section in luigi.cfg, ``PIPELINE_*`` environment variables (also read from a ``.env``
file), the ``[pipeline]`` section of luigi.cfg, and the defaults below.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Optional

import luigi
from dotenv import dotenv_values, find_dotenv, load_dotenv
from luigi.parameter import _no_value

from pipeline.core.profiles import offline_model_hub
from pipeline.errors import install_one_line_errors
from pipeline.settings import SETTINGS, declared
from pipeline.storage import RetryPolicy, use_retry_policy

SECTION = "pipeline"

# Setting name -> built-in default (as text), from the one declaration of each setting.
DEFAULTS = {declared.name: declared.default for declared in SETTINGS if not declared.flag_only}


# Luigi exits 0 after a failed task unless [retcode] is configured. luigi.cfg sets it,
# but a run started outside the repository may not find luigi.cfg, so a run supplies
# the same values wherever the config has none (prepare_run).
RETCODES = {
    "already_running": "10",
    "missing_data": "20",
    "not_run": "25",
    "task_failed": "30",
    "scheduling_error": "35",
    "unhandled_exception": "40",
}


def gpu_type_list(setting_value: str) -> tuple[str, ...]:
    """GPU types from their comma-separated setting, in order of preference."""
    return tuple(g.strip() for g in setting_value.split(",") if g.strip())


def setting(name: str) -> str:
    """The configured default of one run setting, before the command line: ``PIPELINE_<NAME>``
    from the environment, then from a ``.env`` file, then luigi.cfg's ``[pipeline]``, then
    the declared default. Read when asked, so importing the package changes nothing."""
    return setting_and_source(name)[0]


def setting_and_source(name: str) -> tuple[str, str]:
    """A setting's configured value and where it came from (``setting``)."""
    variable = declared(name).env
    if variable in os.environ:
        return os.environ[variable], "environment"
    value = _dotenv_values(os.getcwd()).get(variable)
    if value is not None:
        return value, ".env"
    config = luigi.configuration.get_config()
    if config.has_option(SECTION, name):
        return config.get(SECTION, name), f"luigi.cfg [{SECTION}]"
    return DEFAULTS[name], "default"


@lru_cache(maxsize=8)
def _dotenv_values(folder: str) -> dict[str, str | None]:
    """The ``.env`` found from ``folder`` upwards, read once per process and folder."""
    return dotenv_values(find_dotenv(usecwd=True))


class SettingParameter:
    """A Luigi parameter whose default is the run setting of the same name (``setting``:
    another name), looked up when a task is made rather than when this module loads.

    Luigi has no public hook for a default computed late, so this is the one place that
    uses its private ``_value_iterator`` and ``_no_value`` (tests/test_config.py)."""

    def __init__(self, *args, setting: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self._default = _no_value  # BoolParameter puts False here; the setting decides instead
        self._setting = setting

    def _value_iterator(self, task_name, param_name):
        yield from super()._value_iterator(task_name, param_name)  # command line, then [task] in luigi.cfg
        yield self.parse_setting(setting(self._setting or param_name)), None

    def parse_setting(self, value: str):
        return self.parse(value)


class TextSetting(SettingParameter, luigi.Parameter):
    pass


class IntSetting(SettingParameter, luigi.IntParameter):
    pass


class FloatSetting(SettingParameter, luigi.FloatParameter):
    pass


class BoolSetting(SettingParameter, luigi.BoolParameter):
    def parse_setting(self, value: str) -> bool:
        return value.strip().lower() in ("1", "true", "yes")


_PARAMETER_CLASSES = {str: TextSetting, int: IntSetting, float: FloatSetting, bool: BoolSetting}


def parameter(name: str, cls: type | None = None, **luigi_kwargs) -> luigi.Parameter:
    """The Luigi parameter of the declared setting ``name`` (pipeline/settings.py): its type
    (or ``cls``, a ``SettingParameter``), its help as description, and its default read
    from the setting when a task is made. A command-line switch (``flag_only``) is a plain
    ``BoolParameter`` that never changes a task's id."""
    declaration = declared(name)
    if declaration.flag_only:
        return luigi.BoolParameter(significant=False, description=declaration.help, **luigi_kwargs)
    cls = cls or _PARAMETER_CLASSES[declaration.kind]
    return cls(setting=name, description=declaration.help, **luigi_kwargs)


def prepare_run(exit_codes: bool = True) -> None:
    """What a run needs in its process, done where the run starts, never on import:
    ``.env``'s variables (credentials too) in the environment without overriding it, the
    model hub off, storage retries as the settings say, a ``PipelineError`` logged by
    Luigi as one line and, with
    ``exit_codes``, Luigi exit codes that report a failure even without luigi.cfg."""
    load_dotenv(find_dotenv(usecwd=True), override=False)
    offline_model_hub()
    install_one_line_errors()
    use_retry_policy(RetryPolicy(int(setting("storage_retries")), float(setting("storage_retry_max_wait"))))
    if exit_codes:
        config = luigi.configuration.get_config()
        if not config.has_section("retcode"):
            config.add_section("retcode")
        for name, code in RETCODES.items():
            if not config.has_option("retcode", name):
                config.set("retcode", name, code)


def configured_history() -> Optional[Path]:
    """luigid's task history (sqlite) as luigi.cfg names it, for status and the report."""
    from pipeline.output.status import history_file

    return history_file(luigi.configuration.get_config().get("task_history", "db_connection", ""))


def started_by_luigi_command_line() -> bool:
    """Whether this process is ``luigi --module pipeline …`` (or ``python -m luigi``)
    loading the package to run it: the one place where that run can be prepared before
    Luigi reads its exit codes."""
    program = Path(sys.argv[0]).name if sys.argv else ""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return program == "luigi" or (spec is not None and spec.name == "luigi.__main__")
