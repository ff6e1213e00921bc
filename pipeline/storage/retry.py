"""Which storage errors are transient, and the one retry policy every bucket call runs
under (jittered exponential backoff, ``errors.backoff``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

from pipeline.errors import PipelineError, backoff, is_network_error
from pipeline.settings import default

log = logging.getLogger("luigi-interface")



T = TypeVar("T")
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


class StorageError(PipelineError):
    """A storage call that failed for good: permanent, or transient past every retry.

    It fails the task (a rerun resumes); it never turns a document into a rejection."""





def status_of(exc: BaseException) -> Optional[int]:
    code = getattr(exc, "code", None)  # google.api_core exceptions
    if isinstance(code, int):
        return code
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    status = getattr(response, "status_code", None)  # google-resumable-media's InvalidResponse
    return status if isinstance(status, int) else None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: rate limits, server errors, dropped connections, timeouts."""
    status = status_of(exc)
    if status is not None:
        return status in _TRANSIENT_STATUS
    return is_network_error(exc)


def describe(exc: BaseException) -> str:
    status = status_of(exc)
    message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    if len(message) > 300:
        message = message[:300] + "…"
    return f"HTTP {status}: {message}" if status else f"{exc.__class__.__name__}: {message}"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a storage call tries: ``attempts``, the first included, and at most
    ``max_wait`` seconds between two (docs/storage.md)."""

    attempts: int = default("storage_retries")
    max_wait: float = default("storage_retry_max_wait")


_retry_policy = RetryPolicy()


def use_retry_policy(policy: RetryPolicy) -> RetryPolicy:
    """Set how this process's storage calls retry (a run sets it from its settings:
    ``config.prepare_run``); returns the policy it replaces."""
    global _retry_policy
    previous, _retry_policy = _retry_policy, policy
    return previous


def retrying(action: str, path: str, call: Callable[[], T]) -> T:
    """Run ``call``, retrying transient errors with jittered exponential backoff."""
    attempts, max_wait = _retry_policy.attempts, _retry_policy.max_wait

    def on_retry(exc: BaseException, attempt: int, wait: float) -> None:
        log.warning("%s %s: %s; retry %d of %d in %.1fs", action, path, describe(exc), attempt, attempts - 1, wait)

    retryer = backoff(is_transient, attempts, max_wait, on_retry)
    try:
        return retryer(call)
    except (FileNotFoundError, FileExistsError, PipelineError):
        raise
    except Exception as exc:
        gave_up = f" (gave up after {attempts} attempts)" if is_transient(exc) else ""
        raise StorageError(f"{action} {path}: {describe(exc)}{gave_up}") from exc
