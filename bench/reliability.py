"""`python -m bench reliability [--quick]`: ecoserve under load, faults and hostile input.

Every scenario starts the real thing (`ecoserve serve` on Ray Serve, ONNX Runtime members, the
recorder, SQLite or a PostgreSQL server of its own), drives it over loopback HTTP, breaks
something for real (stops the database, fills the disk, SIGKILLs a process, floods it), and then
checks what the clients saw, what the store holds and what the metrics say. The full run (under
20 minutes) writes `docs/reliability.md`; `--quick` runs every scenario in a short form (the
test suite runs it: tests/test_reliability.py) and writes nothing.

Scenarios (each row of the table: what was measured, the pass criterion, the result):
- soak: steady mixed traffic (inference at concurrencies 1, 4 and 8 at once, labels, scrapes);
  resident memory of every process of the server sampled every 10 s;
- postgres_outage: the store's PostgreSQL server stopped in the middle of traffic, then started;
- disk_full: SQLite on a small tmpfs filled to ENOSPC, with a small gateway queue, then freed;
- kill_*: SIGKILL of a gateway replica, the recorder (as a child process of the gateway, and as
  its own deployment), Serve's proxy and HAProxy, and the raylet of the only node;
- abuse: idle connections, slow uploads, thousands of undeclared subgroup values and
  maximal-length ids while a well-behaved client is measured;
- fuzz: mutated inference and feedback bodies against the live server, and its OpenAPI document.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.hostile import mutated_bodies
from bench.serving import ecoserve_config, serve_config, stop_setup
from ecoserve.server import free_port
from models.heldout import load_heldout

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "reliability-token"
MiB = 1024 * 1024


# ------------------------------------------------------------------------- the server
def config(repo: Path, port: int, store_url: str, *, recorder_in_gateway: bool | None = None,
           max_queue: int | None = None, credit: bool = False) -> dict[str, Any]:
    """The default config (one gateway replica: the recorder in it, as a child process), with
    the digits ecosystem (6 members), a feedback token, and a short sweep period."""
    telemetry: dict[str, Any] = {"store_url": store_url, "flush_interval_s": 0.25, "sweep_interval_s": 1.0}
    if recorder_in_gateway is not None:
        telemetry["recorder_in_gateway"] = recorder_in_gateway
    if max_queue is not None:
        telemetry["max_queue"] = max_queue
    cfg = ecoserve_config(repo, port, "colocated", True, repo)  # the serving bench's, then ours
    args = cfg["applications"][0]["args"]
    del args["members"]
    args.update(auth={"feedback_token_env": "ECOSERVE_FEEDBACK_TOKEN"}, telemetry=telemetry)
    if credit:
        args["ecosystems"]["credit"] = {"policy": {"kind": "primary", "primary": "logreg"}}
    return cfg


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    cfg: dict[str, Any]
    path: Path


def start_server(cfg: dict[str, Any], path: Path) -> Server:
    env = {"ECOSERVE_FEEDBACK_TOKEN": TOKEN,
           # HAProxy's fixed side ports, freed so that nothing else on the machine is in the way
           "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}
    proc = serve_config(cfg, path, env)
    return Server(proc, f"http://127.0.0.1:{cfg['http_options']['port']}", cfg, path)


def processes(root: int) -> dict[int, str]:
    """Every live descendant of `root` (pid -> command line), read from /proc."""
    parent: dict[int, int] = {}
    cmd: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            cmd[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
    out, todo = {}, [root]
    while todo:
        p = todo.pop()
        for child, par in parent.items():
            if par == p and child not in out:
                out[child] = cmd.get(child, "")
                todo.append(child)
    return out


ROLES: dict[str, Callable[[str], bool]] = {
    "gateway": lambda c: "ServeReplica:ecoserve:Gateway" in c,
    "recorder (process)": lambda c: "serving.recording.process" in c,
    "recorder (deployment)": lambda c: "ServeReplica:ecoserve:Recorder" in c,
    "proxy": lambda c: "ProxyActor" in c,
    "haproxy": lambda c: c.split(" ", 1)[0].endswith("haproxy"),
    "raylet": lambda c: c.split(" ", 1)[0].endswith("/raylet"),
}


def find(server: Server, role: str) -> list[int]:
    return [pid for pid, c in processes(server.proc.pid).items() if ROLES[role](c)]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def stop_server(server: Server, leftovers: dict[int, str] | None = None) -> None:
    """Stop the server, then anything it started that is still alive (after a raylet kill the
    driver may not be able to clean up)."""
    before = leftovers if leftovers is not None else processes(server.proc.pid)
    if server.proc.poll() is None:
        stop_setup(server.proc)
    for pid in before:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{url}/metrics", timeout=10)
    r.raise_for_status()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(r.text) for s in f.samples}


def metric_sum(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and all((k, val) in ls for k, val in labels.items()))


def stored_ids(store_url: str) -> set[str]:
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.split("///", 1)[1], timeout=30) as conn:
            return {r[0] for r in conn.execute("SELECT request_id FROM ecoserve_outcomes")}
    import psycopg

    with psycopg.connect(store_url) as conn:
        return {r[0] for r in conn.execute("SELECT request_id FROM ecoserve_outcomes")}


def labeled_ids(store_url: str) -> set[str]:
    q = "SELECT request_id FROM ecoserve_outcomes WHERE label IS NOT NULL"
    if store_url.startswith("sqlite"):
        with sqlite3.connect(store_url.split("///", 1)[1], timeout=30) as conn:
            return {r[0] for r in conn.execute(q)}
    import psycopg

    with psycopg.connect(store_url) as conn:
        return {r[0] for r in conn.execute(q)}


def settle(fn: Callable[[], Any], timeout_s: float = 60.0, quiet_s: float = 3.0) -> Any:
    """`fn()` once its value has stopped changing for `quiet_s` (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    last, since = fn(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        cur = fn()
        if cur != last:
            last, since = cur, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


# ------------------------------------------------------------------------- traffic
@dataclass
class Traffic:
    """Closed-loop inference workers, a label poster and a health prober, on one asyncio loop in a
    background thread. Every request and its answer is kept for the checks."""

    url: str
    x: np.ndarray
    workers: list[int]  # rows per request of each worker (one entry per worker)
    prefix: str
    label_share: float = 0.5
    label_every_s: float = 0.5
    probe_every_s: float = 0.0  # 0: no probing
    scrape_every_s: float = 0.0
    requests: list[tuple[float, int, int, float]] = field(default_factory=list)  # (sent, status, rows, answered)
    answered: list[str] = field(default_factory=list)  # row ids of 200 answers
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (time, seconds) of 200 answers
    labels: list[tuple[float, int, list[str]]] = field(default_factory=list)  # (time, status, ids)
    probes: list[tuple[float, bool | None, float | None]] = field(default_factory=list)  # ready.healthy, store_up
    scrapes: list[tuple[float, int]] = field(default_factory=list)
    bad_status: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._label_from = 0
        self.t0 = time.time()

    def start(self) -> Traffic:
        self.t0 = time.time()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=len(self.workers) + 4)
        async with httpx.AsyncClient(limits=limits, timeout=15) as client:
            tasks = [self._worker(client, k, rows) for k, rows in enumerate(self.workers)]
            if self.label_share:
                tasks.append(self._labels(client))
            if self.probe_every_s:
                tasks.append(self._probe(client))
            if self.scrape_every_s:
                tasks.append(self._scrape(client))
            await asyncio.gather(*tasks)
            if self.label_share:
                await self._post_labels(client)  # the last answers' labels too

    async def _worker(self, client: httpx.AsyncClient, k: int, rows: int) -> None:
        i = 0
        rng = np.random.default_rng(k)
        while not self._stop.is_set():
            start = rng.integers(0, len(self.x) - rows)
            chunk = self.x[start:start + rows]
            body = {"id": f"{self.prefix}-{k}-{i}", "inputs": [{"name": "input", "shape": list(chunk.shape),
                                                                "datatype": "FP32", "data": chunk.ravel().tolist()}]}
            t = time.time()
            try:
                r = await client.post(f"{self.url}/v2/models/digits/infer", json=body)
                status = r.status_code
            except httpx.HTTPError:
                status = 0
                await asyncio.sleep(0.05)
            self.requests.append((t, status, rows, time.time()))
            if status == 200:
                p = r.json()["parameters"]
                self.answered.extend(p.get("request_ids") or [p["request_id"]])
                self.latencies.append((t, time.time() - t))
            else:
                self.bad_status[status] = self.bad_status.get(status, 0) + 1
            i += 1

    async def _post_labels(self, client: httpx.AsyncClient) -> None:
        new = self.answered[self._label_from:]
        self._label_from += len(new)
        ids = [rid for j, rid in enumerate(new) if (hash(rid) % 1000) < self.label_share * 1000]
        if not ids:
            return
        body = {"labels": [{"request_id": rid, "label": j % 10} for j, rid in enumerate(ids)]}
        try:
            r = await client.post(f"{self.url}/v2/feedback", json=body, headers={"authorization": f"Bearer {TOKEN}"})
            status = r.status_code
        except httpx.HTTPError:
            status = 0
        self.labels.append((time.time(), status, ids))

    async def _labels(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(self.label_every_s)
            await self._post_labels(client)

    async def _probe(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            healthy: bool | None = None
            store_up: float | None = None
            try:
                healthy = (await client.get(f"{self.url}/v2/health/ready")).json().get("telemetry", {}).get("healthy")
                text = (await client.get(f"{self.url}/metrics")).text
                for line in text.splitlines():
                    if line.startswith("ecoserve_store_up "):
                        store_up = float(line.split()[1])
            except (httpx.HTTPError, ValueError):
                pass
            self.probes.append((time.time(), healthy, store_up))
            await asyncio.sleep(self.probe_every_s)

    async def _scrape(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            try:
                status = (await client.get(f"{self.url}/metrics")).status_code
            except httpx.HTTPError:
                status = 0
            self.scrapes.append((time.time(), status))
            await asyncio.sleep(self.scrape_every_s)

    # summaries
    def errors(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, int, int, float]]:
        """Failed requests whose answer (or failure) came between `since` and `until`."""
        return [r for r in self.requests if r[1] != 200 and since <= r[3] <= until]

    def rows_answered(self) -> int:
        return len(self.answered)


@dataclass
class Row:
    scenario: str
    measured: str
    criterion: str
    ok: bool | None  # None: not judged (said why in `measured`)


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _x(repo: Path) -> np.ndarray:
    return load_heldout(repo / "digits").X.astype(np.float32)


# ------------------------------------------------------------------------- scenarios
def soak(repo: Path, tmp: Path, duration_s: float, quick: bool) -> list[Row]:
    store = f"sqlite:///{tmp / 'soak.db'}"
    server = start_server(config(repo, free_port(), store), tmp / "soak.yaml")
    samples: dict[str, list[tuple[float, float]]] = {}
    try:
        every = 2.0 if quick else 10.0
        with Traffic(server.url, _x(repo), [1, 4, 4, 4, 4, 8, 8, 8, 8], "soak", scrape_every_s=5.0) as t:
            end = time.time() + duration_s
            while time.time() < end:
                for role in ("gateway", "recorder (process)", "proxy", "haproxy"):
                    # found again each time: HAProxy, for one, reloads into a new process
                    sizes = [v for v in (rss_mib(p) for p in find(server, role)) if v is not None]
                    if sizes:
                        samples.setdefault(role, []).append((time.time() - t.t0, sum(sizes)))
                time.sleep(min(every, max(0.0, end - time.time())))
        answered = set(t.answered)
        stored = settle(lambda: len(stored_ids(store)))
        ids = stored_ids(store)
        m = scrape(server.url)
    finally:
        stop_server(server)
    label_ok = sum(len(ids_) for _, s, ids_ in t.labels if s == 200)
    label_bad = sum(1 for _, s, _ in t.labels if s != 200)
    counted = metric_sum(m, "ecoserve_labeled_outcomes_total", source="observed", subgroup="all")
    rows: list[Row] = []
    n = len(t.requests)
    errors = len(t.errors()) + label_bad + sum(1 for _, s in t.scrapes if s != 200)
    rows.append(Row("soak: traffic", f"{duration_s:.0f} s, {n:,} requests ({t.rows_answered():,} rows) at "
                    f"concurrency 1 + 4x4 rows + 4x8 rows, {len(t.labels)} label batches ({label_ok:,} labels), "
                    f"{len(t.scrapes)} scrapes; errors: {errors}", "no error", errors == 0))
    window = max(duration_s / 10, 5.0)
    lat = t.latencies
    buckets = [[s for (ts, s) in lat if w * window <= ts - t.t0 < (w + 1) * window] for w in range(int(duration_s // window))]
    p99 = [_p(b, 99) * 1000 for b in buckets if b]
    first, last = (p99[1] if len(p99) > 2 else p99[0]), p99[-1]
    measured = (f"p99 per {window:.0f} s window: first (after warm-up) {first:.0f} ms, last {last:.0f} ms, "
                f"max {max(p99):.0f} ms; p50 overall {_p([s for _, s in lat], 50) * 1000:.1f} ms")
    rows.append(Row("soak: latency over time", measured + ("; not judged: windows too short" if quick else ""),
                    "last window's p99 <= 2x the first's", None if quick else last <= 2 * first))
    rows.append(Row("soak: every answered row stored", f"{len(answered):,} answered, {stored:,} stored, "
                    f"{len(answered - ids)} answered but not stored", "answered == stored",
                    answered <= ids and len(ids) == len(answered)))
    rows.append(Row("soak: every label counted", f"{label_ok:,} labels accepted, "
                    f"ecoserve_labeled_outcomes_total = {counted:,.0f}", "equal", label_ok == counted))
    for role, pts in samples.items():
        warm = [p for p in pts if p[0] >= duration_s * 0.4]
        if len(warm) < 3:
            continue
        slope = float(np.polyfit([p[0] for p in warm], [p[1] for p in warm], 1)[0]) * 600  # MiB per 10 min
        mean = float(np.mean([p[1] for p in warm]))
        allowed = 0.02 * mean + 4
        measured = (f"RSS {pts[0][1]:.0f} -> {pts[-1][1]:.0f} MiB; after warm-up (last 60%): "
                    f"{slope:+.1f} MiB per 10 min (fit over {len(warm)} samples)")
        if quick:
            rows.append(Row(f"soak: memory, {role}", measured + "; not judged: the run is too short to fit a slope",
                            f"slope <= 2% of RSS + 4 MiB per 10 min (= {allowed:.0f} MiB)", None))
        else:
            rows.append(Row(f"soak: memory, {role}", measured,
                            f"slope <= 2% of RSS + 4 MiB per 10 min (= {allowed:.0f} MiB)", slope <= allowed))
    return rows


class PrivatePostgres:
    """A PostgreSQL server of our own (initdb in a temporary folder, its own port), to stop and
    start at will. As root, it runs as the `postgres` user (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        found = shutil.which("pg_ctl")
        pg_ctl = Path(found) if found else (bins[-1] if bins else None)
        if pg_ctl is None:
            raise FileNotFoundError("pg_ctl (PostgreSQL's server binaries) is not installed")
        self.bin = pg_ctl.parent
        self.dir = Path(tempfile.gettempdir()) / f"ecoserve-pg-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.dir.mkdir(mode=0o755)
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run([str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres"])
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd: list[str]) -> None:
        subprocess.run([*self.as_user, *cmd], check=True, capture_output=True, cwd=self.dir)

    def start(self) -> None:
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w",
                   "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start"])

    def stop(self) -> None:
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop"])

    def remove(self) -> None:
        with suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _outage_rows(name: str, t: Traffic, t_down: float, t_up: float, ids: set[str], labeled: set[str],
                 m: dict[Any, float], dropped_expected: bool) -> list[Row]:
    during = [p for p in t.probes if t_down + 2 <= p[0] <= t_up]
    after = [p for p in t.probes if p[0] >= t_up + 8]
    seen_down = any(h is False for _, h, _ in during) and any(s == 0 for _, _, s in during)
    back_up = bool(after) and after[-1][1] is True and after[-1][2] == 1
    label_status: dict[int, int] = {}
    for _, s, _ in t.labels:
        label_status[s] = label_status.get(s, 0) + 1
    refused = {rid for _, s, rids in t.labels if s != 200 for rid in rids}
    accepted = {rid for _, s, rids in t.labels if s == 200 for rid in rids}
    answered = set(t.answered)
    dropped = metric_sum(m, "ecoserve_outcomes_dropped_total", reason="queue_full")
    errs = t.errors()
    rows = [
        Row(f"{name}: inference", f"{len(t.requests):,} requests, {len(errs)} errors "
            f"({len(t.errors(t_down, t_up + 5))} while the store was away)", "no error", not errs),
        Row(f"{name}: health says so", f"during: /v2/health/ready telemetry.healthy=false and ecoserve_store_up=0 "
            f"seen: {seen_down}; after: healthy again and store_up=1: {back_up}", "both", seen_down and back_up),
        Row(f"{name}: labels", f"answers by status {dict(sorted(label_status.items()))}; refused labels applied: "
            f"{len(refused & labeled)}; accepted labels of stored outcomes not applied: "
            f"{len((accepted - labeled) & ids)} (accepted labels of dropped outcomes, held as pending: "
            f"{len(accepted - ids)})",
            "only 200 and 503 (retryable); a 503 applies nothing; a 200 is kept",
            set(label_status) <= {200, 503} and 503 in label_status and not (refused & labeled)
            and not ((accepted - labeled) & ids)),
    ]
    if dropped_expected:
        rows.append(Row(f"{name}: records", f"{len(answered):,} rows answered = {len(ids & answered):,} stored + "
                        f"{dropped:,.0f} dropped (ecoserve_outcomes_dropped_total{{reason=\"queue_full\"}})",
                        "stored + dropped == answered, dropped > 0 (the queue is bounded and says so)",
                        len(ids & answered) + dropped == len(answered) and dropped > 0 and ids <= answered))
    else:
        rows.append(Row(f"{name}: records", f"{len(answered):,} rows answered, {len(ids & answered):,} stored "
                        f"after the store came back, {dropped:,.0f} dropped",
                        "every answered row stored, none dropped", answered == ids and dropped == 0))
    return rows


def postgres_outage(repo: Path, tmp: Path, outage_s: float) -> list[Row]:
    try:
        pg = PrivatePostgres()
    except (FileNotFoundError, subprocess.CalledProcessError, KeyError) as exc:
        return [Row("postgres_outage", f"not run: {exc}", "-", None)]
    server = None
    try:
        pg.start()
        server = start_server(config(repo, free_port(), pg.url), tmp / "pg.yaml")
        with Traffic(server.url, _x(repo), [1, 4, 4, 8], "pg", probe_every_s=0.5) as t:
            time.sleep(5)
            t_down = time.time()
            pg.stop()
            time.sleep(outage_s)
            pg.start()
            t_up = time.time()
            time.sleep(12)
        ids = settle(lambda: stored_ids(pg.url))
        m = scrape(server.url)
        labeled_before = labeled_ids(pg.url)
        # the labels refused while the store was away, posted again: now they join
        refused = [rid for _, s, rids in t.labels if s != 200 for rid in rids]
        retried: dict[int, int] = {}
        for i in range(0, len(refused), 5000):  # within the default 10,000 labels per request
            code = httpx.post(f"{server.url}/v2/feedback",
                              json={"labels": [{"request_id": r, "label": 1} for r in refused[i:i + 5000]]},
                              headers={"authorization": f"Bearer {TOKEN}"}, timeout=60).status_code
            retried[code] = retried.get(code, 0) + 1
    finally:
        if server is not None:
            stop_server(server)
        pg.remove()
    rows = _outage_rows(f"postgres_outage ({outage_s:.0f} s)", t, t_down, t_up, ids, labeled_before, m, False)
    rows.append(Row(f"postgres_outage ({outage_s:.0f} s): retried labels",
                    f"{len(refused):,} refused labels posted again once the store was back, in batches of 5,000: "
                    f"answers by status {dict(sorted(retried.items()))}", "all 200", set(retried) <= {200}))
    return rows


@contextmanager
def small_disk(folder: Path, size: str = "24m") -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True,
                   capture_output=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem says ENOSPC; returns it (delete it to free the space)."""
    filler = folder / "filler"
    chunk = b"\0" * (256 * 1024)
    with filler.open("wb") as fh:
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


def disk_full(repo: Path, tmp: Path, full_s: float) -> list[Row]:
    if os.geteuid() != 0:
        return [Row("disk_full", "not run: mounting a small tmpfs needs root", "-", None)]
    server = None
    try:
        with small_disk(tmp / "small") as disk:
            store = f"sqlite:///{disk / 'outcomes.db'}"
            server = start_server(config(repo, free_port(), store, max_queue=500), tmp / "full.yaml")
            with Traffic(server.url, _x(repo), [1, 4, 4, 8], "full", probe_every_s=0.5) as t:
                time.sleep(4)
                t_down = time.time()
                filler = fill(disk)
                time.sleep(full_s)
                filler.unlink()
                t_up = time.time()
                time.sleep(12)
            ids = settle(lambda: stored_ids(store))
            m = scrape(server.url)
            labeled = labeled_ids(store)
            stop_server(server)
            server = None
    except subprocess.CalledProcessError as exc:
        return [Row("disk_full", f"not run: mount failed ({exc.stderr.decode().strip()})", "-", None)]
    finally:
        if server is not None:
            stop_server(server)
    return _outage_rows(f"disk_full ({full_s:.0f} s, SQLite, queue of 500)", t, t_down, t_up, ids, labeled, m, True)


def _kill(server: Server, role: str, t: Traffic, settle_s: float) -> tuple[str, bool]:
    """SIGKILL every process of `role`; what the clients saw until the traffic recovered (the
    first success after the last failure, with `settle_s` of successes after it)."""
    pids = find(server, role)
    if not pids:
        return f"no {role} process found", False
    t_kill = time.time()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = t_kill + 90
    recovered = None
    while time.time() < deadline:
        time.sleep(0.5)
        last_err = max((e[3] for e in t.errors(t_kill)), default=t_kill)
        ok_after = [r[3] for r in list(t.requests) if r[0] > last_err and r[1] == 200]
        if len(ok_after) >= 20 and time.time() - last_err > settle_s:
            recovered = min(ok_after)
            break
    errs = t.errors(t_kill, recovered or time.time())
    kinds: dict[int, int] = {}
    for e in errs:
        kinds[e[1]] = kinds.get(e[1], 0) + 1
    kinds_text = ", ".join(f"{'connection' if k == 0 else k}: {v}" for k, v in sorted(kinds.items())) or "none"
    took = f"{recovered - t_kill:.1f} s" if recovered else "did not recover within 90 s"
    window = f"{max(e[3] for e in errs) - t_kill:.1f} s" if errs else "0 s"
    return (f"{len(errs)} failed requests ({kinds_text}) within {window} of the kill; serving normally after {took}",
            recovered is not None)


def kills(repo: Path, tmp: Path, quick: bool) -> list[Row]:
    settle_s = 3.0 if quick else 8.0
    observe_s = 8.0 if quick else 40.0
    rows: list[Row] = []
    # 1. the default config: a gateway replica with its recorder as a child process
    store = f"sqlite:///{tmp / 'kill-a.db'}"
    server = start_server(config(repo, free_port(), store), tmp / "kill-a.yaml")
    try:
        with Traffic(server.url, _x(repo), [1, 4, 4, 8], "ka", label_share=0.0) as t:
            time.sleep(3)
            for role in ("gateway", "recorder (process)", "proxy", "haproxy"):
                before_lost = metric_sum(scrape(server.url), "ecoserve_outcomes_lost_total")
                seen, ok = _kill(server, role, t, settle_s)
                rows.append(Row(f"kill {role} (default config)", seen, "serving again within 90 s", ok))
                time.sleep(1)
                _ = before_lost
        ids = settle(lambda: stored_ids(store), quiet_s=12.0)  # a dead ledger is reclaimed within 10 s
        m = scrape(server.url)
    finally:
        stop_server(server)
    lost = metric_sum(m, "ecoserve_outcomes_lost_total")
    answered = set(t.answered)
    gap = len(ids) + lost - len(answered)
    inflight = 4 * 8
    rows.append(Row("kills (default config): accounting",
                    f"{len(answered):,} rows answered; {len(ids):,} stored + {lost:,.0f} counted lost "
                    f"(ecoserve_outcomes_lost_total) = answered {gap:+,.0f}; answered but not stored: "
                    f"{len(answered - ids):,}",
                    f"stored + lost - answered in [0, {inflight}] (rows accepted by a replica that died before "
                    "answering count as lost, not as answered)",
                    0 <= gap <= inflight and len(answered - ids) <= lost))
    # 2. the recorder as its own deployment; then the raylet of the only node
    store = f"sqlite:///{tmp / 'kill-b.db'}"
    cfg = config(repo, free_port(), store, recorder_in_gateway=False)
    server = start_server(cfg, tmp / "kill-b.yaml")
    left: dict[int, str] = {}
    try:
        with Traffic(server.url, _x(repo), [1, 4, 4, 8], "kb", label_share=0.0) as t:
            time.sleep(3)
            seen, ok = _kill(server, "recorder (deployment)", t, settle_s)
            rows.append(Row("kill recorder (deployment)", seen, "no failed inference request", ok and
                            "0 failed" in seen))
            answered_mid = set(t.answered)
            deadline = time.time() + 60
            while not answered_mid <= (ids_mid := stored_ids(store)) and time.time() < deadline:
                time.sleep(1.0)
            rows.append(Row("kill recorder (deployment): accounting",
                            f"{len(answered_mid):,} rows answered so far, {len(answered_mid - ids_mid)} not stored",
                            "none lost (hand-overs are re-sent; a stored id is skipped)",
                            answered_mid <= ids_mid))
            left = processes(server.proc.pid)
            t_kill = time.time()
            for pid in find(server, "raylet"):
                os.kill(pid, signal.SIGKILL)
            time.sleep(observe_s)
            exit_code = server.proc.poll()
            errs_after = t.errors(t_kill)
            first_err = min((e[3] for e in errs_after), default=None)
            # the node is lost: every process of it dies at once (as when a pod or host goes)
            server.proc.kill()
            for pid in left:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            server.proc.wait()
            time.sleep(1)
    finally:
        stop_server(server, left)
    answered = set(t.answered)
    # the same config and store again: the new gateway finds the dead replicas' ledgers
    server = start_server(cfg, tmp / "kill-b2.yaml")
    try:
        ids = settle(lambda: stored_ids(store), quiet_s=12.0)
        lost = settle(lambda: metric_sum(scrape(server.url), "ecoserve_outcomes_lost_total"), quiet_s=12.0)
    finally:
        stop_server(server)
    gap = len(ids) + lost - len(answered)
    seen = (f"{len(errs_after)} failed requests in the {observe_s:.0f} s after it"
            + (f" (the first after {first_err - t_kill:.1f} s)" if first_err else "")
            + f"; `ecoserve serve` {'exited with status ' + str(exit_code) if exit_code is not None else 'still running'}")
    rows.append(Row("kill raylet (the only node), then the node lost",
                    f"{seen}; then every process of the node SIGKILLed; after a restart on the same store: "
                    f"{len(ids):,} stored + {lost:,.0f} counted lost = answered ({len(answered):,}) {gap:+,.0f}",
                    f"the restart counts what was lost: stored + lost - answered in [0, {inflight}]",
                    0 <= gap <= inflight))
    return rows


def abuse(repo: Path, tmp: Path, quick: bool) -> list[Row]:
    store = f"sqlite:///{tmp / 'abuse.db'}"
    server = start_server(config(repo, free_port(), store, credit=True), tmp / "abuse.yaml")
    n_idle, n_slow = (100, 10) if quick else (500, 50)
    n_flood = 300 if quick else 3000
    phase_s = 6.0 if quick else 20.0
    socks: list[socket.socket] = []
    try:
        procs = [p for r in ("proxy", "haproxy", "gateway") for p in find(server, r)]
        rss0 = sum(rss_mib(p) or 0 for p in procs)
        x = load_heldout(repo / "credit").X[:1].astype(np.float32).ravel().tolist()

        def credit(c: httpx.Client, rid: str, groups: dict[str, str]) -> int:
            body = {"id": rid, "inputs": [{"name": "input", "shape": [1, len(x)], "datatype": "FP32", "data": x}],
                    "parameters": groups}
            return c.post(f"{server.url}/v2/models/credit/infer", json=body).status_code

        with httpx.Client(timeout=30) as c:  # the series a normal day has: declared values, and one `other`
            for i, (sex, age) in enumerate([("female", "young"), ("male", "adult"), ("unknown", "unknown")] * 3):
                credit(c, f"warm-{i}", {"sex": sex, "age_group": age})
        with Traffic(server.url, _x(repo), [1, 1], "calm", label_share=0.0) as base:
            time.sleep(phase_s)
        time.sleep(1.0)
        m0 = scrape(server.url)
        port = server.cfg["http_options"]["port"]
        for _ in range(n_idle):
            s = socket.create_connection(("127.0.0.1", port))
            socks.append(s)
        slow = []
        for _ in range(n_slow):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{")
            slow.append(s)
        stop = threading.Event()

        def trickle() -> None:
            while not stop.is_set():
                for s in slow:
                    with suppress(OSError):
                        s.sendall(b" ")
                time.sleep(1.0)

        dripper = threading.Thread(target=trickle, daemon=True)
        dripper.start()
        flood_status: dict[int, int] = {}
        with Traffic(server.url, _x(repo), [1, 1], "abused", label_share=0.0) as hit:
            with httpx.Client(timeout=30) as c:
                for i in range(n_flood):
                    code = credit(c, ("z" * 120) + f"{i:08d}", {"sex": f"value-{i}", "age_group": f"age-{i}"})
                    flood_status[code] = flood_status.get(code, 0) + 1
            time.sleep(max(0.0, phase_s - (time.time() - hit.t0)))
        stop.set()
        cut = 0
        for s in slow:
            try:
                s.settimeout(0.01)
                cut += s.recv(1) == b""
            except (TimeoutError, BlockingIOError, OSError):
                pass
        rss1 = sum(rss_mib(p) or 0 for p in procs)
        m1 = scrape(server.url)
    finally:
        for s in socks:
            s.close()
        stop_server(server)
    series0, series1 = len(m0), len(m1)
    # new series for other reasons (a member timing out under the flood: an error kind's first
    # count) are fine; a series carrying a flooded value, or one per flooded request, is not
    new = sorted(set(m1) - set(m0))
    flooded = [k for k in new if any(v.startswith(("value-", "age-", "zzz")) for _, v in k[1])]
    new_names = sorted({f"{n}{{{','.join(f'{a}={v}' for a, v in ls if a not in ('ecosystem',))}}}" for n, ls in new})
    base_p99 = _p([s for _, s in base.latencies], 99) * 1000
    hit_p99 = _p([s for _, s in hit.latencies], 99) * 1000
    errors = len(hit.errors())
    return [
        Row("abuse: other clients served", f"{n_idle} idle connections + {n_slow} slow uploads (1 byte/s) + "
            f"{n_flood:,} flood requests: a calm client's errors {errors}, p99 {hit_p99:.0f} ms vs "
            f"{base_p99:.0f} ms before ({hit_p99 / base_p99:.1f}x)", "no error; p99 <= 5x",
            errors == 0 and hit_p99 <= 5 * base_p99),
        Row("abuse: bounded series", f"{n_flood:,} distinct undeclared subgroup values and attributes, 128-character "
            f"ids (answers {dict(sorted(flood_status.items()))}): /metrics samples {series0} -> {series1}; "
            f"new: {', '.join(new_names[:5]) or 'none'}; carrying a flooded value: {len(flooded)}",
            "no series carries a flooded value; at most 10 new series", not flooded and len(new) <= 10),
        Row("abuse: bounded memory", f"proxy + HAProxy + gateway RSS {rss0:.0f} -> {rss1:.0f} MiB "
            f"({rss1 - rss0:+.0f}); slow uploads the server had closed at the end: {cut} of {n_slow}",
            "growth < 100 MiB", rss1 - rss0 < 100),
    ]


def fuzz(repo: Path, tmp: Path, quick: bool) -> list[Row]:
    """Mutated valid bodies against the live server (the in-process app gets the same and the
    OpenAPI-generated requests in the test suite), and its OpenAPI document checked."""
    store = f"sqlite:///{tmp / 'fuzz.db'}"
    server = start_server(config(repo, free_port(), store), tmp / "fuzz.yaml")
    n = 300 if quick else 3000
    status: dict[int, int] = {}
    no_message = 0
    try:
        import schemathesis

        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = sum(1 for _ in schema.get_all_operations())
        rng = random.Random(20261202)
        with httpx.Client(timeout=30, headers={"authorization": f"Bearer {TOKEN}"}) as c:
            for path, content in mutated_bodies(rng, n):
                try:
                    r = c.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"})
                except httpx.HTTPError:
                    status[0] = status.get(0, 0) + 1
                    continue
                status[r.status_code] = status.get(r.status_code, 0) + 1
                if r.status_code >= 400:
                    try:
                        no_message += not r.json().get("error")
                    except ValueError:
                        no_message += 1
    finally:
        stop_server(server)
    server_errors = sum(v for k, v in status.items() if k >= 500 and k != 503) + status.get(0, 0)
    return [
        Row("fuzz: OpenAPI document", f"GET /openapi.json of the live server loads in schemathesis: "
            f"{operations} operations", "loads", operations >= 10),
        Row("fuzz: mutated bodies (live)", f"{n:,} mutated inference, feedback and outcome bodies: answers by status "
            f"{dict(sorted(status.items()))}; refusals without a message: {no_message}",
            "no 5xx but 503, every refusal with a message", server_errors == 0 and no_message == 0),
    ]


# ------------------------------------------------------------------------- the table
def run(repo: Path, quick: bool = False, only: list[str] | None = None) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="ecoserve-reliability-") as d:
        tmp = Path(d)
        plan: list[tuple[str, Callable[[], list[Row]]]] = [
            ("soak", lambda: soak(repo, tmp, 20.0 if quick else 600.0, quick)),
            ("postgres_outage", lambda: postgres_outage(repo, tmp, 6.0 if quick else 30.0)),
            ("disk_full", lambda: disk_full(repo, tmp, 6.0 if quick else 30.0)),
            ("kills", lambda: kills(repo, tmp, quick)),
            ("abuse", lambda: abuse(repo, tmp, quick)),
            ("fuzz", lambda: fuzz(repo, tmp, quick)),
        ]
        for name, fn in plan:
            if only and name not in only:
                continue
            t0 = time.time()
            print(f"[reliability] {name} ...", file=sys.stderr, flush=True)
            got = fn()
            print(f"[reliability] {name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
            for r in got:
                print(f"  {'PASS' if r.ok else 'FAIL' if r.ok is False else 'n/a '} {r.scenario}: {r.measured}",
                      file=sys.stderr, flush=True)
            rows.extend(got)
    return rows


def table(rows: list[Row]) -> str:
    out = ["| scenario | measured | pass criterion | result |", "| --- | --- | --- | --- |"]
    for r in rows:
        verdict = "pass" if r.ok else "FAIL" if r.ok is False else "not judged"
        out.append(f"| {r.scenario} | {r.measured.replace('|', '/')} | {r.criterion} | {verdict} |")
    return "\n".join(out)


def _update_rows(doc: Path, only: list[str], rows: list[Row], minutes: float) -> None:
    """`--update` with named scenarios: replace those scenarios' rows in the table of the page (a
    re-run of one scenario after a fix), and say so under the table."""
    text = doc.read_text()
    head, _, results = text.partition("<!-- results -->")
    lines = results.splitlines()
    table_rows = [i for i, line in enumerate(lines) if line.startswith("| ") and not line.startswith("| scenario")
                  and not line.startswith("| ---")]
    mine = {r.scenario.split(":")[0].split(" ")[0] for r in rows}  # e.g. "abuse", "soak", "kill"
    keep = [i for i in table_rows if lines[i][2:].split(":")[0].split(" ")[0] not in mine]
    new_rows = table(rows).splitlines()[2:]
    first = min((i for i in table_rows if i not in keep), default=table_rows[-1] + 1 if table_rows else len(lines))
    out = [line for i, line in enumerate(lines) if i not in table_rows or i in keep]
    at = sum(1 for i in range(first) if i not in table_rows or i in keep)
    out[at:at] = new_rows
    note = f"The rows of {', '.join(only)} are from a later run of that scenario alone ({minutes:.0f} minutes)."
    out = [line for line in out if not line.startswith("The rows of ")]
    end = max(i for i, line in enumerate(out) if line.startswith("| ")) + 1
    out[end:end] = ["", note]
    doc.write_text(f"{head}<!-- results -->" + "\n".join(out).rstrip("\n") + "\n")
    print(f"\nupdated: {doc}")


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    only = [a for a in argv if not a.startswith("--")]  # `--update`: rewrite those scenarios' rows of the page
    repo = Path(os.environ.get("REPO", "model_repository"))
    t0 = time.time()
    rows = run(repo, quick, only or None)
    text = table(rows)
    print(text)
    if not quick and only and "--update" in argv:
        _update_rows(ROOT / "docs" / "reliability.md", only, rows, (time.time() - t0) / 60)
    if not quick and not only:
        doc = ROOT / "docs" / "reliability.md"
        head = doc.read_text().split("<!-- results -->")[0] if doc.exists() else "# Reliability\n\n"
        import platform

        doc.write_text(f"{head}<!-- results -->\n\nMachine: {platform.machine()}, {os.cpu_count()} cores, no GPU; "
                       f"the whole run took {(time.time() - t0) / 60:.0f} minutes.\n\n{text}\n")
        print(f"\nwritten: {doc}")
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
