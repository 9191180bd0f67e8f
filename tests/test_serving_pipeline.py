"""serving.pipeline.in_order: the job's streams each take the next chunk and infer it; results come
back in input order, memory stays bounded, and an error or an early stop ends every thread."""

from __future__ import annotations

import threading
import time

import pytest

from serving.pipeline import in_order


def _streams() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("stream-")]


class Items:
    """0, 1, ... n-1, recording which thread took each, whether it was closed, and the most items
    taken at once but not yet handed on by in_order (`consumed` is advanced by the test)."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at = n, fail_at
        self.takers: dict[int, str] = {}
        self.closed = False
        self.consumed = 0
        self.most_outstanding = 0

    def __iter__(self):
        return self._gen()

    def _gen(self):
        try:
            for i in range(self.n):
                if i == self.fail_at:
                    raise ValueError(f"item {i} unreadable")
                self.takers[i] = threading.current_thread().name
                self.most_outstanding = max(self.most_outstanding, i + 1 - self.consumed)
                yield i
        finally:
            self.closed = True


def slow_first(i: int) -> int:
    """Early items take longest, so later ones finish first on the other threads."""
    time.sleep(0.002 * (i % 5 == 0) + 0.0005)
    return i * i


def test_results_come_back_in_input_order_from_several_threads() -> None:
    items = Items(200)
    got = list(in_order(iter(items), slow_first, threads=3, window=6))
    assert [i for i, _ in got] == list(range(200))
    assert all(r == i * i for i, r in got)
    assert len(set(items.takers.values())) > 1  # the items were read by more than one stream
    assert items.closed and not _streams()


def test_at_most_window_items_are_out_at_once() -> None:
    items = Items(60)
    for i, _ in in_order(iter(items), slow_first, threads=2, window=4):
        time.sleep(0.001)  # a slow consumer: the streams run ahead as far as they may
        items.consumed = i + 1
    assert items.most_outstanding <= 4 + 1  # the window, and the one being handed on


@pytest.mark.parametrize("where", ["work", "items"])
def test_the_first_error_is_raised_and_every_stream_ends(where: str) -> None:
    items = Items(1000, fail_at=30 if where == "items" else None)

    def work(i: int) -> int:
        if where == "work" and i == 30:
            raise RuntimeError("session failed on item 30")
        return slow_first(i)

    seen = []
    with pytest.raises((RuntimeError, ValueError), match="item 30"):
        for i, _ in in_order(iter(items), work, threads=2, window=4):
            seen.append(i)
    assert seen == list(range(len(seen))) and len(seen) <= 30  # in order, and never past the bad item
    assert max(items.takers) < 40  # the streams stopped taking items
    assert items.closed and not _streams()


def test_a_consumer_that_stops_early_ends_the_streams_and_closes_the_items() -> None:
    items = Items(1000)
    gen = in_order(iter(items), slow_first, threads=2, window=4)
    for i, _ in gen:
        if i == 10:
            break
    gen.close()
    assert items.closed and not _streams()
    assert max(items.takers) < 20


def test_one_thread_and_a_bad_window() -> None:
    assert [r for _, r in in_order(iter(range(5)), lambda i: -i, threads=1, window=1)] == [0, -1, -2, -3, -4]
    with pytest.raises(ValueError, match="window"):
        list(in_order(iter(range(5)), lambda i: i, threads=3, window=2))
