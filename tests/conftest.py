"""Shared fixtures: a demo model repository built once per test session."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three demo ecosystems, built fresh into a temporary repository (about 8 s)."""
    from models.build import build_models

    repo = tmp_path_factory.mktemp("repo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_models(repo)
    return repo


def _copy_ecosystem(src: Path, dst: Path, name: str) -> None:
    import shutil

    import yaml

    shutil.copytree(src, dst / name)
    manifest = yaml.safe_load((dst / name / "ecosystem.yaml").read_text())
    manifest["name"] = name
    (dst / name / "ecosystem.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


@pytest.fixture(scope="session")
def serving_repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo repository plus copies of digits for fault-injection scenarios."""
    import shutil

    repo = tmp_path_factory.mktemp("serving_repo")
    for eco in ("digits", "credit", "diabetes", "digits_chain", "shop"):
        shutil.copytree(model_repo / eco, repo / eco)
    for name in ("faulty", "broken", "dead"):
        _copy_ecosystem(model_repo / "digits", repo, name)
    _copy_ecosystem(model_repo / "digits_chain", repo, "chain_good")  # its candidate: chain v3 (helps)
    return repo


def serving_args(repo: Path) -> dict:
    """ecoserve args used by the serving tests (with and without Ray)."""
    return {
        "model_repository": str(repo),
        "provider": "cpu",
        "gateway": {"num_cpus": 0.5},
        "batching": {"max_batch_size": 32, "batch_wait_timeout_s": 0.002},
        "limits": {"max_body_bytes": 200_000, "max_rows_per_request": 256},
        "ecosystems": {
            "digits": {"policy": {"kind": "primary", "primary": "mlp_a"}},
            "credit": {"policy": {"kind": "thompson", "seed": 3, "min_propensity": 0.05}},
            # shadows that raise or hang must not change the served answer
            "faulty": {
                "policy": {"kind": "primary", "primary": "mlp_a"},
                "member_timeout_s": 0.5,
                "faults": {"knn": {"error": True}, "forest": {"delay_s": 3.0}},
            },
            # the served member fails: the policy's next choice answers
            "broken": {"policy": {"kind": "primary", "primary": "knn"}, "faults": {"knn": {"error": True}}},
            # a regression ecosystem: values, not classes; a failing shadow gives a missing value
            "diabetes": {"policy": {"kind": "primary", "primary": "ridge"}, "faults": {"knn": {"error": True}}},
            # nothing can answer: 503
            "dead": {
                "policy": {"kind": "epsilon_greedy", "epsilon": 0.5, "seed": 1},
                "members": ["logreg", "knn"],
                "faults": {"logreg": {"error": True}, "knn": {"error": True}},
            },
        },
    }


def inprocess_dataplane(repo: Path, sink: Any = None) -> Any:
    """The data plane of `serving_args(repo)` without Ray: real ONNX Runtime sessions
    (`LocalMember`, with the config's fault injection), recording into `sink`."""
    from models.runtime import load_member
    from serving.config import parse_serving
    from serving.dataplane import Dataplane
    from serving.members import LocalMember

    cfg = parse_serving(serving_args(repo))

    def factory(d: Path, manifest: Any, spec: Any) -> LocalMember:
        return LocalMember(load_member(d, manifest, spec, "cpu"), cfg.ecosystems[manifest.name].faults.get(spec.name))

    return Dataplane.build(cfg, factory, sink=sink)


class Proc(NamedTuple):
    """One process as /proc shows it (the tests that check what a server left behind)."""

    pid: int
    ppid: int
    sid: int
    state: str  # "Z": a zombie, gone but not reaped
    comm: str
    cmdline: bytes
    environ: bytes  # empty where it cannot be read


def processes() -> list[Proc]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            comm, cmdline = (d / "comm").read_text().strip(), (d / "cmdline").read_bytes()
        except OSError:
            continue
        try:
            environ = (d / "environ").read_bytes()
        except OSError:
            environ = b""
        out.append(Proc(int(d.name), int(fields[1]), int(fields[3]), fields[0], comm, cmdline, environ))
    return out


PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:
        return False


@contextmanager
def fresh_store(kind: str, folder: Path) -> Iterator[str]:
    """A fresh, empty outcome store's URL: a SQLite file in `folder`, or a new PostgreSQL database
    (dropped after). Without PostgreSQL the test is skipped, and fails in CI."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'outcomes.db'}"
        return
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL at 127.0.0.1:5432 is required in CI")
        pytest.skip("PostgreSQL at 127.0.0.1:5432 is not reachable")
    import uuid

    import psycopg

    name = f"ecoserve_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty outcome store per test, on each backend."""
    with fresh_store(request.param, tmp_path) as url:
        yield url


GRPC_SERVICER = "serving.proto.grpc_predict_v2_pb2_grpc:add_GRPCInferenceServiceServicer_to_server"


def local_app(args: dict) -> tuple[Any, Any]:
    """The real HTTP app of ecoserve args with ONNX Runtime members and a real recorder in this
    process, recording synchronously (no Ray): (ASGI app, RecorderHost). Close the host."""
    from models.runtime import load_member
    from serving.config import parse_serving
    from serving.dataplane import Dataplane
    from serving.http import build_http_app
    from serving.members import LocalMember
    from serving.recording.host import LocalTelemetry, RecorderHost, recorder_specs

    cfg = parse_serving(args)
    host = RecorderHost(recorder_specs(cfg), cfg.telemetry.model_dump(mode="json"))
    dataplane = Dataplane.build(cfg, lambda d, m, s: LocalMember(load_member(d, m, s, "cpu")),
                                sink=lambda o: host.record(o, "t", {}))
    return build_http_app(dataplane, LocalTelemetry(host)), host


def write_serve_file(path: Path, port: int, args: dict, grpc_port: int | None = None) -> Path:
    """A Serve config file for the ecoserve app on 127.0.0.1:port (what `ecoserve serve` reads),
    with Serve's gRPC ingress on `grpc_port` when given."""
    import yaml

    cfg = {
        "proxy_location": "HeadOnly",
        **({"grpc_options": {"port": grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]}} if grpc_port else {}),
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {"name": "ecoserve", "route_prefix": "/", "import_path": "serving.app:build_app", "args": args}
        ],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(autouse=True)
def _no_ray_in_unit_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test not marked `slow` is a unit test: starting Ray there fails loudly (Ray Serve's own
    unit tests do the same), instead of slowing the fast suite down or leaving processes behind."""
    if request.node.get_closest_marker("slow") is not None:
        return
    import ray
    import ray._private.worker as worker

    def forbidden(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{request.node.nodeid} started Ray: mark it `slow` (an end-to-end test) or use a fake")

    monkeypatch.setattr(ray, "init", forbidden)
    monkeypatch.setattr(worker, "init", forbidden)


@contextmanager
def served_app(args: dict, workdir: Path, env: dict[str, str] | None = None, grpc: bool = False) -> Iterator[Any]:
    """The real ecoserve app on Ray Serve (HAProxy ingress) on a free port, from ecoserve args:
    the one way the end-to-end tests start it. Yields the `Running` server (`.url`); stops
    everything it started, and restores the environment, when the block ends."""
    from ecoserve.server import free_port, start
    from serving.config import load_serve_file

    mp = pytest.MonkeyPatch()
    for k, v in (env or {}).items():
        mp.setenv(k, v)
    try:
        path = write_serve_file(workdir / "serve.yaml", free_port(), args, grpc_port=free_port() if grpc else None)
        running = start(load_serve_file(path), num_cpus=2)
        running.grpc_port = load_serve_file(path).grpc_port
        try:
            yield running
        finally:
            running.stop()
    finally:
        mp.undo()
