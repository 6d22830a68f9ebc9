"""The durable outcome store: one schema, two backends (SQLite in WAL mode, PostgreSQL).

SQLAlchemy Core, no ORM. Schema (version 3; `ecoserve_schema` holds the version,
and `migrate()` brings an older store forward one step at a time):

    ecoserve_outcomes         one row per served row (request_id is the key)
      request_id, ecosystem, created_at (unix s),
      context                 -> ecoserve_contexts.id: the member list, version list and policy
      payload                 JSON array (`telemetry.records.PAYLOAD_FIELDS`): [predictions (class
                              ids, -1 = missing; a regression ecosystem's values, null = missing),
                              served, intended, greedy, direct, fingerprint]
      propensities, groups    JSON (a list; an object of subgroup attributes)
      label, label_source, label_time, label_received_at        -- the current label
      counted_label, counted_source, counted_time, counted_origin -- the first label: the one the
                                                                   streamed counters used
    ecoserve_contexts         (v3) id, members, versions (JSON lists), policy: stored once each
    ecoserve_label_history    every correction (a label that differed from the current one)
    ecoserve_pending_labels   labels that arrived before their outcome (TTL-bounded)
    ecoserve_event_counts     persistent counters of API events (duplicates, corrections, ...)
    ecoserve_ledgers          (v2) per gateway ledger and ecosystem: records stored, and whether the
                              ledger of a crashed gateway was reclaimed (`telemetry.ledger`)
    ecoserve_outcomes_v       (v3) a view of ecoserve_outcomes with every field in its own column
                              (the v2 layout), for people querying the store by hand

Why a payload and a context instead of a column per field (v2): 7 values to bind per row instead
of 14 cut the store's cost of a row to ~0.7x (docs/store.md); the fields in the
payload are only ever read back together, with one `json.loads` per batch.

Indexes of `ecoserve_outcomes`: the key; (ecosystem, created_at); and a partial index on
(ecosystem, created_at) of the *unlabeled* outcomes only, which the assumed-label sweep and label
coverage read (`unlabeled_before`, `coverage`). It holds only what is still waiting for a label,
so it stays small however large the store grows, and a label removes one entry from it instead of
moving one inside an index of every outcome (v2's (ecosystem, label_source)).

Migrations: 1 -> 2 creates `ecoserve_ledgers`; 2 -> 3 rewrites `ecoserve_outcomes` in the v3
layout (contexts, payload, the partial index), in one transaction.

Labels are stored as numbers: a class id (ground_truth mode) or a reward (bandit).
Knows nothing of Ray, HTTP or Prometheus.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, SQLAlchemyError, StatementError

from telemetry.records import PAYLOAD_FIELDS, ROW_COLUMNS, Outcome, RowEncoder, outcome_fields, payload_text

__all__ = ["StoreError", "InvalidRecord", "is_data_error", "STORE_ERRORS", "OutcomeStore", "StoredOutcome", "FirstLabel", "SCHEMA_VERSION", "open_store"]

SCHEMA_VERSION = 3
_CHUNK = 500  # ids per IN (...) query: well under SQLite's variable limit
CHECKPOINT_INTERVAL_S = 1.0  # SQLite: the background WAL checkpoint's period (see `_Checkpointer`)
# SQLite: writers checkpoint inline only past this many WAL pages (~80 MB; SQLite's default is
# 1,000): a safety net for when the background checkpoint cannot keep up (e.g. a long reader)
AUTOCHECKPOINT_PAGES = 20_000
WAL_SIZE_LIMIT_BYTES = 64 << 20  # the WAL file is truncated back to this after a checkpoint
MIGRATE_BATCH = 5000  # outcomes per step of the 2 -> 3 rewrite

log = logging.getLogger(__name__)

metadata = MetaData()
schema_table = Table("ecoserve_schema", metadata, Column("version", Integer, nullable=False))
outcomes = Table(
    "ecoserve_outcomes",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("ecosystem", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("context", Integer, nullable=False),  # ecoserve_contexts.id (no FK: contexts are never deleted)
    Column("payload", Text, nullable=False),  # JSON array of PAYLOAD_FIELDS
    Column("propensities", Text, nullable=False),
    Column("groups", Text, nullable=False),
    Column("label", Float),
    Column("label_source", String(16)),
    Column("label_time", Float),
    Column("label_received_at", Float),
    Column("counted_label", Float),
    Column("counted_source", String(16)),
    Column("counted_time", Float),
    Column("counted_origin", String(64)),
    Index("ix_ecoserve_outcomes_eco_created", "ecosystem", "created_at"),
    # only the outcomes still waiting for a label (see the module docstring)
    Index("ix_ecoserve_outcomes_unlabeled", "ecosystem", "created_at",
          sqlite_where=text("label_source IS NULL"), postgresql_where=text("label_source IS NULL")),
)
contexts = Table(
    "ecoserve_contexts",  # v3: what every outcome of a deployment shares, stored once
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("members", Text, nullable=False),  # JSON list
    Column("versions", Text, nullable=False),  # JSON list
    Column("policy", String(32), nullable=False),
    UniqueConstraint("members", "versions", "policy", name="uq_ecoserve_contexts"),
)
_V2_INDEXES = ("ix_ecoserve_outcomes_eco_created", "ix_ecoserve_outcomes_eco_source")
_V2_FIELDS = ("members", "versions", "predictions", "served", "intended", "greedy", "policy", "direct",
              "fingerprint", "propensities", "groups")
_LABEL_COLUMNS = ("label", "label_source", "label_time", "label_received_at", "counted_label", "counted_source",
                  "counted_time", "counted_origin")
label_history = Table(
    "ecoserve_label_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(128), nullable=False, index=True),
    Column("ecosystem", String(64), nullable=False),
    Column("label", Float, nullable=False),
    Column("source", String(16), nullable=False),
    Column("label_time", Float, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("kind", String(16), nullable=False),  # first | correction
    Column("origin", String(64), nullable=False, default=""),  # the feedback item's free-text `source`
)
pending_labels = Table(
    "ecoserve_pending_labels",
    metadata,
    Column("request_id", String(128), primary_key=True),
    Column("label", Text, nullable=False),  # JSON: the raw label as sent
    Column("source", String(16), nullable=False),
    Column("label_time", Float, nullable=False),
    Column("received_at", Float, nullable=False),
)

event_counts = Table(
    "ecoserve_event_counts",  # counts of API events (duplicates, corrections, unknown ids, ...)
    metadata,
    Column("key", String(256), primary_key=True),
    Column("value", Integer, nullable=False),
)

ledgers = Table(
    "ecoserve_ledgers",  # v2: crash accounting of gateway queues (see telemetry.ledger)
    metadata,
    Column("ledger", String(64), primary_key=True),
    Column("ecosystem", String(64), primary_key=True),
    Column("stored", BigInteger, nullable=False),  # records of this ledger stored (or accounted for)
    Column("reclaimed", Boolean, nullable=False, default=False),
    Column("updated_at", Float, nullable=False),
)
_V1_TABLES = [schema_table, outcomes, label_history, pending_labels, event_counts]  # as created by v1 (in today's layout)


class StoreError(RuntimeError):
    """The store could not be opened or written; wraps the database's own error."""


