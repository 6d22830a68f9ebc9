"""Hostile input through the real HTTP app, in process, with a real recorder (SQLite): mutated
inference, feedback and outcome bodies (wrong types at every position, huge and tiny numbers,
NaN, deep nesting, NUL and lone surrogates, truncated bodies, invalid UTF-8) never get a server
error, and every refusal carries a message; thousands of undeclared subgroup values keep the
series of /metrics bounded."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import serving_args

from bench.hostile import mutated_bodies
from models.heldout import load_heldout
from models.runtime import load_member
from serving.config import parse_serving
from serving.dataplane import Dataplane
from serving.http import build_http_app
from serving.members import LocalMember
from serving.recording.host import LocalTelemetry, RecorderHost, recorder_specs


@pytest.fixture(scope="module")
def app(serving_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    args = serving_args(serving_repo)
    args["ecosystems"] = {k: v for k, v in args["ecosystems"].items() if k in ("digits", "credit", "diabetes")}
    args["telemetry"] = {"store_url": f"sqlite:///{tmp_path_factory.mktemp('hostile') / 'o.db'}"}
    cfg = parse_serving(args)
    host = RecorderHost(recorder_specs(cfg), cfg.telemetry.model_dump(mode="json"))
    dataplane = Dataplane.build(cfg, lambda d, m, s: LocalMember(load_member(d, m, s, "cpu")),
                                sink=lambda o: host.record(o, "t", {}))
    yield build_http_app(dataplane, LocalTelemetry(host))
    host.close()


def test_mutated_bodies_never_get_a_server_error(app):
    rng = random.Random(20261202)
    failures: list[str] = []

    async def go() -> int:
        sent = 0
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            for path, raw in mutated_bodies(rng, 900):
                r = await client.post(path, content=raw)
                sent += 1
                if r.status_code >= 500 or (r.status_code >= 400 and not r.json().get("error")):
                    failures.append(f"{path} {r.status_code} {r.text[:120]} <- {raw[:160]!r}")
        return sent

    assert asyncio.run(go()) == 900
    assert not failures, failures[:5]


def test_undeclared_subgroup_values_keep_the_series_bounded(app, serving_repo):
    x = load_heldout(serving_repo / "credit").X[:1].ravel().tolist()

    async def go(start: int, n: int) -> str:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            for i in range(start, start + n):
                body = {"id": f"card-{i}", "inputs": [{"name": "input", "shape": [1, 27], "datatype": "FP32", "data": x}],
                        "parameters": {"sex": f"value-{i}", "age_group": f"age-{i}"}}
                assert (await client.post("/v2/models/credit/infer", content=json.dumps(body))).status_code == 200
            return (await client.get("/metrics")).text

    def series(text: str) -> list[str]:
        return [line for line in text.splitlines() if line and not line.startswith("#")]

    few = series(asyncio.run(go(0, 10)))
    many = series(asyncio.run(go(10, 1500)))
    assert len(many) == len(few)  # 1,500 more distinct values: not one series more
    values = {line.split('subgroup_value="')[1].split('"')[0] for line in many if 'subgroup_value="' in line}
    assert values <= {"all", "other", "other&other", "female", "male", "young", "adult"} and "other" in values
