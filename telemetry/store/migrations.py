"""Schema migrations of the outcome store: create a new store, or bring an older one forward one
version at a time, in one transaction. 1 -> 2 creates `ecoserve_ledgers`; 2 -> 3 rewrites
`ecoserve_outcomes` in the v3 layout (contexts, payload, the partial index of unlabeled outcomes);
3 -> 4 gives held labels a scope; 4 -> 5 creates `ecoserve_estimators`; 5 -> 6 recreates the
`ecoserve_outcomes_v` view with the payload's newer fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import MetaData, func, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from telemetry.records import payload_text
from telemetry.store.errors import StoreError
from telemetry.store.schema import (
    LABEL_COLUMNS,
    SCHEMA_VERSION,
    V1_TABLES,
    V2_FIELDS,
    V2_INDEXES,
    contexts,
    estimators,
    ledgers,
    metadata,
    outcomes,
    schema_table,
    view_sql,
)

if TYPE_CHECKING:
    from telemetry.store.outcomes import OutcomeStore

__all__ = ["migrate", "MIGRATE_BATCH"]

MIGRATE_BATCH = 5000  # outcomes per step of the 2 -> 3 rewrite


def migrate(store: OutcomeStore) -> int:
    """Create or upgrade the schema; returns the version now in place."""
    try:
        with store.engine.begin() as conn:
            metadata.create_all(conn, tables=V1_TABLES)
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
                _rewrite_v2_outcomes(store, conn)
                version = 3
            if version < 4:  # 3 -> 4: held labels keep their token's scope and a 64-character source
                _pending_v4(store, conn)
                version = 4
            if version < 5:  # 4 -> 5: fitted label-free estimators
                estimators.create(conn, checkfirst=True)
                version = 5
            if version < 7:  # 5 -> 6 -> 7: the view gains the payload's newer fields (scores, score vectors;
                # candidates, pipeline stages)
                conn.exec_driver_sql("DROP VIEW IF EXISTS ecoserve_outcomes_v")
                version = 7
            conn.execute(update(schema_table).values(version=version))
            conn.exec_driver_sql(view_sql(store.backend))
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot prepare the outcome store ({store.backend}): {exc}") from exc
    return int(version)

def _pending_v4(store: OutcomeStore, conn: Any) -> None:
    if store.backend == "postgresql":
        conn.exec_driver_sql("ALTER TABLE ecoserve_pending_labels ALTER COLUMN source TYPE VARCHAR(64)")
        conn.exec_driver_sql("ALTER TABLE ecoserve_pending_labels ADD COLUMN IF NOT EXISTS scope TEXT")
        return
    # SQLite does not enforce VARCHAR lengths; only the column is new
    names = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(ecoserve_pending_labels)")}
    if "scope" not in names:
        conn.exec_driver_sql("ALTER TABLE ecoserve_pending_labels ADD COLUMN scope TEXT")


def _rewrite_v2_outcomes(store: OutcomeStore, conn: Any) -> None:
    """2 -> 3: copy every outcome into the v3 layout (context ids, one payload), in batches of
    `MIGRATE_BATCH` by key, in the caller's transaction; then the v2 table goes and the new one
    takes its name. Labels and their counted copies are carried over unchanged."""
    contexts.create(conn, checkfirst=True)
    for name in V2_INDEXES:  # index names are per database (SQLite) or schema (PostgreSQL): free them
        conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
    new = outcomes.to_metadata(MetaData(), name="ecoserve_outcomes_v3")
    new.create(conn)
    ids: dict[tuple[str, str, str], int] = {}
    ph = store._ph(1)
    sql = (f"SELECT request_id, ecosystem, created_at, {', '.join(V2_FIELDS)}, {', '.join(LABEL_COLUMNS)} "
           f"FROM ecoserve_outcomes WHERE request_id > {ph} ORDER BY request_id LIMIT {int(MIGRATE_BATCH)}")
    last = ""
    while rows := conn.exec_driver_sql(sql, (last,)).fetchall():
        out = []
        for r in rows:
            rid, eco, t, members, versions, preds, served, intended, greedy, policy, direct, fp, props, groups = r[:14]
            key = (members, versions, policy)
            if key not in ids:
                ids[key] = store._context_in(conn, *key)
            out.append({"request_id": rid, "ecosystem": eco, "created_at": t, "context": ids[key],
                        "payload": payload_text(preds, served, intended, greedy, direct, fp), "propensities": props, "groups": groups,
                        **dict(zip(LABEL_COLUMNS, r[14:]))})
        conn.execute(insert(new), out)
        last = rows[-1][0]
    conn.exec_driver_sql("DROP TABLE ecoserve_outcomes")
    conn.exec_driver_sql("ALTER TABLE ecoserve_outcomes_v3 RENAME TO ecoserve_outcomes")
