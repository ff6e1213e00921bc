"""The background reader the shard job overlaps with the model: order, errors, stopping."""

import threading
import time

import pytest

from pipeline.core.read_ahead import read_ahead


def test_every_item_arrives_once_in_order_in_lists_no_longer_than_take():
    lists = list(read_ahead(iter(range(100)), capacity=8, take=5))
    assert [item for chunk in lists for item in chunk] == list(range(100))
    assert all(1 <= len(chunk) <= 5 for chunk in lists)


def test_the_caller_gets_what_is_ready_instead_of_waiting_for_a_full_list():
    release = threading.Event()

    def slow():
        yield "first"
        release.wait(10)
        yield "second"

    lists = read_ahead(slow(), capacity=4, take=4)
    assert next(lists) == ["first"]  # does not wait for "second"
    release.set()
    assert next(lists) == ["second"]


def test_items_made_while_the_caller_works_are_taken_together():
    go = threading.Event()

    def gated():
        yield 0
        go.wait(10)
        yield from range(1, 6)

    lists = read_ahead(gated(), capacity=8, take=8)
    assert next(lists) == [0]
    go.set()
    time.sleep(0.3)  # the caller "embeds"; the maker makes the rest meanwhile
    assert next(lists) == [1, 2, 3, 4, 5]


def test_an_error_in_the_maker_reaches_the_caller_after_the_items_before_it():
    def failing():
        yield 1
        yield 2
        raise OSError("disk went away")

    seen = []
    with pytest.raises(OSError, match="disk went away"):
        for chunk in read_ahead(failing(), capacity=1, take=1):
            seen.extend(chunk)
    assert seen == [1, 2]


def test_a_caller_that_stops_stops_the_maker_within_capacity():
    made = []

    def endless():
        for i in range(10**9):
            made.append(i)
            yield i

    lists = read_ahead(endless(), capacity=3, take=1)
    assert next(lists) == [0]
    lists.close()  # what a failing shard does to it
    count = len(made)
    time.sleep(0.3)
    assert len(made) == count <= 1 + 3 + 2  # taken, queued, one waiting to be queued, one in hand
    assert not any(t.name == "read-ahead" for t in threading.enumerate())
