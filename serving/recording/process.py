"""The in-gateway recorder in a child process of the gateway: telemetry off the gateway's GIL.

With one gateway replica the recorder lives with the gateway (`telemetry.recorder_in_gateway`).
`RecorderProcess` runs it in a child of the gateway's process instead
(`python -m serving.recording.process`; `telemetry.recorder_process`, default on) and forwards
`record`, `feedback`, `reclaim`, `metrics` and `sweep` to it.

Why (measured: docs/benchmarks.md, "Telemetry on against off"): under load the gateway is bound by its GIL, not by
the machine's CPU (with 32-row requests at concurrency 64, 36-39% of the 2 vCPUs stayed idle
with telemetry on or off). Every thread of the gateway shares that GIL with its event loop, and
the recorder's counting and the store's row encoding held it. In the child they hold another
one; the gateway pays only for turning each hand-over into plain tuples and pickling them (~1 us
per row; member, version and propensity tuples shared by a runner's rows are pickled once), and
its hand-over thread waits on a pipe with the GIL released. The child runs at a lower CPU
priority (`telemetry.recorder_process_nice`, default 10): when the CPU is contended, serving wins,
and hand-overs wait in the gateway's bounded queue.

Protocol: length-prefixed pickle frames over the child's stdin and stdout (the child's own prints
go to stderr). The first frame is the recorder's `(specs, telemetry config)`; the child answers
`("ok", None)` once its recorder has rebuilt its counts from the store. A call is
`(method, args)`, answered `("ok", value)` or `("err", kind, message)`. Calls are serialized.

Failures, each tested:
- an error inside the recorder (a store that cannot be written, a bad feedback batch) comes back
  as it would from an in-process recorder; the child stays up;
- if the child dies (killed, OOM), the call in flight fails (`RecorderLost`): the gateway keeps
  its records queued and re-sends them, a feedback request gets a 503. The next call starts a new
  child, whose recorder rebuilds every counter from the store like any restarted recorder, so
  a hand-over that committed before the child died is counted once (the re-sent records are
  skipped as stored), never twice, never lost;
- if the gateway's process dies, the kernel kills the child with it (`PR_SET_PDEATHSIG`, asked
  for by the child, which dies when the thread that started it ends; that thread lives exactly
  as long as the child). So no write of a dead gateway's recorder can land after the next
  gateway's recorder has counted the store. Elsewhere than Linux the child exits at end of input
  instead (after the call in flight).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from typing import IO, Any

from serving.errors import Unavailable
from telemetry.recorder import LabelItem
from telemetry.records import Outcome, outcome_fields
from telemetry.spec import EcosystemSpec

__all__ = ["RecorderProcess", "RecorderLost"]

_HEADER = struct.Struct("!I")


class RecorderLost(Unavailable):
    """The recorder's process died during a call: that call may or may not have taken effect
    (503: retry; records are re-sent by the gateway, a repeated label is a duplicate)."""


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


class RecorderProcess:
    """A `RecorderHost` in a child process (see the module docstring)."""

    def __init__(self, specs: dict[str, EcosystemSpec], telemetry: dict[str, Any], *, nice: int = 0) -> None:
        self.specs = specs
        self.telemetry = telemetry
        self.nice = nice
        self.starts = 0  # children started (1 + restarts after a child died)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._start()

    # ---------------------------------------------------------- child
    def _start(self) -> None:
        """Start the child from a thread that lives exactly as long as it (PR_SET_PDEATHSIG fires
        when the starting *thread* ends), and wait until its recorder is ready."""
        started: list[subprocess.Popen[bytes] | BaseException] = []
        ready = threading.Event()
        # the child imports this package as we did (a Ray worker's path may come from its runtime env)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))

        def run() -> None:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "serving.recording.process", str(os.getpid()), str(self.nice)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, env=env,
                )
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                started.append(exc)
                ready.set()
                return
            started.append(proc)
            ready.set()
            proc.wait()

        threading.Thread(target=run, name="ecoserve-recorder-process", daemon=True).start()
        ready.wait()
        got = started[0]
        if isinstance(got, BaseException):
            raise RuntimeError(f"cannot start the recorder process: {got}") from got
        self.starts += 1
        try:
            reply = self._exchange(got, (self.specs, self.telemetry))
        except RecorderLost as exc:
            raise RuntimeError("the recorder process exited at start (its stderr says why)") from exc
        if reply[0] != "ok":
            self._stop(got)
            raise RuntimeError(f"the recorder process could not start: {reply[2]}")
        self._proc = got

    @staticmethod
    def _exchange(proc: subprocess.Popen[bytes], call: Any) -> Any:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            _send(proc.stdin, call)
            return _recv(proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            proc.kill()
            status = proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    pipe.close()
            raise RecorderLost(f"the recorder process died (exit status {status}); retry") from exc

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # end of input: the child closes its recorder and store, and exits
            proc.wait(timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

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
            except RecorderLost:
                self._proc = None
                raise
        if reply[0] == "ok":
            return reply[1]
        raise RuntimeError(f"recorder {method} failed: {reply[1]}: {reply[2]}")

    # ------------------------------------------------- RecorderHost's interface
    def record(self, outcomes: list[Outcome], reporter: str, report: dict[str, Any]) -> dict[str, Any]:
        return self._call("record_fields", list(map(outcome_fields, outcomes)), reporter, report)  # type: ignore[no-any-return]

    def feedback(self, items: list[LabelItem], scope: frozenset[str] | None = None) -> dict[str, Any]:
        return self._call("feedback", items, scope)  # type: ignore[no-any-return]

    def reclaim(self, ledger: str, accepted: dict[str, int]) -> dict[str, int]:
        return self._call("reclaim", ledger, accepted)  # type: ignore[no-any-return]

    def outcomes(self, items: list[tuple[Any, ...]]) -> dict[str, Any]:
        return self._call("outcomes", items)  # type: ignore[no-any-return]

    def audit(self, ecosystem: str, kind: str, limit: int) -> dict[str, Any]:
        return self._call("audit", ecosystem, kind, limit)  # type: ignore[no-any-return]

    def metrics(self) -> bytes:
        return self._call("metrics")  # type: ignore[no-any-return]

    def sweep(self) -> dict[str, int]:
        return self._call("sweep")  # type: ignore[no-any-return]

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._stop(self._proc)
                self._proc = None


# ------------------------------------------------------------------ the child
_METHODS = ("record_fields", "feedback", "outcomes", "audit", "reclaim", "metrics", "sweep")


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
    parent, nice = int(argv[0]), int(argv[1]) if len(argv) > 1 else 0
    _die_with_parent(parent)
    if nice > 0:
        os.nice(nice)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: the gateway decides when we stop
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints must not corrupt the replies
    inp = os.fdopen(0, "rb")
    try:
        specs, telemetry = _recv(inp)
    except EOFError:
        return 0
    from serving.recording.host import RecorderHost

    try:
        host = RecorderHost(specs, telemetry)
    except Exception as exc:  # noqa: BLE001 - reported to the gateway, which fails to start
        _send(out, ("err", type(exc).__name__, str(exc)))
        return 1
    _send(out, ("ok", None))
    # fault injection for tests: "METHOD:MARKER_FILE" exits right after METHOD ran (it took
    # effect, its answer never left), once per marker file
    fault_method, _, fault_marker = os.environ.get("ECOSERVE_RECORDER_PROCESS_FAULT", "").partition(":")
    try:
        while True:
            try:
                method, args = _recv(inp)
            except EOFError:
                return 0
            try:
                if method not in _METHODS:
                    raise ValueError(f"no such method: {method!r}")
                reply: tuple[Any, ...] = ("ok", getattr(host, method)(*args))
            except Exception as exc:  # noqa: BLE001 - every error goes back to the caller
                reply = ("err", type(exc).__name__, str(exc))
            if method == fault_method and fault_marker and not os.path.exists(fault_marker):
                open(fault_marker, "w").close()
                os._exit(3)
            _send(out, reply)
    finally:
        host.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