class InvalidRecord(StoreError):
    """The database refused what it was given (a data error: a NUL byte, a lone surrogate, a
    value too long, a broken constraint). Sending the same records again cannot help, unlike a
    connection error or a full disk; the caller finds and drops the offending records."""


# what a store that is unreachable, busy or full raises (the driver's errors included): callers that
# must answer anyway (the feedback API: 503) catch these
STORE_ERRORS: tuple[type[Exception], ...] = (StoreError, SQLAlchemyError, OSError)

# SQLSTATE classes of errors caused by the data, not by the server: 22 data exception,
# 23 integrity constraint violation, 54 program limit exceeded (e.g. an index entry too large)
_DATA_SQLSTATE_CLASSES = ("22", "23", "54")


def is_data_error(exc: BaseException) -> bool:
    """Whether `exc`, raised while writing, is caused by the data rather than by the database
    being unreachable, busy or full (which a retry may cure)."""
    if isinstance(exc, InvalidRecord):
        return True
    if isinstance(exc, DBAPIError):
        state = getattr(exc.orig, "sqlstate", None)
        if isinstance(state, str) and state[:2] in _DATA_SQLSTATE_CLASSES:
            return True
        return type(exc).__name__ in ("DataError", "IntegrityError")  # e.g. psycopg's client-side NUL check
    if isinstance(exc, StatementError):  # a parameter the driver could not bind
        return isinstance(exc.orig, (ValueError, TypeError))
    return isinstance(exc, (ValueError, TypeError))  # e.g. UnicodeEncodeError from sqlite3's binding


