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

    Documents are written a group at a time (on a CPU often the whole shard at once),
    so progress counts each document done as its chunks are embedded: a batch of a
    group's tokens moves the count by that share of the group's documents.

    The Luigi reporter is throttled: against a central scheduler every call is an
    HTTP request, and a shard may finish thousands of documents a minute.
    """

    def __init__(self, total_documents: int, label: str, report: Optional[Reporter] = None, interval: float = 2.0):
        self.total = total_documents
        self.label = label
        self.report = report
        self.interval = interval
        self.documents = self.chunks = self.tokens = 0
        self.embedded = 0.0  # documents, counted by the share of their chunks' tokens embedded
        self.started = time.monotonic()
        self._last_report = 0.0
        self._lock = threading.Lock()  # the model's thread and the Parquet writer's both advance
        self.bar = tqdm(total=total_documents, desc=label, unit="doc", disable=None, dynamic_ncols=True, mininterval=0.5)

    def advance(self, documents: int, chunks: int = 0, tokens: int = 0, embedded: float = 0.0) -> None:
        """``documents`` written; ``chunks`` and ``tokens`` embedded, worth ``embedded``
        documents (a share of a group's; a group with nothing to embed counts when written)."""
        with self._lock:
            self._advance(documents, chunks, tokens, embedded)

    def _advance(self, documents: int, chunks: int, tokens: int, embedded: float) -> None:
        self.documents += documents
        self.chunks += chunks
        self.tokens += tokens
        self.embedded += embedded
        elapsed = max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix(chunks_s=f"{self.chunks / elapsed:.0f}", tokens_s=f"{self.tokens / elapsed:.0f}", refresh=False)
        self.bar.update(documents)
        now = time.monotonic()
        if self.report and (now - self._last_report >= self.interval or self.documents >= self.total):
            self._last_report = now
            self.report(self.message(), self.percent())

    def done(self) -> float:
        """Documents done, by the share of their tokens embedded; all, once all are written."""
        return float(self.total) if self.documents >= self.total else min(self.embedded, self.total)

    def percent(self) -> int:
        """Of the whole documents the message shows, so the bar and the text agree."""
        return 100 * int(self.done()) // self.total if self.total else 100

    def message(self) -> str:
        """Two lines, what matters first: the web view's message box does not wrap."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        done = self.done()
        rate = done / elapsed
        eta_text = format_duration((self.total - done) / rate) if rate else "unknown"
        return (
            f"{self.label}: {int(done)}/{self.total} documents, ETA {eta_text}\n"
            f"{self.tokens / elapsed:,.0f} tokens/s, {rate:.1f} docs/s, {self.chunks / elapsed:.1f} chunks/s, "
            f"{self.chunks:,} chunks"
        )

    def close(self) -> None:
        self.bar.close()


class LiveLine:
    """One line kept current: in place on a terminal (tqdm), and where there is none (a
    log file, CI) the same text logged when it says something new (``key`` changed) or
    ``log_every`` seconds after the last time, so a quiet wait still shows it is alive."""

    def __init__(self, logger, log_every: float = 60, clock: Callable[[], float] = time.monotonic):
        self.logger, self.log_every, self.clock = logger, log_every, clock
        self.bar = tqdm(bar_format="{desc}", disable=None, dynamic_ncols=True)
        self._key: object = None
        self._logged = float("-inf")

    def show(self, text: str, key: object) -> None:
        if not self.bar.disable:
            self.bar.set_description_str(text)
            return
        now = self.clock()
        if key != self._key or now - self._logged >= self.log_every:
            self.logger.info("%s", text)
            self._key, self._logged = key, now

    def close(self) -> None:
        self.bar.close()
