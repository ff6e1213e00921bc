"""Progress on the terminal (tqdm) and in the Luigi web view, from the same figures."""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from tqdm import tqdm

Reporter = Callable[[str, int], None]  # (status message, percent)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Counts documents, chunks and tokens; shows rates and ETA.

    The Luigi reporter is throttled: against a central scheduler every call is an
    HTTP request, and a shard may finish thousands of documents a minute.
    """

    def __init__(self, total_documents: int, label: str, report: Optional[Reporter] = None, interval: float = 2.0):
        self.total = total_documents
        self.label = label
        self.report = report
        self.interval = interval
        self.documents = self.chunks = self.tokens = 0
        self.started = time.monotonic()
        self._last_report = 0.0
        self._lock = threading.Lock()  # the model's thread and the Parquet writer's both advance
        self.bar = tqdm(total=total_documents, desc=label, unit="doc", disable=None, dynamic_ncols=True, mininterval=0.5)

    def advance(self, documents: int, chunks: int = 0, tokens: int = 0) -> None:
        with self._lock:
            self._advance(documents, chunks, tokens)

    def _advance(self, documents: int, chunks: int, tokens: int) -> None:
        self.documents += documents
        self.chunks += chunks
        self.tokens += tokens
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix(chunks_s=f"{self.chunks / elapsed:.0f}", tokens_s=f"{self.tokens / elapsed:.0f}", refresh=False)
        self.bar.update(documents)
        now = time.monotonic()
        if self.report and (now - self._last_report >= self.interval or self.documents >= self.total):
            self._last_report = now
            self.report(self.message(), self.percent())

    def percent(self) -> int:
        return int(100 * self.documents / self.total) if self.total else 100

    def message(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.documents / elapsed
        eta = (self.total - self.documents) / rate if rate else float("nan")
        eta_text = format_duration(eta) if rate else "unknown"
        return (
            f"{self.label}: {self.documents}/{self.total} documents, {self.chunks} chunks, "
            f"{self.documents / elapsed:.1f} docs/s, {self.chunks / elapsed:.1f} chunks/s, "
            f"{self.tokens / elapsed:.0f} tokens/s, ETA {eta_text}"
        )

    def close(self) -> None:
        self.bar.close()
