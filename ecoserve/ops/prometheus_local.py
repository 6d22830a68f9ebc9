"""A local Prometheus server (Debian's `prometheus` binary) scraping ecoserve, with the alert
rules loaded: what `make demo` and the dashboard integration test start. Stopped by pid."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from ecoserve.ops.alerts import rules_yaml
from ecoserve.server import free_port

__all__ = ["LocalPrometheus", "start_prometheus", "prometheus_binary"]


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


@dataclass
class LocalPrometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def query(self, expr: str) -> list[dict[str, object]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"query failed: {expr}: {body.get('error')}")
        result: list[dict[str, object]] = body["data"]["result"]
        return result


def start_prometheus(
    target: str, workdir: Path, *, port: int | None = None, scrape_interval_s: float = 5.0,
    rules: Path | None = None,
) -> LocalPrometheus:
    """Start Prometheus scraping `target` (host:port, path /metrics); wait until it is ready. The
    alert rules: `rules`, or by default ecoserve's own, written into `workdir`."""
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError("the `prometheus` binary is not installed (Debian: apt-get install prometheus)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    if rules is None:
        rules = workdir / "ecoserve-rules.yaml"
        rules.write_text(rules_yaml())
    config = {
        "global": {"scrape_interval": f"{scrape_interval_s:g}s", "evaluation_interval": f"{scrape_interval_s:g}s"},
        "rule_files": [str(rules.resolve())],
        "scrape_configs": [{"job_name": "ecoserve", "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}],
    }
    cfg = workdir / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    log = workdir / "prometheus.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
            stdout=fh, stderr=subprocess.STDOUT,
        )
    prom = LocalPrometheus(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {log.read_text()[-2000:]}")
        try:
            # ready, and the target scraped once (target discovery reaches the scraper after ~5 s)
            if httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200 and prom.query('up{job="ecoserve"} == 1'):
                return prom
        except (httpx.HTTPError, RuntimeError):
            pass
        time.sleep(0.3)
    prom.stop()
    raise TimeoutError("prometheus did not become ready and scrape ecoserve within 60 s")