def _as_invalid(exc: Exception, what: str) -> Exception:
    """A data error as `InvalidRecord` (its first line: the driver's message, without the SQL)."""
    if is_data_error(exc) and not isinstance(exc, InvalidRecord):
        return InvalidRecord(f"{what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return exc


class StoredOutcome(NamedTuple):
    """One stored outcome as the recorder reads it back (a named tuple: built thousands of times per
    feedback batch, ~10x cheaper than a frozen dataclass). Its propensity list and group dict may
    be shared between outcomes (decoding is cached): read them, never change them."""

    request_id: str
    ecosystem: str
    created_at: float
    predictions: list[int] | list[float | None]  # class ids; a regression ecosystem's values
    served: int
    intended: int
    greedy: int
    propensities: list[float]
    direct: bool
    groups: dict[str, str]
    label: float | None
    label_source: str | None
    counted_label: float | None
    counted_source: str | None
    counted_time: float | None
    members: tuple[str, ...] = ()  # the member list it was recorded with (its context); indices refer to it


# a first label, as the recorder hands it to `apply_labels` (a plain tuple: one per label, thousands
# per feedback request): (request_id, ecosystem, label, source, label_time, received_at, origin)
FirstLabel = tuple[str, str, float, str, float, float, str]

_COLUMNS = ("request_id", "ecosystem", "created_at", "payload", "propensities", "groups", "label", "label_source",
            "counted_label", "counted_source", "counted_time", "context")


def _decode_rows(rows: Sequence[Sequence[Any]], members: dict[int, tuple[str, ...]]) -> list[StoredOutcome]:
    """Rows in `_COLUMNS` order -> outcomes; `members`: context id -> its member list. The payloads
    are decoded with one `json.loads` per batch (per-row calls were a third of the label-ingest
    time); propensity vectors and group objects, which repeat from row to row (one per policy
    decision kind, per subgroup), once per distinct text (`_DECODED`)."""
    if not rows:
        return []
    payloads = json.loads("[" + ",".join(r[3] for r in rows) + "]")
    if len(_DECODED) > 4096:
        _DECODED.clear()
    for r in rows:  # decode each distinct propensity and group text once, up front
        if r[4] not in _DECODED:
            _DECODED[r[4]] = json.loads(r[4])
        if r[5] not in _DECODED:
            _DECODED[r[5]] = json.loads(r[5])
    new, dec = tuple.__new__, _DECODED  # tuple.__new__ direct: the named tuple's own __new__ is a Python call
    return [
        new(StoredOutcome, (r[0], r[1], r[2], p[0], p[1], p[2], p[3], dec[r[4]], bool(p[4]), dec[r[5]],
                            r[6], r[7], r[8], r[9], r[10], members[r[11]]))
        for r, p in zip(rows, payloads)
    ]


_DECODED: dict[str, Any] = {}  # JSON text -> its (shared, never changed) value; bounded


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _sized_chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """Chunks of `_CHUNK` items, then the rest in powers of two (at most 9 more): a multi-row
    statement is compiled once per size, and compiling one cost about as much as running it here
    (~5 us per row), so the sizes come from a fixed set of 10 that stay in the statement caches
    (SQLite's per connection, psycopg's prepared statements) instead of one new size per batch."""
    i, n = 0, len(items)
    while n - i >= _CHUNK:
        yield items[i : i + _CHUNK]
        i += _CHUNK
    size = 256
    while i < n:
        if n - i >= size:
            yield items[i : i + size]
            i += size
        else:
            size //= 2


class OutcomeStore:
    def __init__(self, engine: Engine, checkpoint_interval_s: float | None = None) -> None:
        self.engine = engine
        self.backend = engine.dialect.name
        self._checkpointer = _Checkpointer(self, checkpoint_interval_s) if checkpoint_interval_s else None
        self._encoder = RowEncoder()
        self._contexts: dict[tuple[str, str, str], int] = {}  # (members, versions, policy) -> id
        self._context_members: dict[int, tuple[str, ...]] = {}  # id -> member list (contexts never change)
        self._inserts: dict[int, str] = {}  # rows per statement -> its SQL (the sizes of `_sized_chunks`)

    # ----------------------------------------------------------- schema
    def migrate(self) -> int:
        """Create or upgrade the schema; returns the version now in place."""
        try:
            with self.engine.begin() as conn:
                metadata.create_all(conn, tables=_V1_TABLES)
                version = conn.execute(select(func.max(schema_table.c.version))).scalar()
                if version is None:  # a new store: every table, at the current version
                    metadata.create_all(conn)
                    conn.execute(insert(schema_table).values(version=SCHEMA_VERSION))
                    version = SCHEMA_VERSION
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"the store has schema version {version}, newer than this ecoserve's {SCHEMA_VERSION}"
                    )
                if version < 2:  # 1 -> 2: crash accounting of gateway queues
                    ledgers.create(conn, checkfirst=True)
                    version = 2
                if version < 3:  # 2 -> 3: contexts, payloads, the partial index of unlabeled outcomes
                    self._rewrite_v2_outcomes(conn)
                    version = 3
                conn.execute(update(schema_table).values(version=version))
                conn.exec_driver_sql(self._view_sql())
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot prepare the outcome store ({self.backend}): {exc}") from exc
        return int(version)

    def _rewrite_v2_outcomes(self, conn: Any) -> None:
        """2 -> 3: copy every outcome into the v3 layout (context ids, one payload), in batches of
        `MIGRATE_BATCH` by key, in the caller's transaction; then the v2 table goes and the new one
        takes its name. Labels and their counted copies are carried over unchanged."""
        contexts.create(conn, checkfirst=True)
        for name in _V2_INDEXES:  # index names are per database (SQLite) or schema (PostgreSQL): free them
            conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
        new = outcomes.to_metadata(MetaData(), name="ecoserve_outcomes_v3")
        new.create(conn)
        ids: dict[tuple[str, str, str], int] = {}
        ph = self._ph(1)
        sql = (f"SELECT request_id, ecosystem, created_at, {', '.join(_V2_FIELDS)}, {', '.join(_LABEL_COLUMNS)} "
               f"FROM ecoserve_outcomes WHERE request_id > {ph} ORDER BY request_id LIMIT {int(MIGRATE_BATCH)}")
        last = ""
        while rows := conn.exec_driver_sql(sql, (last,)).fetchall():
            out = []
            for r in rows:
                rid, eco, t, members, versions, preds, served, intended, greedy, policy, direct, fp, props, groups = r[:14]
                key = (members, versions, policy)
                if key not in ids:
                    ids[key] = self._context_in(conn, *key)
                out.append({"request_id": rid, "ecosystem": eco, "created_at": t, "context": ids[key],
                            "payload": payload_text(preds, served, intended, greedy, direct, fp), "propensities": props, "groups": groups,
                            **dict(zip(_LABEL_COLUMNS, r[14:]))})
            conn.execute(insert(new), out)
            last = rows[-1][0]
        conn.exec_driver_sql("DROP TABLE ecoserve_outcomes")
        conn.exec_driver_sql("ALTER TABLE ecoserve_outcomes_v3 RENAME TO ecoserve_outcomes")

    def _view_sql(self) -> str:
        """`ecoserve_outcomes_v`: every outcome with one column per field, as v2 stored them."""
        if self.backend == "sqlite":
            def field(i: int, name: str) -> str:
                return f"json_extract(o.payload, '$[{i}]') AS {name}"
            head = "CREATE VIEW IF NOT EXISTS"
        else:
            casts = {"served": "::integer", "intended": "::integer", "greedy": "::integer", "direct": "::boolean"}

            def field(i: int, name: str) -> str:
                return f"((o.payload::json)->>{i}){casts.get(name, '')} AS {name}"
            head = "CREATE OR REPLACE VIEW"
        fields = ", ".join(field(i, name) for i, name in enumerate(PAYLOAD_FIELDS))
        labels = ", ".join(f"o.{c}" for c in _LABEL_COLUMNS)
        return (f"{head} ecoserve_outcomes_v AS SELECT o.request_id, o.ecosystem, o.created_at, c.members, "
                f"c.versions, c.policy, {fields}, o.propensities, o.groups, {labels} FROM ecoserve_outcomes o "
                "JOIN ecoserve_contexts c ON c.id = o.context")

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
            err = _as_invalid(exc, "an outcome the store cannot hold")
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
        """Multi-row INSERTs (up to 500 rows each, in `_sized_chunks`' sizes); yields each result.
        Not `executemany`: it steps (and drops and retakes the GIL) once per row, which under a
        busy event loop cost ~8x the CPU per row here."""
        for chunk in _sized_chunks(rows):
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
            for chunk in _chunks(list(fresh)):
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
        """The INSERT for `n` rows (one of `_sized_chunks`' sizes: the cache stays small)."""
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
        cols = ", ".join(_COLUMNS)
        with self.engine.connect() as conn:
            for chunk in _chunks(list(dict.fromkeys(ids))):
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
        return _decode_rows(rows, self._context_members)

    def _load_contexts(self, conn: Any, ids: set[int]) -> None:
        for cid, members in conn.exec_driver_sql(
                f"SELECT id, members FROM ecoserve_contexts WHERE id IN ({self._ph(len(ids))})", tuple(ids)):
            self._context_members[int(cid)] = tuple(json.loads(members))

    def iter_outcomes(self, ecosystem: str, batch: int = 5000) -> Iterator[list[StoredOutcome]]:
        """Every stored outcome of an ecosystem, in batches (for rebuilding counts after a restart)."""
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True).execute(
                select(*[outcomes.c[c] for c in _COLUMNS]).where(outcomes.c.ecosystem == ecosystem)
            )
            while True:
                rows = result.fetchmany(batch)
                if not rows:
                    return
                wanted = {r[11] for r in rows} - self._context_members.keys()
                if wanted:
                    with self.engine.connect() as other:  # the streaming one is busy with its cursor
                        self._load_contexts(other, wanted)
                yield _decode_rows(rows, self._context_members)

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
    ) -> None:
        """In one transaction: set first labels (current and counted; tuples, see `FirstLabel`),
        apply corrections (current label only, into the label history); hold `pending` labels.
        A data error is raised as `InvalidRecord` (nothing is applied)."""
        if not first and not corrections and not pending:
            return
        try:
            self._apply_labels(first, corrections, pending)
        except Exception as exc:
            err = _as_invalid(exc, "a label the store cannot hold")
            if err is exc:
                raise
            raise err from exc

    def _apply_labels(
        self, first: list[FirstLabel], corrections: list[dict[str, Any]], pending: list[dict[str, Any]] | None,
    ) -> None:
        with self.engine.begin() as conn:
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
        sql = (f"SELECT {', '.join(_COLUMNS)} FROM ecoserve_outcomes{self._unlabeled_hint} WHERE ecosystem = {ph} "
               f"AND label_source IS NULL AND created_at < {ph} LIMIT {int(limit)}")
        with self.engine.connect() as conn:
            return self._decode(conn, conn.exec_driver_sql(sql, (ecosystem, before)).fetchall())

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
        for chunk in _chunks(ids):
            conn.execute(delete(pending_labels).where(pending_labels.c.request_id.in_(chunk)))
        latest = {r["request_id"]: r for r in rows}
        conn.execute(
            insert(pending_labels),
            [{k: r[k] for k in ("request_id", "source", "label_time", "received_at")} | {"label": json.dumps(r["label"])}
             for r in latest.values()],
        )

    def take_pending(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """Remove and return the pending labels of these request ids."""
        found: list[dict[str, Any]] = []
        if not ids:
            return found
        with self.engine.begin() as conn:
            for chunk in _chunks(list(ids)):
                rows = conn.execute(select(pending_labels).where(pending_labels.c.request_id.in_(chunk))).all()
                if rows:
                    found.extend({**r._mapping, "label": json.loads(r.label)} for r in rows)
                    conn.execute(delete(pending_labels).where(pending_labels.c.request_id.in_([r.request_id for r in rows])))
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

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.engine.dispose()


class _Checkpointer:
    """SQLite WAL checkpoints on a background thread, off the writers' path.

    With SQLite's default, the commit that grows the WAL past 1,000 pages copies them into the
    database file itself, inline: measured here, a fifth of the CPU of a label batch (every
    labelled row is rewritten) and a stall in whichever hand-over or feedback request drew it.
    Here a thread runs a PASSIVE checkpoint every `CHECKPOINT_INTERVAL_S` (sqlite3 releases
    the GIL while it copies), and writers checkpoint inline only past `AUTOCHECKPOINT_PAGES`.
    Durability: with `synchronous=NORMAL` a commit survives a process crash at once, and a power
    loss once a checkpoint has synced the WAL; that now happens at least every second under
    writes (SQLite's default: every 1,000 pages, which at low traffic can be hours). Why a second
    and not less: a checkpoint costs about the same however little it copies (two fsyncs, the
    hot B-tree pages again); at 0.25 s, with 20-row hand-overs every 0.25 s, it was half of the
    store's CPU (docs/store.md). The thread holds the store weakly and ends with
    `close()` or when the store is garbage."""

    def __init__(self, store: OutcomeStore, interval_s: float) -> None:
        self._store = weakref.ref(store)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ecoserve-sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self._interval_s):
            store = self._store()
            if store is None:
                return
            try:
                store.checkpoint()
                failing = False
            except SQLAlchemyError as exc:  # e.g. the file went away; writers still checkpoint past the limit
                if not failing:
                    log.warning("background WAL checkpoint failed (will retry): %s", exc)
                failing = True
            del store

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)


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
            engine = create_engine(url, pool_pre_ping=True)
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
