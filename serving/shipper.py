"""Hands outcome records from the gateway to the recorder, off the request path.

The request path only appends to a bounded in-memory queue (`put`, no I/O, no
await). A background task sends batches every `flush_interval_s`; if the
recorder is slow or down, records wait in the queue and are re-sent (the
recorder skips ids it already stored, so a resend never double counts). When the
queue is full, new records are dropped and counted by reason; the counts travel
with the next successful hand-over and appear as `ecoserve_outcomes_dropped_total`.
So storage trouble never fails or slows inference: its cost on the request path
is one deque append per row.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from telemetry.records import Outcome

__all__ = ["OutcomeShipper"]

log = logging.getLogger(__name__)

Send = Callable[[list[Outcome], str, dict[str, Any]], Awaitable[dict[str, Any]]]


class OutcomeShipper:
    def __init__(
        self,
        send: Send,
        *,
        max_queue: int,
        max_batch: int,
        flush_interval_s: float,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
        idle_poll_s: float = 2.0,
        report: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._report = report
        self._send = send
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.flush_interval_s = flush_interval_s
        self.on_reply = on_reply
        self.idle_poll_s = idle_poll_s
        self.reporter = uuid.uuid4().hex[:12]
        self.queue: deque[Outcome] = deque()
        self.dropped: dict[str, int] = {"queue_full": 0, "recorder_error": 0}
        self.sent = 0
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._since_reply = 0.0

    def put(self, outcomes: list[Outcome]) -> None:
        room = self.max_queue - len(self.queue)
        if room >= len(outcomes):
            self.queue.extend(outcomes)
            return
        if room > 0:
            self.queue.extend(outcomes[:room])
        self.dropped["queue_full"] += len(outcomes) - max(room, 0)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            self._since_reply += self.flush_interval_s
            try:
                await self.flush(poll=self._since_reply >= self.idle_poll_s)
            except Exception as exc:  # keep the loop alive whatever happens; records stay queued
                log.warning("outcome hand-over failed, will retry: %s", exc)

    async def flush(self, poll: bool = True) -> int:
        """Send everything queued (in batches); with `poll`, call even when empty (fresh policy stats)."""
        sent = 0
        async with self._lock:
            while self.queue or poll:
                batch = [self.queue[i] for i in range(min(self.max_batch, len(self.queue)))]
                report = {"dropped": dict(self.dropped), "serving": self._report() if self._report else {}}
                reply = await self._send(batch, self.reporter, report)
                for _ in batch:
                    self.queue.popleft()
                sent += len(batch)
                self._since_reply = 0.0
                if self.on_reply is not None:
                    self.on_reply(reply)
                poll = False
        self.sent += sent
        return sent

    async def close(self, timeout_s: float = 3.0) -> None:
        """Flush what is queued, then stop the background task (graceful shutdown).
        Bounded: if the recorder is already gone, what is left is counted as dropped."""
        try:
            await asyncio.wait_for(self.flush(poll=False), timeout=timeout_s)
        except Exception as exc:
            self.dropped["recorder_error"] += len(self.queue)
            log.warning("%d outcome records not handed over at shutdown: %s", len(self.queue), exc)
        finally:
            if self._task is not None:
                self._task.cancel()
                self._task = None
