"""`OutcomeStore`: every query the recorder makes (outcomes, labels, pending labels, ledgers, event
counters), and `open_store`. The schema is in `schema`, its upgrades in `migrations`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, create_engine, delete, event, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from telemetry.records import ROW_COLUMNS, Outcome, RowEncoder, outcome_fields
from telemetry.store.checkpoint import AUTOCHECKPOINT_PAGES, CHECKPOINT_INTERVAL_S, WAL_SIZE_LIMIT_BYTES, Checkpointer
from telemetry.store.errors import StoreError, as_invalid
from telemetry.store.migrations import migrate
from telemetry.store.rows import COLUMNS, FirstLabel, StoredOutcome, chunks, decode_rows, sized_chunks
from telemetry.store.schema import (
    estimators,
    event_counts,
    label_history,
    ledgers,
    outcomes,
    pending_labels,
)

__all__ = ["OutcomeStore", "open_store"]

log = logging.getLogger("telemetry.store")


class OutcomeStore:
    def __init__(self, engine: Engine, checkpoint_interval_s: float | None = None) -> None:
        self.engine = engine
        self.backend = engine.dialect.name
        self._checkpointer = Checkpointer(self, checkpoint_interval_s) if checkpoint_interval_s else None
        self._encoder = RowEncoder()
        self._contexts: dict[tuple[str, str, str], int] = {}  # (members, versions, policy) -> id
        self._context_members: dict[int, tuple[str, ...]] = {}  # id -> member list (contexts never change)
        self._inserts: dict[int, str] = {}  # rows per statement -> its SQL (the sizes of `sized_chunks`)

    # ----------------------------------------------------------- schema
    def migrate(self) -> int:
        """Create or upgrade the schema; returns the version now in place (`migrations`)."""
        return migrate(self)

    def complete_outcomes(self, updates: Sequence[tuple[str, dict[str, tuple[str, Any]]]]) -> None:
        """Give stored outcomes more members' outputs, in one transaction: (request_id,
        {member: (version, output)}); a member the outcome has gets its output replaced, a new one
        is appended to its member list (a new context)."""
        ph = self._ph(1)
        with self.engine.begin() as conn:
            for rid, outputs in updates:
                row = conn.exec_driver_sql(
                    "SELECT o.payload, c.members, c.versions, c.policy, o.propensities FROM ecoserve_outcomes o "
                    f"JOIN ecoserve_contexts c ON c.id = o.context WHERE o.request_id = {ph}", (rid,)).first()
                if row is None:
                    raise StoreError(f"no stored outcome {rid!r} to complete")
                payload, members, versions = json.loads(row[0]), json.loads(row[1]), json.loads(row[2])
                props = json.loads(row[4])
                for name, (version, output) in outputs.items():
                    if name in members:
                        payload[0][members.index(name)] = output
                    else:
                        members.append(name)
                        versions.append(version)
                        payload[0].append(output)
                        props.append(0.0)  # never the chosen one: it answered from outside
                context = self._context_in(conn, json.dumps(members), json.dumps(versions), row[3])
                conn.exec_driver_sql(f"UPDATE ecoserve_outcomes SET payload = {ph}, context = {ph}, propensities = {ph} "
                                     f"WHERE request_id = {ph}", (json.dumps(payload), context, json.dumps(props), rid))

    def _context_in(self, conn: Any, members: str, versions: str, policy: str) -> int:
        """The id of a context, added if new (concurrent writers: the unique constraint decides)."""
        ph = self._ph(1)
        conn.exec_driver_sql(
            f"INSERT INTO ecoserve_contexts (members, versions, policy) VALUES ({self._ph(3)}) "
            "ON CONFLICT (members, versions, policy) DO NOTHING", (members, versions, policy))
        return int(conn.exec_driver_sql(
            f"SELECT id FROM ecoserve_contexts WHERE members = {ph} AND versions = {ph} AND policy = {ph}",
            (members, versions, policy)).scalar_one())

    def _context_id(self, members: str, versions: str, policy: str) -> int:
        """`_context_in`, cached; a new context is committed on its own, before the outcomes that
        use it (so the cache never holds the id of a rolled-back row)."""
        key = (members, versions, policy)
        got = self._contexts.get(key)
        if got is None:
            with self.engine.begin() as conn:
                got = self._context_in(conn, *key)
            self._contexts[key] = got
        return got

    # --------------------------------------------------------- outcomes
    def insert_outcomes(
        self, items: Sequence[Outcome], progress: tuple[str, dict[str, int]] | None = None,
        unlost: dict[str, int] | None = None,
    ) -> set[str]:
        """Insert outcomes; a request_id already stored (or repeated in `items`) is skipped.
        Returns the ids inserted.

        `progress` = (ledger id, {ecosystem: records of that ledger handed over so far}), written in
        the same transaction (never lowered, so a resent batch changes nothing); see `_progress`
        for `unlost`."""
        return self.insert_fields(list(map(outcome_fields, items)), progress, unlost)

    def insert_fields(
        self, items: Sequence[tuple[Any, ...]], progress: tuple[str, dict[str, int]] | None = None,
        unlost: dict[str, int] | None = None,
    ) -> set[str]:
        """`insert_outcomes` of outcomes as their field tuples (`outcome_fields`): what a recorder
        process receives, encoded without rebuilding each Outcome. A data error is raised as
        `InvalidRecord` (nothing of the batch is stored)."""
        if not items and not progress:
            return set()
        try:
            return self._insert_fields(items, progress, unlost)
        except Exception as exc:
            err = as_invalid(exc, "an outcome the store cannot hold")
            if err is exc:
                raise
            raise err from exc

    def _insert_fields(
        self, items: Sequence[tuple[Any, ...]], progress: tuple[str, dict[str, int]] | None,
        unlost: dict[str, int] | None,
    ) -> set[str]:
        fresh: dict[str, tuple[Any, ...]] = {}
        for o in items:  # the first of repeated ids in one batch
            fresh.setdefault(o[0], o)
        rows = self._encoder.rows_of_fields(list(fresh.values()), self._context_id)
        with self.engine.begin() as conn:
            if progress:
                self._progress(conn, *progress, unlost)
            if self.backend == "sqlite":
                return self._insert_sqlite(conn, fresh, rows)
            # ON CONFLICT DO NOTHING RETURNING: ids already stored are skipped, in the same statement
            inserted: set[str] = set()
            for res in self._insert_rows(conn, rows):
                inserted.update(r[0] for r in res.fetchall())
        return inserted

    def _insert_rows(self, conn: Any, rows: list[tuple[Any, ...]]) -> Iterator[Any]:
        """Multi-row INSERTs (up to 500 rows each, in `sized_chunks`' sizes); yields each result.
        Not `executemany`: it steps (and drops and retakes the GIL) once per row, which under a
        busy event loop cost ~8x the CPU per row here."""
        for chunk in sized_chunks(rows):
            yield conn.exec_driver_sql(self._insert_sql(len(chunk)), tuple(chain.from_iterable(chunk)))

    def _insert_sqlite(self, conn: Any, fresh: dict[str, Any], rows: list[tuple[Any, ...]]) -> set[str]:
        """SQLite: ON CONFLICT DO NOTHING without RETURNING, whose rows Python's sqlite3 steps one
        at a time, dropping and retaking the GIL for each (under the gateway's busy event loop that
        was a third of the recorder's CPU). The common case, no id stored before, is told by the change
        count; otherwise the batch is rolled back to a savepoint and inserted again without the
        ids already stored. The write lock is held from the first INSERT, so no id can appear in
        between. (Not INSERT OR IGNORE: that would also skip a row breaking another constraint.)"""
        conn.exec_driver_sql("SAVEPOINT ecoserve_insert")
        if sum(res.rowcount for res in self._insert_rows(conn, rows)) != len(rows):
            conn.exec_driver_sql("ROLLBACK TO SAVEPOINT ecoserve_insert")
            for chunk in chunks(list(fresh)):
                for r in conn.exec_driver_sql(
                    f"SELECT request_id FROM ecoserve_outcomes WHERE request_id IN ({self._ph(len(chunk))})",
                    tuple(chunk)).fetchall():
                    fresh.pop(r[0], None)
            rows = [row for row in rows if row[0] in fresh]
            changed = sum(res.rowcount for res in self._insert_rows(conn, rows))
            if changed != len(rows):  # cannot happen under the write lock; never report unstored rows
                raise StoreError(f"stored {changed} of {len(rows)} new outcomes; the batch is rolled back")
        conn.exec_driver_sql("RELEASE SAVEPOINT ecoserve_insert")
        return set(fresh)

    def _insert_sql(self, n: int) -> str:
        """The INSERT for `n` rows (one of `sized_chunks`' sizes: the cache stays small)."""
        sql = self._inserts.get(n)
        if sql is not None:
            return sql
        one = f"({self._ph(len(ROW_COLUMNS))})"
        values = ", ".join([one] * n)
        # SQLite: ON CONFLICT needs 3.24 (2018); its RETURNING is not used (see _insert_sqlite)
        sql = f"INSERT INTO ecoserve_outcomes ({', '.join(ROW_COLUMNS)}) VALUES {values} ON CONFLICT (request_id) DO NOTHING"
        if self.backend != "sqlite":
            sql += " RETURNING request_id"
        self._inserts[n] = sql
        return sql

    def _ph(self, n: int) -> str:
        """n driver placeholders (the hot paths below skip SQLAlchemy's per-row compilation)."""
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        return ", ".join([mark] * n)

    def get_outcomes(self, ids: Sequence[str]) -> dict[str, StoredOutcome]:
        out: dict[str, StoredOutcome] = {}
        cols = ", ".join(COLUMNS)
        with self.engine.connect() as conn:
            for chunk in chunks(list(dict.fromkeys(ids))):
                rows = conn.exec_driver_sql(
                    f"SELECT {cols} FROM ecoserve_outcomes WHERE request_id IN ({self._ph(len(chunk))})", tuple(chunk)
                ).fetchall()
                for o in self._decode(conn, rows):
                    out[o.request_id] = o
        return out

    def _decode(self, conn: Any, rows: Sequence[Sequence[Any]]) -> list[StoredOutcome]:
        """`_decode_rows`, with the member lists of the rows' contexts (read once per context)."""
        wanted = {r[11] for r in rows} - self._context_members.keys()
        if wanted:
            self._load_contexts(conn, wanted)
        return decode_rows(rows, self._context_members)

    def _load_contexts(self, conn: Any, ids: set[int]) -> None:
        for cid, members in conn.exec_driver_sql(
                f"SELECT id, members FROM ecoserve_contexts WHERE id IN ({self._ph(len(ids))})", tuple(ids)):
            self._context_members[int(cid)] = tuple(json.loads(members))

    def iter_outcomes(self, ecosystem: str, batch: int = 5000) -> Iterator[list[StoredOutcome]]:
        """Every stored outcome of an ecosystem, in batches (for rebuilding counts after a restart)."""
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True).execute(
                select(*[outcomes.c[c] for c in COLUMNS]).where(outcomes.c.ecosystem == ecosystem)
            )
            while True:
                rows = result.fetchmany(batch)
                if not rows:
                    return
                wanted = {r[11] for r in rows} - self._context_members.keys()
                if wanted:
                    with self.engine.connect() as other:  # the streaming one is busy with its cursor
                        self._load_contexts(other, wanted)
                yield decode_rows(rows, self._context_members)

    def count_outcomes(self, ecosystem: str | None = None) -> int:
        q = select(func.count()).select_from(outcomes)
        if ecosystem is not None:
            q = q.where(outcomes.c.ecosystem == ecosystem)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar() or 0)

    # ----------------------------------------------------------- labels
    def apply_labels(
        self,
        first: list[FirstLabel],
        corrections: list[dict[str, Any]],
        pending: list[dict[str, Any]] | None = None,
        consumed: Sequence[str] = (),
    ) -> None:
        """In one transaction: set first labels (current and counted; tuples, see `FirstLabel`),
        apply corrections (current label only, into the label history); hold `pending` labels;
        remove the held labels of the `consumed` ids (those being applied now: a failure leaves
        them held). A data error is raised as `InvalidRecord` (nothing is applied)."""
        if not first and not corrections and not pending and not consumed:
            return
        try:
            self._apply_labels(first, corrections, pending, consumed)
        except Exception as exc:
            err = as_invalid(exc, "a label the store cannot hold")
            if err is exc:
                raise
            raise err from exc

    def _apply_labels(
        self, first: list[FirstLabel], corrections: list[dict[str, Any]], pending: list[dict[str, Any]] | None,
        consumed: Sequence[str] = (),
    ) -> None:
        with self.engine.begin() as conn:
            for chunk in chunks(list(consumed)):
                conn.execute(delete(pending_labels).where(pending_labels.c.request_id.in_(chunk)))
            if pending:
                self._add_pending(conn, pending)
            if first:
                ph = self._ph(1)
                conn.exec_driver_sql(
                    f"UPDATE ecoserve_outcomes SET label = {ph}, label_source = {ph}, label_time = {ph}, "
                    f"label_received_at = {ph}, counted_label = {ph}, counted_source = {ph}, counted_time = {ph}, "
                    f"counted_origin = {ph} WHERE request_id = {ph}",
                    [(label, source, label_time, received, label, source, label_time, origin, rid)
                     for rid, _eco, label, source, label_time, received, origin in first],
                )
            if corrections:
                conn.execute(
                    update(outcomes)
                    .where(outcomes.c.request_id == bindparam("rid"))
                    .values(
                        label=bindparam("label"), label_source=bindparam("source"), label_time=bindparam("label_time"),
                        label_received_at=bindparam("received_at"),
                    ),
                    [{"rid": c["request_id"], **c} for c in corrections],
                )
            # the first label lives in the outcome row (counted_*); the history keeps corrections
            history = [
                {k: h[k] for k in ("request_id", "ecosystem", "label", "source", "label_time", "received_at")}
                | {"kind": "correction", "origin": h.get("origin", "")}
                for h in corrections
            ]
            if history:
                conn.exec_driver_sql(
                    "INSERT INTO ecoserve_label_history (request_id, ecosystem, label, source, label_time, "
                    f"received_at, kind, origin) VALUES ({self._ph(8)})",
                    [(h["request_id"], h["ecosystem"], h["label"], h["source"], h["label_time"], h["received_at"],
                      h["kind"], h["origin"]) for h in history],
                )

    def label_history(self, request_id: str) -> list[dict[str, Any]]:
        """Every label an outcome received, in order: the first (kind `first`), then corrections."""
        with self.engine.connect() as conn:
            o = conn.execute(select(outcomes).where(outcomes.c.request_id == request_id)).first()
            out: list[dict[str, Any]] = []
            if o is not None and o.counted_source is not None:
                out.append({"request_id": request_id, "ecosystem": o.ecosystem, "label": o.counted_label,
                            "source": o.counted_source, "label_time": o.counted_time, "kind": "first",
                            "origin": o.counted_origin or ""})
            rows = conn.execute(
                select(label_history).where(label_history.c.request_id == request_id).order_by(label_history.c.id)
            )
            return out + [dict(r._mapping) for r in rows]

    def unlabeled_before(self, ecosystem: str, before: float, limit: int = 10_000) -> list[StoredOutcome]:
        """Unlabeled outcomes predicted before `before`, read through the partial index of
        unlabeled outcomes: the time taken follows what is unlabeled, not the size of the store."""
        ph = self._ph(1)
        sql = (f"SELECT {', '.join(COLUMNS)} FROM ecoserve_outcomes{self._unlabeled_hint} WHERE ecosystem = {ph} "
               f"AND label_source IS NULL AND created_at < {ph} LIMIT {int(limit)}")
        with self.engine.connect() as conn:
            return self._decode(conn, conn.exec_driver_sql(sql, (ecosystem, before)).fetchall())

    def recent_outcomes(self, ecosystem: str, *, labeled: bool | None, since: float = 0.0, until: float = float("inf"),
                        limit: int = 20_000, offset: int = 0,
                        label_received_after: float | None = None) -> list[StoredOutcome]:
        """The newest outcomes of an ecosystem predicted in [since, until], newest first, from
        `offset` on: labeled ones (optionally only those whose label arrived after a time), or
        those still waiting (`labeled=None`: both). Read page by page (a fixed `until` keeps pages
        from shifting)."""
        ph = self._ph(1)
        where = f"ecosystem = {ph} AND created_at >= {ph} AND created_at <= {ph}"
        if labeled is not None:
            where += f" AND label_source IS {'NOT ' if labeled else ''}NULL"
        params: tuple[Any, ...] = (ecosystem, since, min(until, 1e18))
        if label_received_after is not None:
            where += f" AND label_received_at > {ph}"
            params += (label_received_after,)
        sql = (f"SELECT {', '.join(COLUMNS)} FROM ecoserve_outcomes{self._unlabeled_hint if labeled is False else ''} "
               f"WHERE {where} ORDER BY created_at DESC LIMIT {int(limit)} OFFSET {int(offset)}")
        with self.engine.connect() as conn:
            return self._decode(conn, conn.exec_driver_sql(sql, params).fetchall())

    def save_estimator(self, ecosystem: str, version: int, fitted_at: float, n_fit: int, model: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(estimators).values(ecosystem=ecosystem, version=version, fitted_at=fitted_at,
                                                   n_fit=n_fit, model=model))

    def latest_estimators(self) -> dict[str, str]:
        """Each ecosystem's newest fitted estimator (its JSON)."""
        newest = select(estimators.c.ecosystem, func.max(estimators.c.version).label("v")).group_by(
            estimators.c.ecosystem).subquery()
        q = select(estimators.c.ecosystem, estimators.c.model).join(
            newest, (estimators.c.ecosystem == newest.c.ecosystem) & (estimators.c.version == newest.c.v))
        with self.engine.connect() as conn:
            return {r.ecosystem: r.model for r in conn.execute(q)}

    def coverage(self, ecosystem: str, now: float, ages_s: Iterable[float]) -> dict[float, tuple[int, int]]:
        """For each age: (outcomes older than it, of which labeled). One statement per age (one
        snapshot on either backend): the outcomes older than the age, counted off the (ecosystem,
        created_at) index alone (no row is read), minus the unlabeled ones (the partial index).
        Before v3 the labeled ones were counted by reading every old row: ~1 s per million
        outcomes, at every refresh."""
        ph = self._ph(1)
        sql = (f"SELECT (SELECT count(*) FROM ecoserve_outcomes WHERE ecosystem = {ph} AND created_at <= {ph}), "
               f"(SELECT count(*) FROM ecoserve_outcomes{self._unlabeled_hint} WHERE ecosystem = {ph} "
               f"AND label_source IS NULL AND created_at <= {ph})")
        out = {}
        with self.engine.connect() as conn:
            for age in ages_s:
                total, unlabeled = conn.exec_driver_sql(sql, (ecosystem, now - age) * 2).one()
                out[age] = (int(total), int(total) - int(unlabeled))
        return out

    @property
    def _unlabeled_hint(self) -> str:
        """SQLite: name the partial index. Its planner, without statistics, may otherwise take the
        (ecosystem, created_at) index of every outcome for these queries, and read every old row;
        INDEXED BY also fails loudly if the index were ever unusable for them. PostgreSQL's
        planner proves the partial index's predicate from the WHERE clause by itself."""
        return " INDEXED BY ix_ecoserve_outcomes_unlabeled" if self.backend == "sqlite" else ""

    # ---------------------------------------------------------- pending
    @staticmethod
    def _add_pending(conn: Any, rows: list[dict[str, Any]]) -> None:
        """Hold labels whose outcome is not stored yet (the newest label per id wins)."""
        ids = [r["request_id"] for r in rows]
        for chunk in chunks(ids):
            conn.execute(delete(pending_labels).where(pending_labels.c.request_id.in_(chunk)))
        latest = {r["request_id"]: r for r in rows}
        conn.execute(
            insert(pending_labels),
            [{k: r[k] for k in ("request_id", "source", "label_time", "received_at")}
             | {"label": json.dumps(r["label"]),
                "scope": None if r.get("scope") is None else json.dumps(sorted(r["scope"]))}
             for r in latest.values()],
        )

    def pending_for(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """The held labels of these request ids (they stay held until `apply_labels` consumes them)."""
        found: list[dict[str, Any]] = []
        if not ids:
            return found
        with self.engine.connect() as conn:
            for chunk in chunks(list(ids)):
                rows = conn.execute(select(pending_labels).where(pending_labels.c.request_id.in_(chunk))).all()
                found.extend({**r._mapping, "label": json.loads(r.label),
                              "scope": None if r.scope is None else frozenset(json.loads(r.scope))} for r in rows)
        return found

    def expire_pending(self, received_before: float) -> int:
        with self.engine.begin() as conn:
            res = conn.execute(delete(pending_labels).where(pending_labels.c.received_at < received_before))
            return int(res.rowcount or 0)

    def count_pending(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(pending_labels)).scalar() or 0)

    # ---------------------------------------------------------- ledgers
    def _progress(self, conn: Any, ledger: str, through: dict[str, int], unlost: dict[str, int] | None) -> None:
        """Raise a ledger's stored counts (never lower them). Counts arriving for a ledger already
        reclaimed (a hand-over that was in flight when its gateway died, and landed after another
        gateway counted it lost) are taken back from `lost|ECO` and reported in `unlost`."""
        ph1 = self._ph(1)
        for eco, n in through.items():
            n = int(n)
            row = conn.exec_driver_sql(
                f"SELECT stored, reclaimed FROM ecoserve_ledgers WHERE ledger = {ph1} AND ecosystem = {ph1}",
                (ledger, eco)).first()
            if row is None:
                conn.exec_driver_sql(
                    "INSERT INTO ecoserve_ledgers (ledger, ecosystem, stored, reclaimed, updated_at) "
                    f"VALUES ({self._ph(5)})", (ledger, eco, n, False, time.time()))
            elif n > row[0]:
                conn.exec_driver_sql(
                    f"UPDATE ecoserve_ledgers SET stored = {ph1}, updated_at = {ph1} "
                    f"WHERE ledger = {ph1} AND ecosystem = {ph1}", (n, time.time(), ledger, eco))
                if row[1]:
                    late = n - int(row[0])
                    self._bump(conn, {f"lost|{eco}": -late})
                    if unlost is not None:
                        unlost[eco] = unlost.get(eco, 0) + late

    def ledger_progress(self, ledger: str) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(ledgers.c.ecosystem, ledgers.c.stored).where(ledgers.c.ledger == ledger))
            return {r.ecosystem: int(r.stored) for r in rows}

    def reclaim_ledger(self, ledger: str, accepted: dict[str, int]) -> dict[str, int]:
        """A crashed gateway's ledger: lost = accepted - stored per ecosystem, added to the
        `lost|ECO` event counters and the ledger marked reclaimed, in one transaction.
        A ledger already reclaimed returns {} (nothing counted twice)."""
        now = time.time()
        with self.engine.begin() as conn:
            rows = {r.ecosystem: r for r in conn.execute(select(ledgers).where(ledgers.c.ledger == ledger))}
            if any(r.reclaimed for r in rows.values()):
                return {}
            lost = {eco: max(0, n - (int(rows[eco].stored) if eco in rows else 0)) for eco, n in accepted.items()}
            conn.execute(update(ledgers).where(ledgers.c.ledger == ledger).values(reclaimed=True, updated_at=now))
            new = [{"ledger": ledger, "ecosystem": eco, "stored": 0, "reclaimed": True, "updated_at": now}
                   for eco in accepted if eco not in rows]
            if not rows and not new:  # a ledger with no ecosystem: still mark it
                new = [{"ledger": ledger, "ecosystem": "", "stored": 0, "reclaimed": True, "updated_at": now}]
            if new:
                conn.execute(insert(ledgers), new)
            self._bump(conn, {f"lost|{eco}": v for eco, v in lost.items()})
        return lost

    # ----------------------------------------------------- event counts
    def bump(self, increments: dict[str, int]) -> None:
        """Add to persistent event counters (so they survive a recorder restart)."""
        if not any(increments.values()):
            return
        with self.engine.begin() as conn:
            self._bump(conn, increments)

    @staticmethod
    def _bump(conn: Any, increments: dict[str, int]) -> None:
        items = {k: v for k, v in increments.items() if v}
        if not items:
            return
        have = set(conn.execute(select(event_counts.c.key).where(event_counts.c.key.in_(list(items)))).scalars())
        if have:
            conn.execute(
                update(event_counts).where(event_counts.c.key == bindparam("k"))
                .values(value=event_counts.c.value + bindparam("v")),
                [{"k": k, "v": items[k]} for k in have],
            )
        new = [{"key": k, "value": v} for k, v in items.items() if k not in have]
        if new:
            conn.execute(insert(event_counts), new)

    def event_counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {r.key: int(r.value) for r in conn.execute(select(event_counts))}

    def checkpoint(self) -> tuple[int, int]:
        """SQLite: copy the WAL's committed pages into the database file now (PASSIVE: never waits
        on, nor blocks, readers and writers). Returns (WAL frames, frames checkpointed); (0, 0)
        on PostgreSQL."""
        if self.backend != "sqlite":
            return (0, 0)
        with self.engine.connect() as conn:
            row = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").first()
        return (int(row[1]), int(row[2])) if row is not None and row[1] >= 0 else (0, 0)

    def ping(self) -> None:
        """A trivial query: raises when the database does not answer."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.engine.dispose()




def open_store(url: str) -> OutcomeStore:
    """Open (and migrate) a store: `sqlite:///path.db` or `postgresql://...` (psycopg 3)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    try:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
                cur.execute("PRAGMA synchronous=NORMAL")  # durable at each WAL checkpoint; safe with WAL
                cur.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")  # see _Checkpointer
                cur.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
                cur.close()
        else:
            # a server that went away is noticed on checkout (pre-ping), and a host that does not
            # answer at all fails a connection attempt after 5 s instead of hanging the recorder
            engine = create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5})
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise StoreError(f"cannot open the outcome store {url!r}: {exc}") from exc
    file_db = url.startswith("sqlite") and ":memory:" not in url and url.rstrip("/") not in ("sqlite:", "sqlite:/")
    store = OutcomeStore(engine, CHECKPOINT_INTERVAL_S if file_db else None)
    try:
        store.migrate()
    except BaseException:
        store.close()
        raise
    return store
