"""`ecoserve serve [CONFIG.yaml]`: start Ray and the Serve app in the foreground; stop it all on exit.

Ingress mode: unless the environment already says otherwise, the HAProxy ingress
(`RAY_SERVE_ENABLE_HA_PROXY=1`) and Serve's throughput-optimized settings
(`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`) are turned on before Ray starts: measured here
they multiply throughput (docs/serving.md). They must be in the environment of
the Ray processes, which is why this sets them and why `k8s/` sets them on the pods.

On Ctrl-C or SIGTERM it shuts Serve and Ray down, then stops any `haproxy` the
server started that is still alive (with `ray stop` one can outlive Ray and keep
port 8000). Every process the server starts (Ray's daemons, its workers, HAProxy)
inherits `ECOSERVE_SERVER_ID` in its environment, so they can all be found again.

Shutdown is bounded (`STOP_DEADLINE_S`) whatever the signal pattern. A signal to the main
process alone (Ctrl-C, `kill PID`): the gateways' queues are flushed to the recorder, then
Serve and Ray stop gracefully. A signal to the whole process group (`kill -- -PGID`,
systemd's `KillMode=control-group`): Ray's own daemons die first, and a graceful stop would
hang waiting for them; so when they are gone, or the graceful stop overruns its deadline,
every process of this server is terminated (SIGTERM, then SIGKILL) by its
`ECOSERVE_SERVER_ID`. Records still queued in a gateway then stay in its crash ledger
(`telemetry.ledger`) and are counted in `ecoserve_outcomes_lost_total` at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ecoserve import DEMO_CONFIG
from serving.config import ConfigError, ServeFile, load_serve_file, port_problem, preflight

__all__ = ["FAST_INGRESS_ENV", "SERVER_ID_ENV", "serve_foreground", "start", "stop", "Running", "free_port",
           "wait_ready", "server_pids"]

log = logging.getLogger(__name__)

FAST_INGRESS_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# A local server has no load balancer to drain from: Serve's 30 s proxy drain would only delay
# Ctrl-C (measured: `serve.delete` took 36 s with HAProxy ingress, 1 s with this at 1 s).
LOCAL_ENV = {"RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
             # a dead HAProxy is restarted after 3 failed proxy health checks: at Serve's 10 s period
             # clients saw 29 s of failures (docs/reliability.md); at 2 s, about 6 s
             "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "2"}
SERVER_ID_ENV = "ECOSERVE_SERVER_ID"
STOP_DEADLINE_S = 9.0  # from the signal: the graceful stop (flush, delete, shutdown) must end by then
KILL_GRACE_S = 2.0  # between SIGTERM and SIGKILL of the server's processes


FREE_PORT_RANGE = (20000, 32000)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for local servers, tests and benchmarks).

    Drawn from 20000-31999, below Linux's ephemeral range (32768+) and above Ray's worker ports
    (10002-19999): a port the kernel hands out for port 0 is an ephemeral one, which any outgoing
    connection (Ray starts many) may take before the server binds it."""
    import random
    import socket

    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(*FREE_PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded range: fall back to the kernel's choice
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


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


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


def _proc_state(pid: int) -> str | None:
    """The process's state letter (`R`, `S`, `Z` for a zombie...), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def server_pids(server_id: str) -> set[int]:
    """Live processes whose environment carries `ECOSERVE_SERVER_ID=server_id` (not this one)."""
    tag = f"{SERVER_ID_ENV}={server_id}".encode()
    found = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if tag in env.split(b"\0") and _proc_state(int(d.name)) not in (None, "Z"):
            found.add(int(d.name))
    return found


def _terminate(pids: set[int], grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM, then SIGKILL what is still alive after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 1.0)
        while time.monotonic() < deadline:
            pids = {p for p in pids if _proc_state(p) not in (None, "Z")}
            if not pids:
                return
            time.sleep(0.1)


def _core_pids() -> dict[int, str]:
    """Ray's own daemons started by this process (GCS, raylet): pid -> state, zombies included."""
    me = os.getpid()
    found = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and _parent(int(d.name)) == me and _comm(int(d.name)) in ("gcs_server", "raylet"):
            state = _proc_state(int(d.name))
            if state is not None:
                found[int(d.name)] = state
    return found


class Running:
    """A started Serve app: its URL, and what must be stopped."""

    def __init__(self, url: str, haproxy_before: set[int], server_id: str, attached_apps: list[str] | None = None) -> None:
        self.url = url
        self._haproxy_before = haproxy_before
        self.server_id = server_id
        self.attached_apps = attached_apps  # attached to a cluster: the applications this server deployed

    def stop(self) -> None:
        """Flush the gateways, stop Serve and Ray, then terminate anything of this server left
        (attached to a cluster: delete this server's applications, and leave the cluster be)."""
        stop(self._haproxy_before, only=self.attached_apps)
        if self.attached_apps is None:
            _terminate(server_pids(self.server_id))  # e.g. an haproxy Ray did not stop


class _Supervisor:
    """Makes `ecoserve serve` stop within `STOP_DEADLINE_S` + `KILL_GRACE_S` of a signal, whatever
    else the signal reached. The main thread may be stuck inside Ray (starting, or flushing through
    a controller that is gone) where no Python signal handler can run; so signals also wake a
    watcher thread through `signal.set_wakeup_fd`. The watcher waits for the main thread's graceful
    stop, and terminates every process of this server (by `ECOSERVE_SERVER_ID`) and exits if Ray's
    own daemons die (the whole process group was signalled), if a second signal comes, or if the
    deadline passes."""

    def __init__(self, attached: bool = False) -> None:
        self.attached = attached  # on a cluster it did not start: never terminate the cluster's processes
        self.server_id = uuid.uuid4().hex
        self.haproxy_before = _haproxy_pids()
        self.stop_requested = threading.Event()
        self.finished = threading.Event()
        self.forcing = threading.Event()  # the watcher is terminating the server's processes
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._watcher = threading.Thread(target=self._watch, name="ecoserve-stop-watch", daemon=True)
        self._watcher.start()

    def install(self) -> None:
        """(Re)take SIGTERM and SIGINT: `ray.init` installs a SIGTERM handler of its own."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)

    def _on_signal(self, signum: int, _: Any) -> None:
        self.stop_requested.set()

    def done(self) -> None:
        """The main thread's stop has ended; if the watcher is terminating processes, let it finish
        (it exits the process)."""
        self.finished.set()
        if self.forcing.is_set():
            self._watcher.join(KILL_GRACE_S + 2.0)

    def _watch(self) -> None:
        self._read.recv(1)  # the first signal
        self.stop_requested.set()
        deadline = time.monotonic() + STOP_DEADLINE_S
        self._read.settimeout(0.1)
        reason = ""
        while not self.finished.is_set():
            try:
                if self._read.recv(1):
                    reason = "a second signal"
                    break
            except (TimeoutError, BlockingIOError):
                pass
            core = _core_pids()
            if core and any(state == "Z" for state in core.values()):
                # Ray's daemons are dying: a graceful stop that was about to end (ray.shutdown) ends now
                if self.finished.wait(2.0):
                    return
                reason = ("Ray's own processes are gone (the whole process group was signalled?); outcome records "
                          "not handed over yet stay in the gateways' ledgers and are counted as lost at the next start")
                break
            if time.monotonic() > deadline:
                reason = f"the graceful stop did not finish within {STOP_DEADLINE_S:.0f} s"
                break
        else:
            return
        self.forcing.set()
        print(f"stopping now: {reason}", flush=True)
        if not self.attached:
            _terminate(server_pids(self.server_id) | (_haproxy_pids() - self.haproxy_before))
        print("stopped (the server's processes were terminated)", flush=True)
        logging.shutdown()
        os._exit(0)  # Ray's exit hooks would wait a minute for daemons that are gone


def start(
    file: ServeFile,
    *,
    num_cpus: int | None = None,
    ready_timeout_s: float = 180.0,
    after_ray_init: Callable[[], None] | None = None,
    server_id: str | None = None,
    address: str | None = None,
) -> Running:
    """Start a local Ray (or attach to the cluster at `address`), deploy the app from the config
    file, wait until it answers ready.

    Without `address` this always starts a new local Ray (`address="local"`), even when a cluster
    started with `ray start` is recorded on the machine. With one (`ecoserve serve --address`, or
    `RAY_ADDRESS`), it attaches: Ray's resources are the cluster's, the variables the config names
    (`auth.feedback_token_env`, `telemetry.store_url_env`) travel to the replicas in the app's
    runtime environment, and stopping deletes only this application."""
    import ray
    from ray import serve

    from serving.app import build_app

    for k, v in {**FAST_INGRESS_ENV, **LOCAL_ENV}.items():
        os.environ.setdefault(k, v)
    server_id = server_id or uuid.uuid4().hex
    haproxy_before = _haproxy_pids()
    app_cfg = file.raw["applications"][file.app_index]
    env = {k: os.environ[k] for k in {**FAST_INGRESS_ENV, **LOCAL_ENV}} | {SERVER_ID_ENV: server_id}
    if address:  # replicas on other nodes do not inherit this process's environment
        env |= {k: os.environ[k] for k in _named_env(file) if k in os.environ}
    else:  # Serve's HAProxy also listens on fixed ports; another Serve on this host may hold them
        env |= _haproxy_side_ports()
    # the tag is in the environment of Ray's daemons (started now) and of every worker (runtime_env),
    # not in this process's: other children of the caller (a test's Prometheus) must not carry it
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": env})
        else:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     logging_level=logging.WARNING, runtime_env={"env_vars": env})
    finally:
        for k, old in previous.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
    if after_ray_init is not None:
        after_ray_init()  # e.g. take SIGTERM back from the handler Ray's core worker installs
    try:
        grpc = file.raw.get("grpc_options")
        serve.start(http_options={"host": file.http_host, "port": file.http_port},
                    **({"grpc_options": grpc} if grpc else {}))
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
        stop(haproxy_before, only=[app_cfg.get("name", "ecoserve")] if address else None)
        raise
    return Running(url, haproxy_before, server_id, [app_cfg.get("name", "ecoserve")] if address else None)


async def _flush_gateway(app_name: str) -> Any:
    from ray import serve

    gw = serve.get_deployment_handle("Gateway", app_name=app_name)
    return await asyncio.wait_for(gw.flush.remote(), timeout=30)


HAPROXY_SIDE_PORTS = {"RAY_SERVE_HAPROXY_METRICS_PORT": 9101, "RAY_SERVE_HAPROXY_STATS_PORT": 8404}


def _haproxy_side_ports() -> dict[str, str]:
    """Ports for HAProxy's own metrics and stats listeners (Serve's defaults: 9101 and 8404): the
    environment's if it sets them, the defaults when free, else free ones. Two Serve instances on
    one host (a cluster's and a local one, or two local ones) would otherwise collide there."""
    out = {}
    for var, default in HAPROXY_SIDE_PORTS.items():
        if var in os.environ:
            out[var] = os.environ[var]
        else:
            out[var] = str(default) if port_problem("0.0.0.0", default) is None else str(free_port())
    return out


def _check_address(address: str, timeout_s: float = 3.0) -> None:
    """A `host:port` cluster address must answer (Ray would retry for minutes): one line if not."""
    import socket

    from serving.config import ConfigError

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", "ray://...": Ray's own forms, left to Ray
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except OSError as exc:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc})") from exc


