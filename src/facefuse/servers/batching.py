"""Dynamic batching: requests that arrive together are run as one batch, so a GPU is fed full batches.

Callers submit single items and wait on a future; one worker thread collects items until the batch is
full or the oldest item has waited ``max_wait_s``, runs the batch function once, and hands each caller
its own result (or the batch's exception).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

from facefuse.rpc.metrics import observe_batch, set_queue_depth

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

_STOP = object()


class DynamicBatcher(Generic[ItemT, ResultT]):
    def __init__(
        self,
        run_batch: Callable[[Sequence[ItemT]], Sequence[ResultT]],
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
        self._thread.start()

    def submit(self, item: ItemT) -> Future[ResultT]:
        if self._closed:
            raise RuntimeError("batcher is closed")
        future: Future[ResultT] = Future()
        self._queue.put((item, future))
        set_queue_depth(self._thread.name, self._queue.qsize())
        return future

    def submit_many(self, items: Sequence[ItemT]) -> list[Future[ResultT]]:
        return [self.submit(item) for item in items]

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
            deadline = time.monotonic() + self.max_wait_s
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

    def _run(self, batch: list[tuple[ItemT, Future[ResultT]]]) -> None:
        live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(live))
        observe_batch(self._thread.name, len(live))
        try:
            results = self._run_batch([item for item, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            for _, fut in live:
                fut.set_exception(exc)
            return
        for (_, fut), result in zip(live, results):
            fut.set_result(result)
