"""Shared fixtures: a demo model repository built once per test session."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

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
    for eco in ("digits", "credit", "diabetes"):
        shutil.copytree(model_repo / eco, repo / eco)
    for name in ("faulty", "broken", "dead"):
        _copy_ecosystem(model_repo / "digits", repo, name)
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


PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty outcome store: a SQLite file, or a new PostgreSQL database (dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'outcomes.db'}"
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


def write_serve_file(path: Path, port: int, args: dict) -> Path:
    """A Serve config file for the ecoserve app on 127.0.0.1:port (what `ecoserve serve` reads)."""
    import yaml

    cfg = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {"name": "ecoserve", "route_prefix": "/", "import_path": "serving.app:build_app", "args": args}
        ],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path
