"""Who may do what (docs/security.md): bearer tokens on the label and outcome APIs, tokens scoped
to ecosystems, the optional inference token, constant-time comparison, and no token in an
answer, a log line or a metric. The real HTTP app over real ONNX Runtime sessions and a real
recorder and store (SQLite and PostgreSQL), without Ray."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import fresh_store, serving_args
from sqlalchemy import text

from models.heldout import load_heldout
from models.runtime import load_member
from serving import auth
from serving.config import ConfigError, parse_serving
from serving.dataplane import Dataplane
from serving.http import build_http_app
from serving.members import LocalMember
from serving.recording.host import LocalTelemetry, RecorderHost, recorder_specs
from telemetry.store import SCHEMA_VERSION, open_store

ALL_TOKEN = "all-ecosystems-7f3a9c"
CREDIT_TOKEN = "credit-only-51be02"
INFER_TOKEN = "infer-e8d41f"
TOKENS = (ALL_TOKEN, CREDIT_TOKEN, INFER_TOKEN)
ENV = {"T_ALL": ALL_TOKEN, "T_CREDIT": CREDIT_TOKEN, "T_INFER": INFER_TOKEN}
AUTH = {"feedback_token_env": "T_ALL", "ecosystem_tokens": [{"env": "T_CREDIT", "ecosystems": ["credit"]}],
        "inference_token_env": "T_INFER"}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


class Edge:
    """The HTTP app with every kind of token configured, recording synchronously."""

    def __init__(self, repo: Path, store_url: str) -> None:
        args = serving_args(repo)
        args["ecosystems"] = {k: args["ecosystems"][k] for k in ("digits", "credit")}
        args["telemetry"] = {"store_url": store_url}
        args["auth"] = AUTH
        cfg = parse_serving(args)
        self.host = RecorderHost(recorder_specs(cfg), cfg.telemetry.model_dump(mode="json"))
        dataplane = Dataplane.build(cfg, lambda d, m, s: LocalMember(load_member(d, m, s, "cpu")),
                                    sink=lambda o: self.host.record(o, "t", {}))
        self.app = build_http_app(dataplane, LocalTelemetry(self.host), cfg.auth.credentials())
        self.x = {eco: load_heldout(repo / eco).X[:1] for eco in ("digits", "credit")}
        self.answers: list[str] = []

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
        async def go() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t") as c:
                content = None if body is None else json.dumps(body).encode()
                return await c.request(method, path, content=content, headers=headers)

        r = asyncio.run(go())
        self.answers.append(f"{r.headers}\n{r.text}")
        return r

    def infer(self, eco: str, rid: str, headers: dict[str, str] | None = None) -> httpx.Response:
        x = self.x[eco]
        body = {"id": rid, "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.reshape(-1).tolist()}]}
        return self.request("POST", f"/v2/models/{eco}/infer", body, bearer(INFER_TOKEN) if headers is None else headers)

    def label(self, rid: str, token: str | None, label: Any = 1) -> httpx.Response:
        return self.request("POST", "/v2/feedback", {"request_id": rid, "label": label},
                            bearer(token) if token else None)

    def metric(self, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        line = f"{name}{{{want}}} " if labels else f"{name} "
        for row in self.request("GET", "/metrics").text.splitlines():
            if row.startswith(line):
                return float(row.split()[-1])
        raise KeyError(line)

    def labels_of(self, rid: str) -> list[Any]:
        return [h["label"] for h in self.host.store.label_history(rid)]


@pytest.fixture(params=["sqlite", "postgresql"])
def edge(request: pytest.FixtureRequest, serving_repo: Path, tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[Edge]:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    with fresh_store(request.param, tmp_path) as url:
        e = Edge(serving_repo, url)
        yield e
        e.host.close()


def test_label_apis_need_a_token(edge: Edge) -> None:
    assert edge.infer("credit", "c1").status_code == 200
    for headers, why in [(None, "needs 'Authorization: Bearer <token>'"),
                         ({"authorization": ALL_TOKEN}, "needs 'Authorization: Bearer <token>'"),  # no scheme
                         (bearer("wrong"), "the bearer token is wrong"),
                         (bearer(ALL_TOKEN + "x"), "the bearer token is wrong"),
                         (bearer(INFER_TOKEN), "the bearer token is wrong")]:  # the inference token labels nothing
        for path, body in [("/v2/feedback", {"request_id": "c1", "label": 1}),
                           ("/v2/outcomes", {"outcomes": [{"request_id": "o1", "ecosystem": "credit", "outputs": {"knn": 1}}]})]:
            r = edge.request("POST", path, body, headers)
            assert r.status_code == 401 and why in r.json()["error"], (path, headers, r.text)
    assert edge.labels_of("c1") == [] and edge.host.store.get_outcomes(["o1"]) == {}
    assert edge.label("c1", ALL_TOKEN).json()["counts"] == {"joined": 1}


def test_inference_token_when_configured(edge: Edge) -> None:
    assert edge.infer("digits", "d0", headers={}).status_code == 401
    assert edge.infer("digits", "d0", headers=bearer(ALL_TOKEN)).status_code == 401
    assert edge.host.store.get_outcomes(["d0"]) == {}  # a refused request records nothing
    assert edge.infer("digits", "d0").status_code == 200
    assert edge.request("GET", "/v2/health/ready").status_code == 200  # probes and metadata stay open
    assert edge.request("GET", "/metrics").status_code == 200


def test_a_scoped_token_labels_its_ecosystems_only(edge: Edge) -> None:
    assert edge.infer("credit", "c1").status_code == 200 and edge.infer("digits", "d1").status_code == 200
    # a label for another ecosystem's outcome: 403 naming the item; nothing of the batch applied
    r = edge.request("POST", "/v2/feedback", [{"request_id": "c1", "label": 1}, {"request_id": "d1", "label": 3}],
                     bearer(CREDIT_TOKEN))
    assert r.status_code == 403 and r.json()["error"] == "item 1: request_id: this token does not cover ecosystem 'digits'"
    assert edge.labels_of("c1") == [] and edge.labels_of("d1") == []
    assert edge.label("c1", CREDIT_TOKEN).json()["counts"] == {"joined": 1}
    assert edge.label("d1", ALL_TOKEN, 3).json()["counts"] == {"joined": 1}
    # outcomes from outside: the same rule, per record
    r = edge.request("POST", "/v2/outcomes", {"outcomes": [
        {"request_id": "o1", "ecosystem": "digits", "outputs": {"knn": 1}}]}, bearer(CREDIT_TOKEN))
    assert r.status_code == 403 and r.json()["error"] == "item 0: this token does not cover ecosystem 'digits'"
    assert edge.host.store.get_outcomes(["o1", "o2"]) == {}


def test_a_held_label_keeps_its_token_scope(edge: Edge) -> None:
    # labels before their outcomes: held; the scoped one may only join a credit outcome
    for rid in ("early-c", "early-d"):
        assert edge.label(rid, CREDIT_TOKEN).json()["counts"] == {"pending": 1}
    assert edge.label("early-d2", ALL_TOKEN).json()["counts"] == {"pending": 1}
    assert edge.infer("credit", "early-c").status_code == 200
    assert edge.infer("digits", "early-d").status_code == 200  # a poisoning attempt: dropped, counted
    assert edge.infer("digits", "early-d2").status_code == 200
    assert edge.labels_of("early-c") == [1.0] and edge.labels_of("early-d") == [] and edge.labels_of("early-d2") == [1.0]
    assert edge.metric("ecoserve_labels_rejected_total", reason="scope") == 1
    assert edge.metric("ecoserve_labels_rejected_total", reason="label") == 0
    assert edge.metric("ecoserve_labels_pending") == 0


def test_tokens_never_reach_an_answer_a_log_or_a_metric(edge: Edge, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    edge.infer("credit", "c1")
    edge.infer("credit", "c2", headers=bearer(INFER_TOKEN[:-1]))
    for token in (*TOKENS, "guess-" + ALL_TOKEN, ALL_TOKEN[:-2]):
        edge.label("c1", token)
        edge.request("POST", "/v2/outcomes", {"outcomes": [{"request_id": "o9", "ecosystem": "digits",
                                                            "outputs": {"knn": 1}}]}, bearer(token))
    edge.request("GET", "/metrics")
    seen = "\n".join(edge.answers) + "\n" + caplog.text
    assert "401" in seen or "wrong" in seen  # the refusals were made and captured
    for token in TOKENS:
        assert token not in seen and token[:8] not in seen


def test_every_configured_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    creds = auth.Credentials("t-all", (("t-one", frozenset({"a"})), ("t-two", frozenset({"b"}))))
    for presented, scope in [("t-all", None), ("t-one", {"a"}), ("t-two", {"b"})]:
        calls.clear()
        assert auth.authorize_labels(f"Bearer {presented}", creds) == (None if scope is None else frozenset(scope))
        assert len(calls) == 3  # no early exit: which token matched does not show in the time taken
    calls.clear()
    with pytest.raises(auth.Unauthorized):
        auth.authorize_labels("Bearer \udcff\x00", creds)  # odd bytes are compared, not crashed on
    assert len(calls) == 3


@pytest.mark.parametrize("change, message", [
    ({"ecosystem_tokens": [{"env": "T_CREDIT", "ecosystems": ["nope"]}]},
     "auth.ecosystem_tokens[0].ecosystems: 'nope' is not a served ecosystem"),
    ({"ecosystem_tokens": [{"env": "T_CREDIT", "ecosystems": []}]}, "ecosystem_tokens.0.ecosystems"),
    ({"feedback_token_env": "T_ALL", "ecosystem_tokens": [{"env": "T_SAME", "ecosystems": ["credit"]}]},
     "auth: two label tokens have the same value"),
    ({"ecosystem_tokens": [{"env": "T_UNSET", "ecosystems": ["credit"]}]},
     "auth.ecosystem_tokens[0].env: environment variable 'T_UNSET' is empty or unset"),
    ({"inference_token_env": "T_UNSET"}, "auth.inference_token_env: environment variable 'T_UNSET' is empty or unset"),
])
def test_bad_token_settings_are_refused_by_name(serving_repo: Path, monkeypatch: pytest.MonkeyPatch,
                                                 change: dict[str, Any], message: str) -> None:
    monkeypatch.setenv("T_ALL", ALL_TOKEN)
    monkeypatch.setenv("T_SAME", ALL_TOKEN)
    monkeypatch.setenv("T_CREDIT", CREDIT_TOKEN)
    monkeypatch.delenv("T_UNSET", raising=False)
    args = serving_args(serving_repo)
    args["auth"] = change
    with pytest.raises((ConfigError, ValueError)) as err:
        parse_serving(args).auth.credentials()
    assert message in str(err.value)
    assert ALL_TOKEN not in str(err.value)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_version_3_store_gets_scoped_held_labels(kind: str, tmp_path: Path) -> None:
    with fresh_store(kind, tmp_path) as url:
        store = open_store(url)
        with store.engine.begin() as conn:  # back to the v3 layout: no scope, a 16-character source
            conn.exec_driver_sql("ALTER TABLE ecoserve_pending_labels DROP COLUMN scope")
            if kind == "postgresql":
                conn.exec_driver_sql("ALTER TABLE ecoserve_pending_labels ALTER COLUMN source TYPE VARCHAR(16)")
            conn.execute(text("UPDATE ecoserve_schema SET version = 3"))
        store.close()
        store = open_store(url)
        try:
            with store.engine.connect() as conn:
                assert conn.execute(text("SELECT version FROM ecoserve_schema")).scalar() == SCHEMA_VERSION == 7
            row = {"request_id": "r", "label": 1, "source": "s" * 64, "label_time": 1.0, "received_at": 1.0,
                   "scope": frozenset({"credit"})}
            with store.engine.begin() as conn:
                store._add_pending(conn, [row])
            (held,) = store.pending_for(["r"])
            assert held["source"] == "s" * 64 and held["scope"] == frozenset({"credit"})
        finally:
            store.close()


def test_held_label_sources_of_64_characters_are_kept(edge: Edge) -> None:
    # the store's pending table once held 16 characters: a longer source was refused on PostgreSQL
    r = edge.request("POST", "/v2/feedback", {"request_id": "late", "label": 1, "source": "z" * 64}, bearer(ALL_TOKEN))
    assert r.status_code == 200 and r.json()["counts"] == {"pending": 1}
    assert edge.infer("credit", "late").status_code == 200
    assert [h["origin"] for h in edge.host.store.label_history("late")] == ["z" * 64]
    assert np.isfinite(edge.metric("ecoserve_labels_pending"))
