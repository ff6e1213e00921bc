"""One exception type for problems a user can fix, shown as one clear line, and the
one retry policy for everything that fails transiently (buckets, the Runpod API).

Luigi logs a full traceback for every failed task. For a missing corpus or an
unwritable output that buries the one sentence that matters, so a logging filter
replaces the traceback of a ``PipelineError`` with its message.
"""

import logging
import time
from typing import Callable

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential


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


def backoff(
    transient: Callable[[BaseException], bool],
    attempts: int,
    max_wait: float,
    on_retry: Callable[[BaseException, int, float], None],
    sleep: Callable[[float], None] = time.sleep,
) -> Retrying:
    """Jittered exponential backoff up to ``max_wait`` for errors ``transient`` accepts;
    ``on_retry(error, attempt, wait)`` is told before each wait. The last error is raised."""
    return Retrying(
        retry=retry_if_exception(transient),
        wait=wait_random_exponential(multiplier=max_wait / 32, max=max_wait),
        stop=stop_after_attempt(attempts),
        before_sleep=lambda state: on_retry(state.outcome.exception(), state.attempt_number, state.next_action.sleep),
        reraise=True,
        sleep=sleep,
    )


# Exception class names that mean the connection failed or timed out, across requests,
# urllib3, botocore and google-cloud-storage: worth trying again.
_NETWORK_ERROR_NAMES = {
    "ConnectionError",  # requests
    "Timeout",
    "ChunkedEncodingError",
    "ProtocolError",  # urllib3
    "IncompleteRead",
    "EndpointConnectionError",  # botocore
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ResponseStreamingError",
    "DataCorruption",  # google-cloud-storage: a download that failed its checksum
}


def is_network_error(exc: BaseException) -> bool:
    """A dropped connection, a timeout or a broken transfer, from any client library."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return bool({cls.__name__ for cls in type(exc).__mro__} & _NETWORK_ERROR_NAMES)
