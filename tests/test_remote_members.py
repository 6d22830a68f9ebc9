"""Remote members (`kind: remote`) against a real second server process (ecoserve.vendor_server):
one that answers (JSON, binary, class names), one slow past its timeout, one answering 500, one
with a malformed body, one with too few values, one that is down. The gateway is the real HTTP
app in process; the served answers, the missing outputs with their reasons, and the recorded
outcomes are asserted."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from serving_cases import infer_body

from ecoserve.server import free_port
from ecoserve.vendor_server import start_vendor, stop_vendor
from models.heldout import load_heldout
from models.manifest import ManifestError, load_manifest
from models.runtime import load_member
from serving.config import parse_serving
from serving.dataplane import Dataplane
from serving.http import build_http_app
from serving.members import LocalMember

ROOT = Path(__file__).resolve().parent

REMOTES = {  # member -> (model name on the remote server, extra remote settings)
    "vendor_ok": ("ok", {}),
    "vendor_bin": ("ok", {"binary": True, "probability_output": "probabilities"}),
    "vendor_names": ("names", {}),
    "vendor_slow": ("slow", {"timeout_s": 0.5}),
    "vendor_500": ("error", {}),
    "vendor_bad": ("malformed", {}),
    "vendor_short": ("short", {}),
    "vendor_down": ("ok", {"down": True}),
}


@pytest.fixture(scope="module")
def remote_server(serving_repo):
    proc, url = start_vendor(serving_repo / "digits/knn/1/model.onnx")
    try:
        yield url
    finally:
        stop_vendor(proc)


@pytest.fixture(scope="module")
def repo(serving_repo, remote_server, tmp_path_factory):
    """digits with remote members added to its manifest."""
    root = tmp_path_factory.mktemp("remote")
    shutil.copytree(serving_repo / "digits", root / "digits")
    manifest = yaml.safe_load((root / "digits/ecosystem.yaml").read_text())
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for name, (model, extra) in REMOTES.items():
        extra = dict(extra)
        url = down if extra.pop("down", False) else remote_server
        manifest["members"].append({"name": name, "version": "v1", "kind": "remote",
                                    "remote": {"url": url, "model": model, **extra}})
    (root / "digits/ecosystem.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def gateway(repo):
    recorded: list = []
    members = ["mlp_a", "logreg", *REMOTES]
    cfg = parse_serving({"model_repository": str(repo), "provider": "cpu", "ecosystems": {
        "digits": {"policy": {"kind": "primary", "primary": "mlp_a"}, "members": members, "member_timeout_s": 2.0},
    }})

    def factory(d, manifest, spec):
        return LocalMember(load_member(d, manifest, spec, "cpu"))

    dataplane = Dataplane.build(cfg, factory, sink=recorded.extend)
    return build_http_app(dataplane), dataplane, recorded


def post(app, path, body) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(path, content=json.dumps(body).encode())

    return asyncio.run(go())


def knn(serving_repo, x):
    sess = ort.InferenceSession(str(serving_repo / "digits/knn/1/model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["label", "probabilities"], {"input": x})


def test_remote_members_answer_or_are_missing_with_their_reason(gateway, serving_repo):
    app, dataplane, recorded = gateway
    x = load_heldout(serving_repo / "digits").X[:5]
    start = len(recorded)
    r = post(app, "/v2/models/digits/infer", infer_body(x, id="rm-1"))
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["served_members"] == ["mlp_a"] * 5
    got = recorded[start:]
    names = list(got[0].members)
    want, _ = knn(serving_repo, x)
    for i, o in enumerate(got):
        preds = dict(zip(names, o.predictions))
        for ok in ("vendor_ok", "vendor_bin", "vendor_names"):
            assert preds[ok] == want[i], (ok, i)
        for bad in ("vendor_slow", "vendor_500", "vendor_bad", "vendor_short", "vendor_down"):
            assert preds[bad] == -1, bad  # missing, never a failure
    snap = dataplane.stats.snapshot()
    assert snap["errors"].get("digits|vendor_slow|timeout", 0) >= 1
    for bad in ("vendor_500", "vendor_bad", "vendor_short", "vendor_down"):
        assert snap["errors"].get(f"digits|{bad}|error", 0) >= 1, (bad, snap["errors"])
    assert any(k.startswith("digits|vendor_ok|remote") for k in snap["latency"]), snap["latency"]


def test_a_remote_member_serves_directly_and_its_failures_say_why(gateway, serving_repo):
    app, _, _ = gateway
    x = load_heldout(serving_repo / "digits").X[:3]
    r = post(app, "/v2/models/digits.vendor_bin/infer", infer_body(x))
    assert r.status_code == 200, r.text
    labels, probs = knn(serving_repo, x)
    assert r.json()["outputs"][0]["data"] == labels.tolist()
    assert np.allclose(r.json()["outputs"][1]["data"], probs.ravel())
    for member, reason in (("vendor_500", "answered HTTP 500"), ("vendor_bad", "not an inference response"),
                           ("vendor_short", "has 2 values, expected 3"), ("vendor_down", "ConnectError"),
                           ("vendor_slow", "no answer within")):
        r = post(app, f"/v2/models/digits.{member}/infer", infer_body(x))
        assert r.status_code == 503, (member, r.text)
        assert reason in r.json()["error"], (member, r.json())


def test_a_failing_remote_primary_falls_back(repo, serving_repo):
    cfg = parse_serving({"model_repository": str(repo), "provider": "cpu", "ecosystems": {
        "digits": {"policy": {"kind": "primary", "primary": "vendor_500"}, "members": ["vendor_500", "logreg"]}}})
    dataplane = Dataplane.build(cfg, lambda d, m, s: LocalMember(load_member(d, m, s, "cpu")))
    r = post(build_http_app(dataplane), "/v2/models/digits/infer", infer_body(load_heldout(serving_repo / "digits").X[:2]))
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["served_members"] == ["logreg", "logreg"]
    assert r.json()["parameters"]["fallback"] == [True, True]


@pytest.mark.parametrize("member, message", [
    ({"name": "r", "version": "1", "kind": "remote"}, "kind remote needs a remote endpoint"),
    ({"name": "r", "version": "1", "kind": "remote", "remote": {"url": "ftp://x", "model": "m"}},
     "must start with http:// or https://"),
    ({"name": "r", "version": "1", "kind": "remote", "path": "r/1/model.onnx",
      "remote": {"url": "http://x", "model": "m"}}, "kind remote needs a remote endpoint and no path"),
    ({"name": "r", "version": "1"}, "kind onnx needs a path"),
])
def test_bad_remote_members_in_a_manifest(serving_repo, tmp_path, member, message):
    shutil.copytree(serving_repo / "digits", tmp_path / "digits")
    manifest = yaml.safe_load((tmp_path / "digits/ecosystem.yaml").read_text())
    manifest["members"].append(member)
    (tmp_path / "digits/ecosystem.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(ManifestError, match=message):
        load_manifest(tmp_path / "digits")
