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
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from itertools import islice
from typing import Any

from telemetry.ledger import Ledger, find_dead
from telemetry.records import Outcome

__all__ = ["OutcomeShipper", "Send", "Reclaim"]

log = logging.getLogger(__name__)

Send = Callable[[list[Outcome], str, dict[str, Any]], Awaitable[dict[str, Any]]]
Reclaim = Callable[[str, dict[str, int]], Awaitable[dict[str, int]]]


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
        ledger: Ledger | None = None,
        reclaim: Reclaim | None = None,
        reclaim_interval_s: float = 10.0,
    ) -> None:
        self._report = report
        self.ledger = ledger
        self._reclaim = reclaim
        self.reclaim_interval_s = reclaim_interval_s
        self._since_reclaim = 0.0
        self._send = send
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.flush_interval_s = flush_interval_s
        self.on_reply = on_reply
        self.idle_poll_s = idle_poll_s
        self.reporter = ledger.ledger_id if ledger is not None else uuid.uuid4().hex[:12]
        self.handed: dict[str, int] = {}  # per ecosystem: records handed over (the ledger's `stored`)
        self.queue: deque[Outcome] = deque()
        self.dropped: dict[str, int] = {"queue_full": 0}
        self.sent = 0
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._since_reply = 0.0
        self.failing_since: float | None = None  # wall time of the first failed hand-over of a run of them
        self.store_up: bool | None = None  # as the recorder said in its latest reply (None: no reply yet)

    def put(self, outcomes: list[Outcome]) -> None:
        """Queue one request's records (one ecosystem). Never blocks, never raises on a full queue."""
        if not outcomes:
            return
        room = self.max_queue - len(self.queue)
        if room >= len(outcomes):
            self.queue.extend(outcomes)
            taken = len(outcomes)
        else:
            taken = max(room, 0)
            if taken:
                self.queue.extend(outcomes[:taken])
            self.dropped["queue_full"] += len(outcomes) - taken
        if self.ledger is not None and taken:
            self.ledger.accept(outcomes[0].ecosystem, taken)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        await self._reclaim_dead()
        while True:
            await asyncio.sleep(self.flush_interval_s)
            self._since_reply += self.flush_interval_s
            self._since_reclaim += self.flush_interval_s
            try:
                await self.flush(poll=self._since_reply >= self.idle_poll_s)
            except Exception as exc:  # keep the loop alive whatever happens; records stay queued
                if self.failing_since is None:
                    self.failing_since = time.time()
                    log.warning("outcome hand-over failed, will retry every %.2f s: %s", self.flush_interval_s, exc)
            if self._since_reclaim >= self.reclaim_interval_s:
                self._since_reclaim = 0.0
                await self._reclaim_dead()

    async def _reclaim_dead(self) -> dict[str, dict[str, int]]:
        """Have the recorder count the losses of crashed processes' ledgers (see the module doc)."""
        found: dict[str, dict[str, int]] = {}
        if self.ledger is None or self._reclaim is None:
            return found
        try:
            dead = find_dead(self.ledger.directory, self.ledger.store)
        except OSError as exc:
            log.warning("cannot scan outcome ledgers in %s: %s", self.ledger.directory, exc)
            return found
        for d in dead:
            try:
                lost = await self._reclaim(d.ledger_id, d.accepted)
            except Exception as exc:  # the recorder is unreachable: try again next period
                d.release()
                log.warning("could not reclaim outcome ledger %s, will retry: %s", d.ledger_id, exc)
                continue
            d.remove()
            found[d.ledger_id] = lost
            if any(lost.values()):
                log.warning("a crashed gateway (ledger %s) lost %s outcome records", d.ledger_id, lost)
        return found

    async def flush(self, poll: bool = True, drain: bool = False) -> int:
        """Send what is queued now, in batches (records that arrive meanwhile wait for the next
        period, so each hand-over is one period's worth); with `drain`, until the queue is empty;
        with `poll`, call even when empty (fresh policy stats)."""
        sent = 0
        async with self._lock:
            due = len(self.queue)
            while (self.queue and (drain or sent < due)) or poll:
                batch = list(islice(self.queue, min(self.max_batch, len(self.queue) if drain else due - sent)))
                through = dict(self.handed)
                for o in batch:
                    through[o.ecosystem] = through.get(o.ecosystem, 0) + 1
                report = {"dropped": dict(self.dropped), "serving": self._report() if self._report else {},
                          "progress": through}
                reply = await self._send(batch, self.reporter, report)
                if self.failing_since is not None:
                    log.warning("outcome hand-over works again after %.1f s", time.time() - self.failing_since)
                self.failing_since = None
                self.store_up = bool(reply.get("store_up", True))
                for _ in batch:
                    self.queue.popleft()
                self.handed = through
                sent += len(batch)
                self._since_reply = 0.0
                if self.on_reply is not None:
                    self.on_reply(reply)
                poll = False
        self.sent += sent
        return sent

    def health(self) -> dict[str, Any]:
        """The recording path as this gateway sees it (`/v2/health/ready`'s `telemetry`): whether
        hand-overs succeed, whether the recorder says its store is up, what waits and what was dropped."""
        healthy = self.failing_since is None and self.store_up is not False
        return {"healthy": healthy, "handover_failing_since": self.failing_since, "store_up": self.store_up,
                "queued": len(self.queue), "max_queue": self.max_queue, "dropped": dict(self.dropped)}

    async def close(self, timeout_s: float = 3.0) -> None:
        """Flush what is queued, then stop the background task (graceful shutdown). Bounded: if
        the recorder is already gone, the ledger stays behind and what is left is counted as lost
        when another process of the same store reclaims it."""
        try:
            await asyncio.wait_for(self.flush(poll=False, drain=True), timeout=timeout_s)
        except Exception as exc:
            log.warning("%d outcome records not handed over at shutdown: %s", len(self.queue), exc)
        finally:
            if self._task is not None:
                self._task.cancel()
                self._task = None
            if self.ledger is not None:
                self.ledger.close(remove=not self.queue)
