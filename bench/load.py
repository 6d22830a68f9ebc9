"""A small closed-loop HTTP load generator (asyncio + httpx): C workers, each sending its next
request when the last one answered, for a fixed duration. Reports requests/s and latency."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import numpy as np


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_s: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) if self.latencies_s else float("nan")


async def closed_loop(send: Callable[[int], Awaitable[bool]], concurrency: int, duration_s: float) -> LoadResult:
    """`concurrency` workers, each calling `send(i)` (True: answered as hoped) again as soon as the
    last call answered, for `duration_s`, after one warm-up call each (connections, batch queues,
    lazy imports)."""
    await asyncio.gather(*(send(i) for i in range(concurrency)))
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration_s
    start = time.perf_counter()

    async def worker(k: int) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            ok = await send(i)
            lat.append(time.perf_counter() - t0)
            errors += not ok
            i += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return LoadResult(len(lat), errors, time.perf_counter() - start, lat)


async def _run(url: str, bodies: list[bytes], concurrency: int, duration_s: float) -> LoadResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        async def send(i: int) -> bool:
            r = await client.post(url, content=bodies[i % len(bodies)], headers={"content-type": "application/json"})
            return r.status_code == 200

        return await closed_loop(send, concurrency, duration_s)


def run_load(url: str, x: np.ndarray, rows: int, concurrency: int, duration_s: float) -> LoadResult:
    bodies = []
    for i in range(0, max(len(x) - rows, 1), rows):
        chunk = x[i : i + rows]
        bodies.append(json.dumps({"inputs": [{"name": "input", "shape": list(chunk.shape), "datatype": "FP32",
                                              "data": chunk.ravel().tolist()}]}).encode())
    return asyncio.run(_run(url, bodies, concurrency, duration_s))


def run_wrk(url: str, body: bytes, concurrency: int, duration_s: float, tmpdir: str, warmup: bool = True) -> LoadResult:
    """The same measurement with wrk (C, one thread): far less client overhead than Python.
    Latencies are wrk's percentiles (50/99), reported through `LoadResult.pct`."""
    import re
    import subprocess
    from pathlib import Path

    body_file = Path(tmpdir) / f"body-{len(body)}.json"
    body_file.write_bytes(body)
    script = Path(tmpdir) / f"post-{len(body)}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'local f = io.open("{body_file}", "rb"); wrk.body = f:read("*a"); f:close()\n'
    )
    def wrk(args: list[str]) -> str:
        """One wrk run, retried once: a server that has just started has failed wrk's first
        connection here (exit status 1); a second failure is raised with wrk's own message."""
        cmd = ["wrk", "-t1", f"-c{concurrency}", *args, "-s", str(script), url]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            time.sleep(1.0)
            res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"wrk failed (exit status {res.returncode}): {(res.stderr or res.stdout).strip()}")
        return res.stdout

    if warmup:
        wrk(["-d1s"])
    out = wrk([f"-d{duration_s:g}s", "--latency"])
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0}

    def pct(q: str) -> float:
        m = re.search(rf"^\s*{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * units[m.group(2)] if m else float("nan")

    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    # a synthetic latency list that reproduces wrk's p50 and p99
    p50, p99 = pct("50"), pct("99")
    lat = [p50] * 98 + [p99] * 2
    return LoadResult(total, errors, total / rps if rps else duration_s, lat)
