"""Telemetry benchmark: labels/s ingested by the recorder in batches of 1,000 (SQLite and
PostgreSQL), next to the raw driver doing only the UPDATEs (the floor) in the same run."""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from telemetry.recorder import LabelItem, Recorder
from telemetry.records import Outcome
from telemetry.spec import EcosystemSpec
from telemetry.store import open_store

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
MEMBERS = tuple(f"m{i}" for i in range(6))
SPEC = EcosystemSpec("bench", MEMBERS, tuple(str(c) for c in range(10)), {"sex": ("female", "male")},
                     (), (False,) * 5 + (True,))


def _outcomes(n: int, rng: np.random.Generator) -> list[Outcome]:
    preds = rng.integers(0, 10, (n, len(MEMBERS)))
    now = time.time()
    return [Outcome(f"o{i}", "bench", now, MEMBERS, ("1",) * 6, tuple(int(v) for v in preds[i]), 0, 0,
                    (1.0, 0, 0, 0, 0, 0), 0, "primary", False, {"sex": "female" if i % 2 else "male"}, "")
            for i in range(n)]


def _ingest(url: str, n: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    store = open_store(url)
    rec = Recorder({"bench": SPEC}, store)
    outs = _outcomes(n, rng)
    for i in range(0, n, 5000):
        rec.record(outs[i : i + 5000])
    labels = rng.integers(0, 10, n)
    batches = [[LabelItem(f"o{j}", int(labels[j])) for j in range(i, min(n, i + 1000))] for i in range(0, n, 1000)]
    t0 = time.perf_counter()
    for batch in batches:  # validate, join, store (one transaction per batch), count
        rec.feedback(batch)
    t_rec = time.perf_counter() - t0
    # the floor: the same number of single-row UPDATEs by primary key, 1,000 per transaction
    from sqlalchemy import text

    t0 = time.perf_counter()
    with store.engine.begin() as conn:
        conn.execute(text("CREATE TABLE floor_t (id VARCHAR(128) PRIMARY KEY, label FLOAT)"))  # not TEMP: the pool may hand out another connection
        conn.execute(text("INSERT INTO floor_t (id) VALUES (:id)"), [{"id": f"o{j}"} for j in range(n)])
    t0 = time.perf_counter()
    with store.engine.connect() as conn:
        for i in range(0, n, 1000):
            with conn.begin():
                conn.execute(text("UPDATE floor_t SET label = :l WHERE id = :id"),
                             [{"l": float(labels[j]), "id": f"o{j}"} for j in range(i, min(n, i + 1000))])
    t_floor = time.perf_counter() - t0
    store.close()
    return n / t_rec, n / t_floor


def run() -> Sequence[tuple[str, ...]]:
    n = 50_000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rec, floor = _ingest(f"sqlite:///{Path(tmp) / 'b.db'}", n)
        rows.append(("SQLite (WAL)", f"{rec:,.0f}", f"{floor:,.0f}", f"{rec / floor:.2f}x",
                     f"target >= 50,000/s: {'met' if rec >= 50_000 else 'MISSED'}"))
    try:
        import psycopg

        name = f"ecoserve_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        try:
            rec, floor = _ingest(f"postgresql://postgres@127.0.0.1:5432/{name}", n)
            rows.append(("PostgreSQL 15 (local)", f"{rec:,.0f}", f"{floor:,.0f}", f"{rec / floor:.2f}x", "-"))
        finally:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    except Exception as exc:  # no server here: say so in the table
        rows.append(("PostgreSQL", "-", "-", "-", f"not measured: {exc}"[:80]))
    return rows
