"""Dashboards as code, alert rules, and `ecoserve dashboards push` against a recording server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from ecoserve.ops.alerts import RULES_FILE, rule_groups, rules_yaml
from ecoserve.ops.dashboards import DASHBOARDS, DASHBOARDS_DIR, build_dashboards, dashboard_json, panel_queries

ROOT = Path(__file__).resolve().parent.parent


def test_committed_dashboards_are_not_stale():
    for uid, d in build_dashboards().items():
        committed = ROOT / DASHBOARDS_DIR / f"{uid}.json"
        assert committed.is_file(), f"{committed} missing: run `ecoserve dashboards generate`"
        assert committed.read_text() == dashboard_json(d), f"{committed} is stale: run `ecoserve dashboards generate`"


def test_committed_rules_are_not_stale():
    assert (ROOT / RULES_FILE).read_text() == rules_yaml(), "run `ecoserve alerts generate`"


def test_dashboards_pass_the_sdk_schema_and_are_templated():
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    for uid, d in build_dashboards().items():
        # the foundation SDK's own types parse it back to the same document (schema check)
        again = json.loads(json.dumps(Dashboard.from_json(d), cls=JSONEncoder))
        assert again == d, uid
        names = {v["name"] for v in d["templating"]["list"]}
        assert {"datasource", "ecosystem", "member", "subgroup", "window"} <= names
        assert d["uid"] == uid and d["title"].startswith("ecoserve / ")
        for panel in d["panels"]:
            assert len(panel.get("description", "")) > 40 and "Bad" in panel["description"], panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
    overview = build_dashboards()["ecoserve-overview"]
    titles = {p["title"] for p in overview["panels"]}
    assert "Systemic failure rate vs independence baseline" in titles and "Pairwise kappa" in titles
    assert len(DASHBOARDS) == 7


def test_every_panel_query_parses_as_promql():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make test installs Debian's prometheus package)")
    for d in build_dashboards().values():
        for title, expr, _ in panel_queries(d):
            q = expr.replace("$window", "5m").replace("$ecosystem", ".*").replace("$member", ".*").replace("$subgroup", ".*")
            # a rule file is the cheapest way to have promtool parse an expression
            text = yaml.safe_dump({"groups": [{"name": "q", "rules": [{"record": "ecoserve:check", "expr": q}]}]})
            proc = subprocess.run([promtool, "check", "rules", "/dev/stdin"], input=text, capture_output=True, text=True)
            assert proc.returncode == 0, (title, q, proc.stdout + proc.stderr)


def test_promtool_checks_and_unit_tests_the_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make test installs Debian's prometheus package)")
    check = subprocess.run([promtool, "check", "rules", str(ROOT / RULES_FILE)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(rule_groups()[0]['rules'])} rules found" in check.stdout and len(rule_groups()[0]["rules"]) == 15
    test = subprocess.run([promtool, "test", "rules", str(ROOT / "tests/promtool/alerts_test.yaml")],
                          capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr
    # every alert is exercised, firing at least once, and has the annotations it promises
    cases = yaml.safe_load((ROOT / "tests/promtool/alerts_test.yaml").read_text())
    fired = {a["alertname"] for t in cases["tests"] for a in t["alert_rule_test"] if a.get("exp_alerts")}
    quiet = {a["alertname"] for t in cases["tests"] for a in t["alert_rule_test"] if not a.get("exp_alerts")}
    rules = yaml.safe_load((ROOT / RULES_FILE).read_text())["groups"][0]["rules"]
    assert fired == {r["alert"] for r in rules}
    assert {"EcoserveSystemicFailureExcess", "EcoserveUnanimityDrop", "EcoserveLabelsStalled"} <= quiet
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    for r in rules:
        assert set(r["annotations"]) == {"summary", "description", "runbook_url"}
        anchor = f"runbook-{r['alert'].lower()}"
        assert r["annotations"]["runbook_url"].endswith(f"docs/runbook.md#{anchor}")
        assert f'<a id="{anchor}"></a>\n### {r["alert"]}\n' in runbook, f"docs/runbook.md entry for {r['alert']} missing"


class _Recorder(BaseHTTPRequestHandler):
    mode = "ok"
    seen: list = []

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method):
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        type(self).seen.append((method, self.path, self.headers.get("authorization"), body))
        if self.mode == "401":
            return self._reply(401, {"message": "invalid API key"})
        if self.mode == "403":
            return self._reply(403, {"message": "Permissions needed: dashboards:write"})
        if self.mode == "500":
            return self._reply(500, {"message": "database is locked"})
        if self.path.startswith("/api/datasources/uid/") and method == "GET":
            return self._reply(404, {"message": "Data source not found"})
        if self.path == "/api/dashboards/db":
            return self._reply(200, {"status": "success", "uid": body["dashboard"]["uid"],
                                     "url": f"/d/{body['dashboard']['uid']}/x", "version": 1})
        return self._reply(200, {"message": "ok", "id": 1})

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")


@pytest.fixture
def grafana():
    _Recorder.seen = []
    srv = HTTPServer(("127.0.0.1", 0), _Recorder)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()


def _push(url, *extra):
    return subprocess.run([sys.executable, "-m", "ecoserve.cli", "dashboards", "push", "--url", url,
                           "--token", "glsa_test", *extra], capture_output=True, text=True, cwd=ROOT)


def test_push_sends_grafanas_dashboard_api_shape(grafana):
    _Recorder.mode = "ok"
    url = f"http://127.0.0.1:{grafana.server_port}"
    proc = _push(url, "--folder-uid", "eco-folder", "--prometheus-url", "http://prometheus:9090")
    assert proc.returncode == 0, proc.stderr
    posts = [s for s in _Recorder.seen if s[0] == "POST" and s[1] == "/api/dashboards/db"]
    assert len(posts) == 7
    for _, _, auth, body in posts:
        assert auth == "Bearer glsa_test"
        assert set(body) >= {"dashboard", "overwrite", "folderUid"}
        assert body["overwrite"] is True and body["folderUid"] == "eco-folder"
        assert body["dashboard"]["uid"] in DASHBOARDS and body["dashboard"]["id"] is None
    ds = [s for s in _Recorder.seen if s[0] == "POST" and s[1] == "/api/datasources"]
    assert ds and ds[0][3]["type"] == "prometheus" and ds[0][3]["url"] == "http://prometheus:9090"
    # idempotent: pushing again sends the same uids with overwrite
    _Recorder.seen = []
    assert _push(url).returncode == 0
    assert sorted(s[3]["dashboard"]["uid"] for s in _Recorder.seen if s[1] == "/api/dashboards/db") == sorted(DASHBOARDS)


@pytest.mark.parametrize("mode, message", [
    ("401", "refused the token (401 Unauthorized)"),
    ("403", "may not write dashboards (403 Forbidden"),
    ("500", "failed: Server Error 500"),
])
def test_push_errors_are_one_line(grafana, mode, message):
    _Recorder.mode = mode
    proc = _push(f"http://127.0.0.1:{grafana.server_port}")
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_push_to_a_down_grafana_or_bad_url():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens
    proc = _push(f"http://127.0.0.1:{port}")
    assert proc.returncode == 2 and "cannot reach Grafana" in proc.stderr and "Traceback" not in proc.stderr
    proc = _push("grafana.local:3000")
    assert proc.returncode == 2 and "--url must be an http(s) URL" in proc.stderr
