"""One exception type for problems a user can fix, shown as one clear line.

Luigi logs a full traceback for every failed task. For a missing corpus or an
unwritable output that buries the one sentence that matters, so a logging filter
replaces the traceback of a ``PipelineError`` with its message.
"""

import logging


class PipelineError(Exception):
    """A problem with the user's input or environment, explained in its message."""


class _OneLineForPipelineErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, PipelineError):
            record.msg = "%s"
            record.args = (exc,)
            record.exc_info = None
            record.exc_text = None
        return True


def install_one_line_errors() -> None:
    """Make Luigi's worker log a PipelineError as one line instead of a traceback."""
    for name in ("luigi-interface", "luigi"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OneLineForPipelineErrors) for f in logger.filters):
            logger.addFilter(_OneLineForPipelineErrors())
