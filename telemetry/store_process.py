"""The outcome store in a child process: the recorder's writes off the gateway's GIL.

`StoreProcess` has the `OutcomeStore` interface the recorder uses, and forwards every call to
`python -m telemetry.store_process URL PARENT_PID`, a child that owns the real store. Why: in
the gateway (the recorder's default home with one replica) every thread shares one GIL with
the event loop. Writing a stored row costs ~11 us of CPU here, of which encoding its JSON
columns and binding its 14 parameters hold the GIL; the child does that work on its own GIL,
and the gateway pays ~1 us per row to send the records (plain tuples, pickled; repeated member,
version and propensity tuples are pickled once per batch). Counting stays in the recorder.

Protocol: length-prefixed pickle frames over the child's stdin and stdout (the child's own
prints go to stderr). A call is `(method, args)`; the reply `("ok", value, cpu_s)` or
`("err", kind, message, cpu_s)`, where `cpu_s` is the child's CPU time so far (the store's share
of `ecoserve_recorder_cpu_seconds_total`, operation `store`). Calls are serialized (one lock): the store has one writer anyway.

Failures:
- a store error in the child (database down, disk full) comes back as `StoreError`, like the
  in-process store's; the child stays up;
- the child itself dying (killed, OOM) raises `StoreLost` from the call that was in flight: that
  call may or may not have committed, so the recorder rebuilds its counts from the store before
  going on (`Recorder._resync`); the next call starts a new child;
- the recorder's process dying takes the child with it: the child asks the kernel for SIGKILL
  when the thread that started it ends (`PR_SET_PDEATHSIG`; that thread lives exactly as long as
  the child), so no transaction of a dead recorder lands after its replacement rebuilt its counts.
  Elsewhere than Linux the child exits at end of input instead (after any call in flight).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

from telemetry.records import Outcome, outcome_fields
from telemetry.store import OutcomeStore, StoredOutcome, StoreError, StoreLost

__all__ = ["StoreProcess"]

_HEADER = struct.Struct("!I")
_PAGE = 5000  # outcomes per reply when the recorder rebuilds its counts


def _send(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _recv(stream: IO[bytes]) -> Any:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError
    (n,) = _HEADER.unpack(head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


class StoreProcess:
    """`OutcomeStore`'s interface, served by a child process (see the module docstring)."""

    def __init__(self, url: str, *, nice: int = 0) -> None:
        self.url = url
        self.nice = nice
        self.backend = ""
        self.starts = 0  # children started (1 + restarts after a child died)
        self._cpu_past = 0.0  # CPU seconds of children that exited, as of their last reply
        self._cpu_now = 0.0  # the current child's, as of its last reply
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._start()

    # ---------------------------------------------------------- child
    def _start(self) -> None:
        """Start the child from a thread that lives exactly as long as it (PR_SET_PDEATHSIG fires
        when the starting *thread* ends), and wait for its store to open."""
        started: list[subprocess.Popen[bytes] | BaseException] = []
        ready = threading.Event()
        # the child imports this package as we did (a Ray worker's path may come from its runtime env)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))

        def run() -> None:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "telemetry.store_process", self.url, str(os.getpid()), str(self.nice)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, env=env,
                )
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                started.append(exc)
                ready.set()
                return
            started.append(proc)
            ready.set()
            proc.wait()

        threading.Thread(target=run, name="ecoserve-store-process", daemon=True).start()
        ready.wait()
        got = started[0]
        if isinstance(got, BaseException):
            raise StoreError(f"cannot start the outcome store process: {got}") from got
        proc = got
        self.starts += 1
        try:
            reply = self._exchange(proc, None)
        except StoreLost as exc:
            raise StoreError(f"the outcome store process for {self.url!r} exited at start (see its stderr)") from exc
        if reply[0] != "ok":
            self._stop(proc)
            raise StoreError(reply[2])
        self.backend = reply[1]
        self._cpu_past += self._cpu_now
        self._cpu_now = reply[-1]
        self._proc = proc

    @staticmethod
    def _exchange(proc: subprocess.Popen[bytes], call: Any) -> Any:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            if call is not None:
                _send(proc.stdin, call)
            return _recv(proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            proc.kill()
            status = proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
            raise StoreLost(f"the outcome store process died (exit status {status})") from exc

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # end of input: the child closes its store and exits
            proc.wait(timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    @property
    def cpu_s(self) -> float:
        """CPU seconds the store's process(es) used, as of their last reply (never lower)."""
        return self._cpu_past + self._cpu_now

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            if self._proc is None:
                self._start()
            assert self._proc is not None
            try:
                reply = self._exchange(self._proc, (method, args))
            except StoreLost:
                self._proc = None
                raise
            self._cpu_now = reply[-1]
        if reply[0] == "ok":
            return reply[1]
        raise StoreError(reply[2])

    # ------------------------------------------------- OutcomeStore's interface
    def insert_outcomes(
        self, items: Sequence[Outcome], progress: tuple[str, dict[str, int]] | None = None,
        unlost: dict[str, int] | None = None,
    ) -> set[str]:
        return self.insert_fields(list(map(outcome_fields, items)), progress, unlost)

    def insert_fields(
        self, items: Sequence[tuple[Any, ...]], progress: tuple[str, dict[str, int]] | None = None,
        unlost: dict[str, int] | None = None,
    ) -> set[str]:
        if not items and not progress:
            return set()
        inserted, late = self._call("insert_outcomes", list(items), progress)
        if unlost is not None:
            unlost.update(late)
        return {f[0] for f in items} if inserted is None else inserted

    def get_outcomes(self, ids: Sequence[str]) -> dict[str, StoredOutcome]:
        return self._call("get_outcomes", list(ids))  # type: ignore[no-any-return]

    def iter_outcomes(self, ecosystem: str, batch: int = _PAGE) -> Iterator[list[StoredOutcome]]:
        """The child iterates the store's own cursor; one batch per call."""
        self._call("iter_start", ecosystem, batch)
        while True:
            page: list[StoredOutcome] | None = self._call("iter_next")
            if page is None:
                return
            yield page

    def count_outcomes(self, ecosystem: str | None = None) -> int:
        return int(self._call("count_outcomes", ecosystem))

    def apply_labels(self, first: list[dict[str, Any]], corrections: list[dict[str, Any]],
                     pending: list[dict[str, Any]] | None = None) -> None:
        if first or corrections or pending:
            self._call("apply_labels", first, corrections, pending)

    def label_history(self, request_id: str) -> list[dict[str, Any]]:
        return self._call("label_history", request_id)  # type: ignore[no-any-return]

    def unlabeled_before(self, ecosystem: str, before: float, limit: int = 10_000) -> list[StoredOutcome]:
        return self._call("unlabeled_before", ecosystem, before, limit)  # type: ignore[no-any-return]

    def coverage(self, ecosystem: str, now: float, ages_s: Iterable[float]) -> dict[float, tuple[int, int]]:
        return self._call("coverage", ecosystem, now, list(ages_s))  # type: ignore[no-any-return]

    def take_pending(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        return self._call("take_pending", list(ids)) if ids else []  # type: ignore[no-any-return]

    def expire_pending(self, received_before: float) -> int:
        return int(self._call("expire_pending", received_before))

    def count_pending(self) -> int:
        return int(self._call("count_pending"))

    def ledger_progress(self, ledger: str) -> dict[str, int]:
        return self._call("ledger_progress", ledger)  # type: ignore[no-any-return]

    def reclaim_ledger(self, ledger: str, accepted: dict[str, int]) -> dict[str, int]:
        return self._call("reclaim_ledger", ledger, accepted)  # type: ignore[no-any-return]

    def bump(self, increments: dict[str, int]) -> None:
        if any(increments.values()):
            self._call("bump", increments)

    def event_counts(self) -> dict[str, int]:
        return self._call("event_counts")  # type: ignore[no-any-return]

    def migrate(self) -> int:
        return int(self._call("migrate"))

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._stop(self._proc)
                self._proc = None


# ------------------------------------------------------------------ the child
def _insert(store: OutcomeStore, rows: list[tuple[Any, ...]], progress: Any) -> tuple[set[str] | None, dict[str, int]]:
    unlost: dict[str, int] = {}
    inserted = store.insert_fields(rows, progress, unlost)
    # the common reply is "all of them" (None): the ids need not travel back
    return (None if len(inserted) == len({r[0] for r in rows}) else inserted), unlost


class _Cursor:
    """The child's one open `iter_outcomes` (a new `iter_start` drops the previous one)."""

    batches: Iterator[list[StoredOutcome]] | None = None

    @classmethod
    def start(cls, store: OutcomeStore, ecosystem: str, batch: int) -> None:
        cls.stop()
        cls.batches = store.iter_outcomes(ecosystem, batch)

    @classmethod
    def next(cls, store: OutcomeStore) -> list[StoredOutcome] | None:
        page = next(cls.batches, None) if cls.batches is not None else None
        if page is None:
            cls.stop()
        return page

    @classmethod
    def stop(cls) -> None:
        if cls.batches is not None:
            cls.batches.close()  # type: ignore[attr-defined]
            cls.batches = None


_METHODS: dict[str, Any] = {
    "insert_outcomes": _insert,
    "iter_start": _Cursor.start,
    "iter_next": _Cursor.next,
    **{name: getattr(OutcomeStore, name) for name in (
        "get_outcomes", "count_outcomes", "apply_labels", "label_history", "unlabeled_before", "coverage",
        "take_pending", "expire_pending", "count_pending", "ledger_progress", "reclaim_ledger", "bump",
        "event_counts", "migrate",
    )},
}


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the thread that started us ends (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


def main(argv: list[str]) -> int:
    from telemetry.store import open_store

    url, parent, nice = argv[0], int(argv[1]), int(argv[2]) if len(argv) > 2 else 0
    _die_with_parent(parent)
    if nice > 0:
        os.nice(nice)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: the parent decides when we stop
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints must not corrupt the replies
    inp = os.fdopen(0, "rb")
    try:
        store = open_store(url)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises StoreError
        _send(out, ("err", type(exc).__name__, str(exc), time.process_time()))
        return 1
    _send(out, ("ok", store.backend, time.process_time()))
    # fault injection for tests: "METHOD:MARKER_FILE" exits right after METHOD ran (committed,
    # unanswered), once per marker file
    fault_method, _, fault_marker = os.environ.get("ECOSERVE_STORE_PROCESS_FAULT", "").partition(":")
    try:
        while True:
            try:
                method, args = _recv(inp)
            except EOFError:
                return 0
            try:
                reply: tuple[Any, ...] = ("ok", _METHODS[method](store, *args))
            except Exception as exc:  # noqa: BLE001 - every error goes back to the caller
                reply = ("err", type(exc).__name__, str(exc))
            if method == fault_method and fault_marker and not os.path.exists(fault_marker):
                open(fault_marker, "w").close()
                os._exit(3)
            _send(out, (*reply, time.process_time()))  # the last item: this process's CPU so far
    finally:
        _Cursor.stop()
        store.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
