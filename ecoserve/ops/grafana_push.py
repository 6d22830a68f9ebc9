"""`ecoserve dashboards push`: upload the dashboards (and optionally a Prometheus data source)
to Grafana with grafana-client. Idempotent: the same uid with `overwrite: true` (Grafana's
`POST /api/dashboards/db`). Every failure becomes one `PushError` line."""

from __future__ import annotations

from typing import Any

__all__ = ["PushError", "push_dashboards", "DATASOURCE_UID"]

DATASOURCE_UID = "ecoserve-prometheus"


class PushError(RuntimeError):
    """Pushing to Grafana failed; the message is one line."""


def _explain(exc: Exception, url: str) -> str:
    from grafana_client.client import (
        GrafanaClientError,
        GrafanaServerError,
        GrafanaTimeoutError,
        GrafanaUnauthorizedError,
    )

    if isinstance(exc, GrafanaUnauthorizedError):
        return f"Grafana at {url} refused the token (401 Unauthorized)"
    if isinstance(exc, GrafanaClientError) and exc.status_code == 403:
        return f"Grafana at {url}: the token may not write dashboards (403 Forbidden; needs the Editor role)"
    if isinstance(exc, GrafanaClientError):
        return f"Grafana at {url} rejected the request: {exc.message}"
    if isinstance(exc, GrafanaServerError):
        return f"Grafana at {url} failed: {exc.message}"
    if isinstance(exc, GrafanaTimeoutError):
        return f"Grafana at {url} did not answer in time"
    return f"cannot reach Grafana at {url}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def push_dashboards(
    url: str,
    token: str | None,
    dashboards: dict[str, dict[str, Any]],
    *,
    folder_uid: str | None = None,
    prometheus_url: str | None = None,
    timeout_s: float = 10.0,
) -> list[str]:
    """Upload every dashboard; with `prometheus_url`, create or update a Prometheus data source first.
    Returns one line per action."""
    from urllib.parse import urlparse

    from grafana_client.api import GrafanaApi

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise PushError(f"--url must be an http(s) URL like http://localhost:3000, got {url!r}")
    api = GrafanaApi.from_url(url, credential=token or None, timeout=timeout_s)  # None: user:pass in the URL
    done = []
    try:
        if prometheus_url:
            ds = {"name": "ecoserve Prometheus", "uid": DATASOURCE_UID, "type": "prometheus", "access": "proxy",
                  "url": prometheus_url, "isDefault": False}
            try:
                api.datasource.get_datasource_by_uid(DATASOURCE_UID)
                api.datasource.update_datasource_by_uid(DATASOURCE_UID, ds)
                done.append(f"updated data source {DATASOURCE_UID} -> {prometheus_url}")
            except Exception as exc:
                from grafana_client.client import GrafanaClientError

                if not (isinstance(exc, GrafanaClientError) and exc.status_code == 404):
                    raise
                api.datasource.create_datasource(ds)
                done.append(f"created data source {DATASOURCE_UID} -> {prometheus_url}")
        for uid, d in dashboards.items():
            body: dict[str, Any] = {"dashboard": {**d, "id": None}, "overwrite": True,
                                    "message": "ecoserve dashboards push"}
            if folder_uid:
                body["folderUid"] = folder_uid
            reply = api.dashboard.update_dashboard(body)
            done.append(f"{uid}: {reply.get('status', 'ok')} {url.rstrip('/')}{reply.get('url', '')}")
    except PushError:
        raise
    except Exception as exc:  # grafana-client, niquests and socket errors: one clear line
        raise PushError(_explain(exc, url)) from exc
    return done
