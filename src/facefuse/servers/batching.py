"""Dynamic batching: requests that arrive together are run as one batch, so a GPU is fed full batches.

Callers submit single items (each with its caller's :class:`Deadline`) and wait on a future; one worker
thread collects items until the batch is full or the oldest item has waited ``max_wait_s`` (a lone item,
with nothing else queued behind it, does not wait at all), runs the batch function once, and hands each
caller its own result (or the batch's exception).

Work nobody waits for is not done: an item whose caller cancelled or whose deadline passed while it
was queued is dropped before the batch runs (its future gets the ``CancelledError``/``DeadlineError``),
a batch left with no live item is not run, and the batch function gets a stop check that raises once
every caller of the running batch is gone.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

from facefuse.errors import CancelledError, FacefuseError
from facefuse.packs.base import StopCheck
from facefuse.rpc.deadline import Deadline
from facefuse.rpc.metrics import observe_batch, set_queue_depth

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

_STOP = object()

BatchFunction = Callable[[Sequence[ItemT], StopCheck], Sequence[ResultT]]
"""run_batch(items, stop_check) -> one result per item; ``stop_check`` raises once no caller waits."""


class _Entry(Generic[ItemT, ResultT]):
    __slots__ = ("deadline", "future", "item")

    def __init__(self, item: ItemT, future: Future[ResultT], deadline: Deadline) -> None:
        self.item = item
        self.future = future
        self.deadline = deadline


class DynamicBatcher(Generic[ItemT, ResultT]):
    def __init__(
        self,
        run_batch: BatchFunction[ItemT, ResultT],
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.005,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._closed = False
        self.batches_run = 0
        self.largest_batch = 0
        self.items_dropped = 0
        """Items never run because their caller was gone by the time their batch started."""
        self._thread.start()

    def submit(self, item: ItemT, deadline: Deadline | None = None) -> Future[ResultT]:
        if self._closed:
            raise RuntimeError("batcher is closed")
        future: Future[ResultT] = Future()
        self._queue.put(_Entry(item, future, deadline if deadline is not None else Deadline.none()))
        set_queue_depth(self._thread.name, self._queue.qsize())
        return future

    def submit_many(self, items: Sequence[ItemT], deadline: Deadline | None = None) -> list[Future[ResultT]]:
        return [self.submit(item, deadline) for item in items]

    def close(self) -> None:
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            # A lone request runs at once: waiting ``max_wait_s`` for company that is not queued only adds
            # latency. Requests arriving while a batch runs queue up and fill the next one.
            deadline = time.monotonic() + (self.max_wait_s if not self._queue.empty() else 0.0)
            stop_after = False
            while len(batch) < self.max_batch:
                timeout = deadline - time.monotonic()
                try:
                    entry = self._queue.get(timeout=max(timeout, 0)) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if entry is _STOP:
                    stop_after = True
                    break
                batch.append(entry)
            set_queue_depth(self._thread.name, self._queue.qsize())
            self._run(batch)  # type: ignore[arg-type]
            if stop_after:
                return

    def _live(self, batch: list[_Entry[ItemT, ResultT]]) -> list[_Entry[ItemT, ResultT]]:
        """The entries someone still waits for; the others' futures end now, without running."""
        live = []
        for entry in batch:
            if not entry.future.set_running_or_notify_cancel():
                self.items_dropped += 1
                continue
            try:
                entry.deadline.check("the queued request")
            except FacefuseError as exc:
                entry.future.set_exception(exc)
                self.items_dropped += 1
                continue
            live.append(entry)
        return live

    def _run(self, batch: list[_Entry[ItemT, ResultT]]) -> None:
        live = self._live(batch)
        if not live:
            return
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(live))
        observe_batch(self._thread.name, len(live))

        def stop_check() -> None:
            if not any(entry.deadline.alive for entry in live):
                raise CancelledError("every caller of this batch is gone; the batch was stopped")

        try:
            results = self._run_batch([entry.item for entry in live], stop_check)
            if len(results) != len(live):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
        except BaseException as exc:
            for entry in live:
                entry.future.set_exception(exc)
            return
        for entry, result in zip(live, results, strict=True):
            entry.future.set_result(result)
