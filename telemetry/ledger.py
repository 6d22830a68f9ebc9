"""Crash accounting: how many outcome records a process accepted and never stored.

A gateway replica holds outcome records in memory until the recorder has stored
them (`serving.recording.shipper`). If the replica crashes (SIGKILL, OOM kill, segfault),
that queue is gone. To *count* what was lost, each shipper keeps a ledger:

- a small file, mapped into memory (`mmap`, shared), holding per ecosystem the
  number of records accepted into the queue. Counting a request is one write to
  memory: no system call, no I/O on the request path. The page belongs to the
  kernel's page cache, so it outlives the process that wrote it;
- the owner holds an exclusive `flock` on the file for its whole life. The kernel
  drops that lock when the process dies, however it dies: a lock that can be
  taken means a dead owner;
- the store keeps, per ledger and ecosystem, how many of its records are stored
  (`ecoserve_ledgers`, written in the same transaction as the outcomes).

A dead ledger's loss is `accepted - stored`. Reclaiming it (any gateway of the
same store, on the same host, at start and every few seconds after) adds that to
the persistent `lost|ECOSYSTEM` counter (`ecoserve_outcomes_lost_total`) and marks
the ledger reclaimed in the store, in one transaction, so that a second reclaim
counts nothing; then the file is removed. A clean shutdown that handed everything
over removes its ledger; one that could not leaves it, to be counted as lost.

Not covered: losing the host (or a pod's filesystem) loses its ledgers; put the
ledger directory on a volume that outlives the container (`k8s/` mounts an
emptyDir, which survives container restarts). Linux and macOS (flock, mmap).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import mmap
import os
import struct
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Ledger", "DeadLedger", "find_dead", "store_key", "default_ledger_dir"]

log = logging.getLogger(__name__)

MAGIC = b"ECOLEDG1"
HEADER = 4096  # magic + JSON header, NUL-padded; the uint64 counters follow
SUFFIX = ".ledger"


def store_key(store_url: str | None, store_url_env: str | None = None) -> str:
    """A short, stable name for a store (never the URL itself: it may hold a password)."""
    ident = f"env:{store_url_env}" if store_url_env else str(store_url)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def default_ledger_dir(key: str) -> Path:
    return Path(tempfile.gettempdir()) / "ecoserve-ledgers" / key


class Ledger:
    """The accepted-records counters of one live process (the owner holds the lock)."""

    def __init__(self, directory: str | Path, ledger_id: str, ecosystems: Sequence[str], store: str) -> None:
        self.directory = Path(directory)
        self.ledger_id, self.store = ledger_id, store
        self.path = self.directory / f"{ledger_id}{SUFFIX}"
        self._index = {eco: i for i, eco in enumerate(ecosystems)}
        header = MAGIC + json.dumps(
            {"ledger": ledger_id, "store": store, "ecosystems": list(ecosystems), "pid": os.getpid(),
             "created": time.time()}
        ).encode()
        if len(header) > HEADER:
            raise ValueError(f"ledger header too long ({len(header)} bytes): too many ecosystems")
        # created under a temporary name, locked, filled, then renamed: a reclaimer only ever
        # sees complete, locked ledgers (the lock follows the open file through the rename)
        tmp = self.directory / f".{ledger_id}.tmp"
        for attempt in range(3):  # another process may remove the (empty) directory meanwhile
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            size = HEADER + 8 * max(1, len(self._index))
            os.ftruncate(fd, size)
            os.pwrite(fd, header.ljust(HEADER, b"\0"), 0)
            self._mm = mmap.mmap(fd, size)
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        self._fd: int | None = fd
        self._lock = threading.Lock()

    def accept(self, ecosystem: str, n: int) -> None:
        """Count `n` records of `ecosystem` accepted into the queue (a write to shared memory)."""
        i = self._index.get(ecosystem)
        if i is None or self._fd is None:
            return
        off = HEADER + 8 * i
        with self._lock:
            struct.pack_into("<Q", self._mm, off, struct.unpack_from("<Q", self._mm, off)[0] + n)

    def accepted(self) -> dict[str, int]:
        return {eco: struct.unpack_from("<Q", self._mm, HEADER + 8 * i)[0] for eco, i in self._index.items()}

    def close(self, remove: bool) -> None:
        """Release the ledger. `remove=True` after everything was stored; otherwise the file stays,
        unlocked, and the next reclaim counts what it holds as lost."""
        if self._fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        self._mm.close()
        os.close(self._fd)  # drops the lock
        self._fd = None
        if remove:
            _rmdir_if_empty(self.directory)


class DeadLedger:
    """A ledger whose owner is gone, locked by this process until `remove()` or `release()`."""

    def __init__(self, path: Path, fd: int, ledger_id: str, accepted: dict[str, int]) -> None:
        self.path, self._fd = path, fd
        self.ledger_id, self.accepted = ledger_id, accepted

    def remove(self) -> None:
        """Reclaimed: delete the file, then drop the lock."""
        self.path.unlink(missing_ok=True)
        self.release()
        _rmdir_if_empty(self.path.parent)

    def release(self) -> None:
        """Not reclaimed (e.g. the recorder is unreachable): keep the file for a later try."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _rmdir_if_empty(directory: Path) -> None:
    """A store's ledger directory goes once its last ledger does (another process may race to
    create one in it: `Ledger` makes the directory again, so losing that race is harmless)."""
    with contextlib.suppress(OSError):
        directory.rmdir()


def _read(fd: int) -> tuple[str, str, dict[str, int]] | None:
    head = os.pread(fd, HEADER, 0)
    if len(head) < HEADER or not head.startswith(MAGIC):
        return None
    try:
        meta = json.loads(head[len(MAGIC):].rstrip(b"\0"))
        ecos = [str(e) for e in meta["ecosystems"]]
        raw = os.pread(fd, 8 * len(ecos), HEADER)
        values = struct.unpack(f"<{len(ecos)}Q", raw) if ecos else ()
        return str(meta["ledger"]), str(meta["store"]), dict(zip(ecos, (int(v) for v in values)))
    except (ValueError, KeyError, TypeError, struct.error):
        return None


def find_dead(directory: str | Path, store: str) -> list[DeadLedger]:
    """The ledgers in `directory` of `store` whose owner has died, each locked by the caller.

    A ledger still locked is alive and skipped; one of another store is skipped; an
    unreadable file is removed (logged): it holds nothing that can be counted."""
    d = Path(directory)
    if not d.is_dir():
        return []
    dead = []
    for path in sorted(d.glob(f"*{SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # removed by another reclaimer meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # alive
            continue
        if not path.exists():  # reclaimed and removed between our open and our lock
            os.close(fd)
            continue
        parsed = _read(fd)
        if parsed is None:
            log.warning("removing unreadable outcome ledger %s", path)
            path.unlink(missing_ok=True)
            os.close(fd)
            continue
        ledger_id, key, accepted = parsed
        if key != store:
            os.close(fd)
            continue
        dead.append(DeadLedger(path, fd, ledger_id, accepted))
    return dead
