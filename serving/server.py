"""`ecoserve serve [CONFIG.yaml]`: start Ray and the Serve app in the foreground; stop it all on exit.

Ingress mode: unless the environment already says otherwise, the HAProxy ingress
(`RAY_SERVE_ENABLE_HA_PROXY=1`) and Serve's throughput-optimized settings
(`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`) are turned on before Ray starts: measured here
they multiply throughput (README "Serving"). They must be in the environment of
the Ray processes, which is why this sets them and why `k8s/` sets them on the pods.

On Ctrl-C or SIGTERM it shuts Serve and Ray down, then stops any `haproxy` the
session started that is still alive (with `ray stop` one can outlive Ray and keep
port 8000).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import httpx

from serving.config import DEMO_CONFIG, ServeFile, load_serve_file

__all__ = ["FAST_INGRESS_ENV", "serve_foreground", "start", "stop", "Running", "free_port", "wait_ready"]

log = logging.getLogger(__name__)

FAST_INGRESS_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# A local server has no load balancer to drain from: Serve's 30 s proxy drain would only delay
# Ctrl-C (measured: `serve.delete` took 36 s with HAProxy ingress, 1 s with this at 1 s).
LOCAL_ENV = {"RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for local servers, tests and benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: Any = None, timeout_s: float = 240.0) -> None:
    """Poll `url`/v2/health/ready until 200; fail early if `proc` (a Popen) exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server process exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/v2/health/ready did not answer within {timeout_s} s")
        time.sleep(0.25)


def _haproxy_pids() -> set[int]:
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == "haproxy":
                    pids.add(int(d.name))
            except OSError:
                continue
    return pids


class Running:
    """A started Serve app: its URL, and what must be stopped."""

    def __init__(self, url: str, haproxy_before: set[int]) -> None:
        self.url = url
        self._haproxy_before = haproxy_before

    def stop(self) -> None:
        stop(self._haproxy_before)


def start(
    file: ServeFile,
    *,
    num_cpus: int | None = None,
    ready_timeout_s: float = 180.0,
    after_ray_init: Callable[[], None] | None = None,
) -> Running:
    """Start a local Ray, deploy the app from the config file, wait until it answers ready."""
    import ray
    from ray import serve

    from serving.app import build_app

    for k, v in {**FAST_INGRESS_ENV, **LOCAL_ENV}.items():
        os.environ.setdefault(k, v)
    haproxy_before = _haproxy_pids()
    app_cfg = file.raw["applications"][file.app_index]
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {k: os.environ[k] for k in {**FAST_INGRESS_ENV, **LOCAL_ENV}}},
    )
    if after_ray_init is not None:
        after_ray_init()  # e.g. take SIGTERM back from the handler Ray's core worker installs
    try:
        serve.start(http_options={"host": file.http_host, "port": file.http_port})
        serve.run(
            build_app(app_cfg.get("args") or {}),
            name=app_cfg.get("name", "ecoserve"),
            route_prefix=app_cfg.get("route_prefix", "/"),
            blocking=False,
        )
        host = "127.0.0.1" if file.http_host in ("0.0.0.0", "::") else file.http_host
        url = f"http://{host}:{file.http_port}"
        wait_ready(url, timeout_s=ready_timeout_s)
    except BaseException:
        stop(haproxy_before)
        raise
    return Running(url, haproxy_before)


async def _flush_gateway(app_name: str) -> Any:
    from ray import serve

    gw = serve.get_deployment_handle("Gateway", app_name=app_name)
    return await asyncio.wait_for(gw.flush.remote(), timeout=30)


def stop(haproxy_before: set[int] | None = None) -> None:
    import ray
    from ray import serve

    try:
        # zero records lost: hand the gateways' queued outcomes to the recorder while it
        # still runs (Serve stops deployments in no fixed order), then delete gracefully
        for name in list(serve.status().applications):
            try:
                # from inside an event loop: with the throughput-optimized settings in the
                # environment at import, handles route on the caller's loop and refuse sync use
                flushed = asyncio.run(_flush_gateway(name))
                log.info("flushed %s outcome records before shutdown", flushed)
            except Exception as exc:  # no gateway, or telemetry off
                log.warning("flush before shutdown: %s", exc)
            serve.delete(name)
        serve.shutdown()
    except Exception as exc:  # shutting down: report, keep going
        log.warning("serve shutdown: %s", exc)
    ray.shutdown()
    for pid in _haproxy_pids() - (haproxy_before or set()):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def serve_foreground(config: str | None) -> int:
    file = load_serve_file(config or DEMO_CONFIG)
    if config is None:
        print(f"serving the demo config {DEMO_CONFIG}")
    done = threading.Event()

    def _stop(signum: int, _: Any) -> None:
        done.set()

    def install() -> None:
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)

    # handlers before Ray starts and again right after (ray.init installs its own SIGTERM
    # handler, which would end the process without the graceful stop); a signal that arrives
    # while starting stops the server as soon as it is up
    install()
    running = start(file, after_ray_init=install)
    install()
    print(f"ecoserve is serving at {running.url}  (Ctrl-C to stop)")
    for name in file.serving.ecosystems:
        print(f"  POST {running.url}/v2/models/{name}/infer")
    try:
        done.wait()
    finally:
        print("stopping...")
        running.stop()
    return 0
