"""`ecoserve rollout promote|rollback`: the config file rewritten (comments kept, checked before it
is replaced), and, on the real Ray app under traffic, Serve's redeploy switching the served
version with no outcome lost and every outcome recording the versions that produced it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from conftest import serving_args, write_serve_file
from serving_cases import infer_body

from serving.config import load_serve_file

ROOT = Path(__file__).resolve().parent.parent


def ecoserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ecoserve.cli", *args], capture_output=True, text=True, cwd=ROOT)


def credit_args(repo: Path, tmp: Path) -> dict:
    args = serving_args(repo)
    args["ecosystems"] = {"credit": {"policy": {"kind": "primary", "primary": "gboost"}}}
    args["telemetry"] = {"store_url": f"sqlite:///{tmp / 'o.db'}", "flush_interval_s": 0.1}
    return args


def test_promote_and_rollback_rewrite_the_config(serving_repo: Path, tmp_path: Path) -> None:
    path = write_serve_file(tmp_path / "serve.yaml", 8123, credit_args(serving_repo, tmp_path))
    path.write_text("# our production config: keep this comment\n" + path.read_text())
    original = path.read_text().splitlines()
    r = ecoserve("rollout", "promote", "credit", "gboost", "2", "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert set(original) <= set(path.read_text().splitlines())  # lines added, none rewritten
    assert "credit.gboost now serves version 2 (was 1); version 1 stays in shadow" in r.stdout
    assert path.read_text().startswith("# our production config: keep this comment\n")
    eco = load_serve_file(path).serving.ecosystems["credit"]
    assert eco.versions == {"gboost": "2"} and eco.candidates == {"gboost": "1"}
    r = ecoserve("rollout", "rollback", "credit", "gboost", "--config", str(path), "--no-shadow")
    assert r.returncode == 0, r.stderr
    eco = load_serve_file(path).serving.ecosystems["credit"]
    assert eco.versions == {"gboost": "1"} and eco.candidates == {}
    before = path.read_text()
    for args, message in [
        (("promote", "credit", "gboost", "7"), "credit.gboost: no version '7' in the repository (2, 1)"),
        (("promote", "credit", "gboost", "1"), "version '1' is the one it serves already"),
        (("promote", "credit", "nope", "1"), "credit: no member 'nope'"),
        (("promote", "digits", "mlp_a", "2"), "no ecosystem 'digits' in the config (credit)"),
        (("rollback", "credit", "gboost"), "no version in shadow to roll back to; give --to VERSION"),
    ]:
        r = ecoserve("rollout", *args, "--config", str(path))
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert path.read_text() == before  # a refused rollout leaves the file as it was
    r = ecoserve("rollout", "promote", "credit", "gboost", "2", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "no such config file" in r.stderr
    # the serving machine's secrets need not be set where the rollout is written (a token variable
    # the config names, unset here), and a list indented under its key keeps that indentation
    args = credit_args(serving_repo, tmp_path)
    args["auth"] = {"feedback_token_env": "ECOSERVE_ROLLOUT_TEST_UNSET"}
    styled = tmp_path / "styled.yaml"
    styled.write_text(yaml.safe_dump({"proxy_location": "HeadOnly", "http_options": {"port": 8124}}) +
                      "applications:\n  - name: ecoserve\n    route_prefix: /\n    import_path: serving.app:build_app\n"
                      "    args: " + json.dumps(args) + "\n")
    r = ecoserve("rollout", "promote", "credit", "gboost", "2", "--config", str(styled))
    assert r.returncode == 0, r.stderr
    assert "  - name: ecoserve" in styled.read_text().splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["colocated", "per_member"])
def test_promote_and_rollback_under_traffic_lose_nothing(serving_repo: Path, tmp_path: Path, placement: str) -> None:
    from conftest import served_app

    from ecoserve.server import ConfigWatcher
    from models.heldout import load_heldout
    from telemetry.store import open_store

    x = load_heldout(serving_repo / "credit").X.astype(np.float32)
    args = credit_args(serving_repo, tmp_path)
    args["placement"] = placement
    with served_app(args, tmp_path) as running:
        path = tmp_path / "serve.yaml"  # the file served_app wrote and started from
        watcher = ConfigWatcher(path, load_serve_file(path), every_s=0.2)
        answered: list[str] = []
        errors: list[str] = []
        stop = threading.Event()

        def client(k: int) -> None:
            with httpx.Client(timeout=30) as c:
                i = 0
                while not stop.is_set():
                    rid = f"c{k}-{i}"
                    r = c.post(f"{running.url}/v2/models/credit/infer",
                               json=infer_body(x[i % len(x)][None, :], parameters={"request_id": rid}) | {"id": rid})
                    if r.status_code == 200:
                        answered.append(rid)
                    else:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                    i += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(2)
            for step in (("promote", "credit", "gboost", "2"), ("rollback", "credit", "gboost")):
                r = ecoserve("rollout", *step, "--config", str(path))
                assert r.returncode == 0, r.stderr
                deadline = time.monotonic() + 60
                while not watcher.poll():
                    assert time.monotonic() < deadline, "the watcher did not see the change"
                    time.sleep(0.1)
                want = "2" if step[0] == "promote" else "1"
                from ecoserve.rollout import wait_for_version

                wait_for_version(running.url, "credit", "gboost", want, timeout_s=60)
                time.sleep(2)  # traffic on the new version
        finally:
            stop.set()
            for t in threads:
                t.join()
        if placement == "colocated":
            assert not errors, errors[:5]
        else:  # Serve restarts every member deployment on a redeploy: some requests of the switch fail
            assert all(e.startswith("503 ") for e in errors) and len(errors) < len(answered) / 10, errors[:5]
        # every answered outcome stored (the replaced gateways handed their queues over), none lost
        deadline = time.monotonic() + 30
        store = open_store(args["telemetry"]["store_url"])
        try:
            while store.count_outcomes() < len(answered) and time.monotonic() < deadline:
                time.sleep(0.2)
            with store.engine.connect() as conn:
                rows = conn.exec_driver_sql(
                    "SELECT request_id, versions, candidates FROM ecoserve_outcomes_v").fetchall()
        finally:
            store.close()
        stored = {r[0] for r in rows}
        assert set(answered) <= stored and len(stored) == len(answered)
        metrics = httpx.get(f"{running.url}/metrics", timeout=30).text
        lost = [line for line in metrics.splitlines() if line.startswith("ecoserve_outcomes_lost_total{")]
        assert lost and all(line.endswith(" 0.0") for line in lost), lost
        # each outcome names the versions that produced it: gboost served v1, then v2, then v1 again,
        # with the other version in shadow after the first switch
        import json

        gboost = {}
        for _rid, versions, cands in rows:
            served_v = json.loads(versions)[2]
            shadow = json.loads(cands) if cands else []
            gboost.setdefault(served_v, 0)
            gboost[served_v] += 1
            for _a, current, cand, *_ in shadow:
                assert current == served_v and cand != served_v
        assert set(gboost) == {"1", "2"}, gboost
