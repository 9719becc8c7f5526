"""Dynamic batching: concurrent requests gathered into one session call.

Requests wait in a bounded queue; a single worker takes the first, then keeps taking until the
batch holds `max_batch` rows or `max_delay` has passed since the first arrived, runs the
session once (in a worker thread, so the event loop keeps accepting), and hands each caller
exactly its own rows. A short batch with nothing else queued runs on the event loop itself
(`INLINE_MAX_S`): handing it to the worker thread and back costs more than such a call. A
request larger than `max_batch` is split into pieces and put back together, so a request may
hold at most `max_rows` = max_batch x max_queue rows (more could never be queued: the caller
refuses it up front with 400). A full queue refuses at once (the caller answers 503); an
exception in the backend fails only the requests of that batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass, field

import numpy as np

from .stats import Stats


# A batch whose expected compute time (recent time per row x rows) is under this, with nothing
# else queued, runs on the event loop instead of the worker thread: the loop is blocked at most
# about this long, and the two thread hand-offs it saves cost 0.2-0.5 ms per lone request on our
# 2-core CI box (the embedded model, serve_load's server-side compute time). Large models never
# qualify: a crossvit_tiny_240 image alone takes about 15 ms on that box.
INLINE_MAX_S = 0.003


class QueueFull(Exception):
    """More requests are waiting than `max_queue`: refuse now rather than hang the client."""


class BackendFailed(Exception):
    """The session raised while running a batch; only that batch's requests get it."""


class TooManyRows(Exception):
    """A request with more than `max_rows` rows: it could never be queued, so retrying is no use."""


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)


class Batcher:
    def __init__(self, session, *, max_batch: int, max_delay_s: float, max_queue: int, stats: Stats):
        if max_batch < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_delay >= 0")
        self.session = session
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.stats = stats
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._carry: _Item | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="crossvit-infer")
        self._task: asyncio.Task | None = None
        self._busy = 0  # requests taken from the queue and not yet answered
        self._row_s: float | None = None  # recent compute time per row, from the runs so far

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker())

    @property
    def max_rows(self) -> int:
        """The most rows one request may hold: split into max_batch pieces, they fill an empty queue."""
        return self.max_batch * self.max_queue

    @property
    def pending(self) -> int:
        return self._queue.qsize() + (self._carry is not None) + self._busy

    async def infer(self, x: np.ndarray) -> np.ndarray:
        """Logits for `x` (N rows), batched with whatever else arrives meanwhile."""
        if len(x) > self.max_rows:
            raise TooManyRows(f"{len(x)} rows is over this server's limit of {self.max_rows} per request "
                              "(--max-batch x --max-queue); split the request")
        pieces = [x[i:i + self.max_batch] for i in range(0, len(x), self.max_batch)]
        if self._queue.qsize() + len(pieces) > self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again later")
        loop = asyncio.get_running_loop()
        items = [_Item(p, loop.create_future()) for p in pieces]
        for item in items:
            self._queue.put_nowait(item)
        outs = await asyncio.gather(*(item.future for item in items))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    async def _next(self, timeout: float | None) -> _Item | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait() if not self._queue.empty() else None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            batch, rows = [first], len(first.x)
            self._busy = 1
            # the delay counts from the first request's arrival, as Triton's max_queue_delay does: a
            # request that already waited out a previous batch's compute is not held any longer
            waited = (time.perf_counter_ns() - first.enqueued_ns) / 1e9
            deadline = loop.time() + max(0.0, self.max_delay_s - waited)
            while rows < self.max_batch:
                item = await self._next(deadline - loop.time())
                if item is None:
                    break
                if rows + len(item.x) > self.max_batch:
                    self._carry = item  # first in the next batch
                    break
                batch.append(item)
                rows += len(item.x)
                self._busy = len(batch)
            await self._run(batch, rows)
            self._busy = 0

    async def _run(self, batch: list[_Item], rows: int) -> None:
        start = time.perf_counter_ns()
        for item in batch:
            self.stats.queued(start - item.enqueued_ns)
        x = batch[0].x if len(batch) == 1 else np.concatenate([item.x for item in batch])
        try:
            if self._short_and_alone(rows):
                out = self.session.infer(x)
            else:
                out = await asyncio.get_running_loop().run_in_executor(self._pool, self.session.infer, x)
        except Exception as e:  # the backend failed: this batch's callers get the reason
            self.stats.batch(rows, time.perf_counter_ns() - start, ok=False)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BackendFailed(f"inference failed: {type(e).__name__}: {e}"))
            return
        elapsed = time.perf_counter_ns() - start
        self.stats.batch(rows, elapsed, ok=True)
        per_row = elapsed / 1e9 / rows
        self._row_s = per_row if self._row_s is None else 0.8 * self._row_s + 0.2 * per_row
        at = 0
        for item in batch:
            n = len(item.x)
            if not item.future.done():  # a caller that went away
                item.future.set_result(out[at:at + n])
            at += n

    def _short_and_alone(self, rows: int) -> bool:
        """Run this batch on the event loop? Only once a run has been timed, when it should take
        under INLINE_MAX_S, and when no other request is queued behind it."""
        return (self._row_s is not None and self._row_s * rows < INLINE_MAX_S and self._queue.empty()
                and self._carry is None)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until every accepted request is answered (or `timeout` passes)."""
        end = time.monotonic() + timeout
        while self.pending and time.monotonic() < end:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)
