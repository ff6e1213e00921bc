"""Making the next items in a background thread while the caller works on the current ones.

The shard job reads and chunks documents here while the model runs: the tokenizer and
torch release the GIL, and on a GPU the model thread mostly waits for kernels.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

Item = TypeVar("Item")
_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def read_ahead(items: Iterator[Item], capacity: int, take: int) -> Iterator[list[Item]]:
    """Lists of the items made so far, in order: at least one (waiting for it if none is
    ready), at most ``take``. A background thread makes up to ``capacity`` items ahead.

    Taking what is ready, rather than a fixed count, means the caller never waits for
    more than one item, and when the maker is faster than the caller its lists grow to
    ``take``. An error in the maker is raised to the caller; when the caller stops,
    the maker stops after the item it is making."""
    ready: queue.Queue = queue.Queue(maxsize=capacity)
    stop = threading.Event()

    def offer(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def make() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
        except BaseException as error:  # handed to the caller, who decides
            offer(_Failed(error))
            return
        offer(_END)

    maker = threading.Thread(target=make, name="read-ahead", daemon=True)
    maker.start()
    try:
        finished = False
        while not finished:
            batch: list[Item] = []
            entry = ready.get()
            while True:
                if entry is _END:
                    finished = True
                    break
                if isinstance(entry, _Failed):
                    raise entry.error
                batch.append(entry)
                if len(batch) >= take:
                    break
                try:
                    entry = ready.get_nowait()
                except queue.Empty:
                    break
            if batch:
                yield batch
    finally:
        stop.set()
        maker.join()
