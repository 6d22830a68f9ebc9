"""SQLite's WAL checkpoints on a background thread (see `Checkpointer`)."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    from telemetry.store.outcomes import OutcomeStore

__all__ = ["Checkpointer", "CHECKPOINT_INTERVAL_S", "AUTOCHECKPOINT_PAGES", "WAL_SIZE_LIMIT_BYTES"]

log = logging.getLogger("telemetry.store")

CHECKPOINT_INTERVAL_S = 1.0  # SQLite: the background WAL checkpoint's period (see `Checkpointer`)
# SQLite: writers checkpoint inline only past this many WAL pages (~80 MB; SQLite's default is
# 1,000): a safety net for when the background checkpoint cannot keep up (e.g. a long reader)
AUTOCHECKPOINT_PAGES = 20_000
WAL_SIZE_LIMIT_BYTES = 64 << 20  # the WAL file is truncated back to this after a checkpoint


class Checkpointer:
    """SQLite WAL checkpoints on a background thread, off the writers' path.

    With SQLite's default, the commit that grows the WAL past 1,000 pages copies them into the
    database file itself, inline: measured here, a fifth of the CPU of a label batch (every
    labelled row is rewritten) and a stall in whichever hand-over or feedback request drew it.
    Here a thread runs a PASSIVE checkpoint every `CHECKPOINT_INTERVAL_S` (sqlite3 releases
    the GIL while it copies), and writers checkpoint inline only past `AUTOCHECKPOINT_PAGES`.
    Durability: with `synchronous=NORMAL` a commit survives a process crash at once, and a power
    loss once a checkpoint has synced the WAL; that now happens at least every second under
    writes (SQLite's default: every 1,000 pages, which at low traffic can be hours). Why a second
    and not less: a checkpoint costs about the same however little it copies (two fsyncs, the
    hot B-tree pages again); at 0.25 s, with 20-row hand-overs every 0.25 s, it was half of the
    store's CPU (docs/store.md). The thread holds the store weakly and ends with
    `close()` or when the store is garbage."""

    def __init__(self, store: OutcomeStore, interval_s: float) -> None:
        self._store = weakref.ref(store)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ecoserve-sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self._interval_s):
            store = self._store()
            if store is None:
                return
            try:
                store.checkpoint()
                failing = False
            except SQLAlchemyError as exc:  # e.g. the file went away; writers still checkpoint past the limit
                if not failing:
                    log.warning("background WAL checkpoint failed (will retry): %s", exc)
                failing = True
            del store

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
