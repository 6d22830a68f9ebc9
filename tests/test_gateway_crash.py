"""A gateway replica is killed with records queued, on the real Ray Serve app, with the recorder
inside it (the default) and as its own deployment: after Serve restarts the gateway, the store
holds what was handed over, and `ecoserve_outcomes_lost_total` counts exactly the rest of what
the client was answered for."""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest
from conftest import served_app
from serving_cases import infer_body
from test_telemetry_e2e import metric, scrape

from ecoserve.server import _flush_gateway
from models.heldout import load_heldout

pytestmark = pytest.mark.slow
ROWS = 5


@pytest.fixture(scope="module", params=[True, False], ids=["recorder-in-gateway", "recorder-deployment"])
def server(request, serving_repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    db = tmp / "outcomes.db"
    args = {
        "model_repository": str(serving_repo),
        "provider": "cpu",
        "gateway": {"num_cpus": 0.5},
        # nothing is handed over unless the test asks: the queue is what the kill loses
        "telemetry": {"store_url": f"sqlite:///{db}", "flush_interval_s": 60, "ledger_dir": str(tmp / "ledgers"),
                      "recorder_in_gateway": request.param},
        "ecosystems": {"credit": {"policy": {"kind": "primary", "primary": "logreg"}}},
    }
    with served_app(args, tmp) as running:
        yield running.url, db, tmp / "ledgers"


def stored(db) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM ecoserve_outcomes").fetchone()[0])


def test_gateway_killed_with_records_queued(server, serving_repo):
    import asyncio

    import ray

    url, db, ledgers = server
    x = load_heldout(serving_repo / "credit").X[:ROWS]

    def send(k: int) -> int:
        for _ in range(k):
            r = httpx.post(f"{url}/v2/models/credit/infer", json=infer_body(x), timeout=30)
            assert r.status_code == 200, r.text
        return k * ROWS

    handed = send(6)
    assert asyncio.run(_flush_gateway("ecoserve")) == handed
    assert stored(db) == handed
    queued = send(4)
    assert stored(db) == handed  # still in the gateway's queue
    assert len(list(ledgers.rglob("*.ledger"))) == 1  # the live gateway's ledger

    gateways = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Gateway" in a["name"]
                and "ecoserve" in a["name"]]
    assert len(gateways) == 1, gateways
    ray.kill(ray.get_actor(gateways[0]["name"], namespace=gateways[0]["namespace"]), no_restart=True)

    deadline = time.monotonic() + 120
    m: dict = {}
    while time.monotonic() < deadline:  # Serve restarts the replica; it reclaims the dead ledger
        try:
            m = scrape(url)
            if metric(m, "ecoserve_outcomes_lost_total", ecosystem="credit"):
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    assert metric(m, "ecoserve_outcomes_lost_total", ecosystem="credit") == queued
    assert metric(m, "ecoserve_outcomes_total", ecosystem="credit") == handed  # rebuilt from the store
    assert stored(db) + metric(m, "ecoserve_outcomes_lost_total", ecosystem="credit") == handed + queued
    assert len(list(ledgers.rglob("*.ledger"))) == 1  # the dead one removed; the new replica's own
    # the restarted gateway serves and records again
    more = send(2)
    assert asyncio.run(_flush_gateway("ecoserve")) == more
    assert stored(db) == handed + more
