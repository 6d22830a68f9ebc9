"""Client-supplied text at the edge: the rule (`telemetry.text`), and a property test that feeds
generated text into every client-supplied string field through the real HTTP app, with a real
recorder on SQLite and on the PostgreSQL server: every answer is a 2xx or a 4xx, and every row
answered 200 is stored."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import fresh_store, serving_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_cases import infer_body

from models.heldout import load_heldout
from models.runtime import load_member
from serving.config import parse_serving
from serving.dataplane import Dataplane
from serving.http import build_http_app
from serving.members import LocalMember
from serving.recording.host import LocalTelemetry, RecorderHost, recorder_specs
from telemetry.text import id_problem, text_problem


@pytest.mark.parametrize("value", ["a", "req-1/0", "x" * 128, "!~", "0190a3c2e1f47000a1b2c3d4e5f60718"])
def test_ids_that_pass(value):
    assert id_problem(value) is None


@pytest.mark.parametrize("value,message", [
    ("", "must not be empty"),
    ("x" * 129, "is 129 characters long; at most 128"),
    ("\x00", "character U+0000 at position 0"),
    ("a b", "character U+0020 at position 1"),
    ("a\tb", "character U+0009"),
    ("\x7f", "character U+007F"),
    ("caf\u00e9", "character U+00E9 at position 3"),
    ("\ud800", "character U+D800"),
    (7, "must be a string, got int"),
])
def test_ids_that_fail_say_why_without_echoing_the_value(value, message):
    problem = id_problem(value)
    assert problem is not None and message in problem
    if isinstance(value, str) and value:
        assert value not in problem or value.isalnum()


@pytest.mark.parametrize("value,ok", [
    ("female", True), ("caf\u00e9 \u4e2d\u6587 emoji \U0001f600", True), ("x" * 64, True),
    ("x" * 65, False), ("a\x00", False), ("line\nbreak", False), ("\x85", False), ("\udc80", False),
])
def test_free_text(value, ok):
    assert (text_problem(value) is None) == ok


# ---------------------------------------------------------------- the property test


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fresh_store(request.param, tmp_path_factory.mktemp("text")) as url:
        yield url


class Edge:
    """The real HTTP app over the data plane, recording synchronously into a real recorder."""

    def __init__(self, repo: Path, store_url: str) -> None:
        args = serving_args(repo)
        args["ecosystems"] = {"credit": args["ecosystems"]["credit"]}
        args["telemetry"] = {"store_url": store_url}
        cfg = parse_serving(args)
        self.host = RecorderHost(recorder_specs(cfg), cfg.telemetry.model_dump(mode="json"))

        def factory(d: Path, manifest: Any, spec: Any) -> LocalMember:
            return LocalMember(load_member(d, manifest, spec, "cpu"), None)

        self.app = build_http_app(Dataplane.build(cfg, factory, sink=lambda o: self.host.record(o, "t", {})),
                                  LocalTelemetry(self.host))
        self.x = load_heldout(repo / "credit").X[:2].tolist()

    def call(self, path: str, body: Any, headers: dict[str, Any] | None = None) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                return await c.post(path, content=json.dumps(body).encode(), headers=headers)

        return asyncio.run(go())

    def infer(self, parameters: dict[str, Any] | None = None, headers: dict[str, Any] | None = None,
              **extra: Any) -> httpx.Response:
        import numpy as np

        body = infer_body(np.asarray(self.x, dtype=np.float32), **extra)
        if parameters is not None:
            body["parameters"] = parameters
        return self.call("/v2/models/credit/infer", body, headers)


@pytest.fixture(scope="module")
def edge(serving_repo: Path, module_store: str) -> Iterator[Edge]:
    e = Edge(serving_repo, module_store)
    yield e
    e.host.close()


# any Unicode, lone surrogates included (Python's JSON decoder lets "\ud800" through)
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=200) | st.sampled_from(
    ["\x00", "a\x00b", "\ud800", "x" * 129, "y" * 10_000, "ok-id", "\u00e9", " ", "a/b"])
# what an HTTP client can put in a header: visible ASCII, spaces inside, and raw bytes over 0x7F
HEADER_BYTES = st.binary(min_size=1, max_size=300).map(
    lambda b: bytes(c for c in b if c == 0x20 or 0x21 <= c <= 0x7E or c >= 0x80).strip() or b"h")
FIELDS = ["id", "request_ids", "sex", "subgroups", "header", "feedback_id", "source", "label"]


def _stored(edge: Edge, ids: list[str]) -> bool:
    return len(edge.host.store.get_outcomes(ids)) == len(ids)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), text=ANY_TEXT, header=HEADER_BYTES, n=st.integers(0, 10**9))
def test_generated_text_in_every_field_is_a_2xx_or_4xx_and_every_2xx_row_is_stored(edge, field, text, header, n):
    tag = f"p{n}-{uuid.uuid4().hex[:8]}"
    if field in ("feedback_id", "source", "label"):
        item = {"request_id": tag, "label": 1, "source": "hyp"}
        item[{"feedback_id": "request_id", "source": "source", "label": "label"}[field]] = text
        r = edge.call("/v2/feedback", {"labels": [item]})
        assert r.status_code in (200, 413, 422), r.text
        if r.status_code == 200:  # held for its outcome, or joined one stored by an earlier example
            status, rid = r.json()["results"][0]["status"], item["request_id"]
            if status == "pending":
                assert edge.host.store.count_pending() >= 1
            else:
                assert edge.host.store.get_outcomes([rid])[rid].label is not None, status
        return
    if field == "id":
        r = edge.infer(id=text)
    elif field == "request_ids":
        r = edge.infer({"request_ids": [tag, text]})
    elif field == "sex":
        r = edge.infer({"sex": text})
    elif field == "subgroups":
        r = edge.infer({"subgroups": [{"age_group": text}, {"age_group": "young"}]})
    else:
        r = edge.infer(headers={"x-request-id": header})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        ids = r.json()["parameters"]["request_ids"]
        assert _stored(edge, ids), ids
        assert all(id_problem(i) is None for i in ids)
        assert id_problem(r.headers["x-request-id"]) is None
    else:
        assert r.json()["error"]


def test_the_store_holds_exactly_what_was_answered(edge):
    """After the property test's traffic: a fresh good request is stored and counted as usual."""
    r = edge.infer({"request_ids": ["after-a", "after-b"], "sex": "female"})
    assert r.status_code == 200, r.text
    assert _stored(edge, ["after-a", "after-b"])
    got = edge.host.store.get_outcomes(["after-a"])["after-a"]
    assert got.groups == {"sex": "female"}