def _named_env(file: ServeFile) -> list[str]:
    """The environment variables the config names (a token, a store URL)."""
    s = file.serving
    return [*s.auth.token_envs(), *([s.telemetry.store_url_env] if s.telemetry.store_url_env else [])]


def stop(haproxy_before: set[int] | None = None, only: list[str] | None = None) -> None:
    """Flush, delete and stop. `only`: attached to a cluster, delete these applications and
    disconnect, leaving Serve and the cluster running."""
    import ray
    from ray import serve

    try:
        # zero records lost: hand the gateways' queued outcomes to the recorder while it
        # still runs (Serve stops deployments in no fixed order), then delete gracefully
        for name in only if only is not None else list(serve.status().applications):
            try:
                # from inside an event loop: with the throughput-optimized settings in the
                # environment at import, handles route on the caller's loop and refuse sync use
                flushed = asyncio.run(_flush_gateway(name))
                log.info("flushed %s outcome records before shutdown", flushed)
            except Exception as exc:  # no gateway, or telemetry off
                log.warning("flush before shutdown: %s", exc)
            serve.delete(name)
        if only is None:
            serve.shutdown()  # type: ignore[no-untyped-call]
    except Exception as exc:  # shutting down: report, keep going
        log.warning("serve shutdown: %s", exc)
    ray.shutdown()  # attached: disconnects this driver only
    if only is not None:
        return
    for pid in _haproxy_pids() - (haproxy_before or set()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


class ConfigWatcher:
    """Redeploys the running app when its config file changes (`ecoserve rollout` rewrites it): the
    new file is checked as `ecoserve check-config` would, then applied with `serve.run`, Serve's
    in-place update (changed deployments get new replicas; each old gateway replica hands its
    queued outcome records to the recorder before it stops). A file that does not validate is
    reported and ignored: the app keeps serving the last good config. Changes outside the ecoserve
    application's args (HTTP port, proxy) need a restart, and say so."""

    def __init__(self, path: Path, file: ServeFile, every_s: float = 1.0) -> None:
        self.path, self.file, self.every_s = path, file, every_s
        self._seen = self._stamp()
        self._next = time.monotonic() + every_s

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def poll(self) -> bool:
        """Redeploy if the file changed since the last look; True when it did."""
        if time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + self.every_s
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        self._seen = stamp
        try:
            new = load_serve_file(self.path)
            preflight(new, check_port=False)
        except ConfigError as exc:
            print(f"{self.path} changed but is not valid; still serving the previous config: {exc}", flush=True)
            return False
        old_app, app = self.file.raw["applications"][self.file.app_index], new.raw["applications"][new.app_index]
        if {k: v for k, v in new.raw.items() if k != "applications"} != \
                {k: v for k, v in self.file.raw.items() if k != "applications"}:
            print(f"{self.path}: changes outside the application (HTTP/gRPC options, proxy) apply at the next "
                  "start", flush=True)
        if app == old_app:
            return False
        from ray import serve

        from serving.app import build_app

        print(f"{self.path} changed: redeploying the application", flush=True)
        serve.run(build_app(app.get("args") or {}), name=app.get("name", "ecoserve"),
                  route_prefix=app.get("route_prefix", "/"), blocking=False)
        self.file = new
        print("redeployed", flush=True)
        return True


def serve_foreground(config: str | None, address: str | None = None) -> int:
    """`ecoserve serve`: `address` (else `RAY_ADDRESS`) attaches to a running Ray cluster."""
    file = load_serve_file(config or DEMO_CONFIG)
    address = address or os.environ.get("RAY_ADDRESS") or None
    # what would otherwise fail inside Ray, ~30 s later, with the cause in its logs (attached:
    # the HTTP port is the cluster's proxy's, which may already be listening)
    preflight(file, check_port=address is None)
    if address:
        _check_address(address)
    if config is None:
        print(f"serving the demo config {DEMO_CONFIG}")
    supervisor = _Supervisor(attached=address is not None)
    # handlers before Ray starts and again right after (ray.init installs its own SIGTERM
    # handler, which would end the process without the graceful stop); a signal that arrives
    # while starting stops the server as soon as it is up
    supervisor.install()
    running = start(file, after_ray_init=supervisor.install, server_id=supervisor.server_id, address=address)
    supervisor.install()
    print(f"ecoserve is serving at {running.url}  (Ctrl-C to stop)")
    for name in file.serving.ecosystems:
        print(f"  POST {running.url}/v2/models/{name}/infer")
    watcher = ConfigWatcher(Path(config or DEMO_CONFIG), file)
    try:
        # a timed wait: Python runs signal handlers only in the main thread, between its own steps
        while not supervisor.stop_requested.wait(0.2):
            watcher.poll()
    finally:
        print("stopping...", flush=True)
        running.stop()
        supervisor.done()
    print("stopped", flush=True)
    return 0
