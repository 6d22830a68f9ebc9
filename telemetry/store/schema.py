"""The outcome store's tables (SQLAlchemy Core) and its schema version; see `telemetry.store`."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

SCHEMA_VERSION = 7

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
V2_INDEXES = ("ix_ecoserve_outcomes_eco_created", "ix_ecoserve_outcomes_eco_source")
V2_FIELDS = ("members", "versions", "predictions", "served", "intended", "greedy", "policy", "direct",
              "fingerprint", "propensities", "groups")
LABEL_COLUMNS = ("label", "label_source", "label_time", "label_received_at", "counted_label", "counted_source",
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
    Column("source", String(64), nullable=False),  # the feedback item's free-text `source` (v4: was 16)
    Column("label_time", Float, nullable=False),
    Column("received_at", Float, nullable=False),
    # v4: JSON list of the ecosystems the posting token covers; NULL: every ecosystem
    Column("scope", Text, nullable=True),
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
estimators = Table(
    "ecoserve_estimators",  # v5: fitted label-free estimators, versioned (telemetry.estimation)
    metadata,
    Column("ecosystem", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("fitted_at", Float, nullable=False),
    Column("n_fit", Integer, nullable=False),
    Column("model", Text, nullable=False),  # SystemicEstimator.to_json()
)
V1_TABLES = [schema_table, outcomes, label_history, pending_labels, event_counts]  # as created by v1 (in today's layout)


def view_sql(backend: str) -> str:
    """`ecoserve_outcomes_v`: every outcome with one column per field, as v2 stored them."""
    from telemetry.records import PAYLOAD_FIELDS

    if backend == "sqlite":
        def field(i: int, name: str) -> str:
            return f"json_extract(o.payload, '$[{i}]') AS {name}"
        head = "CREATE VIEW IF NOT EXISTS"
    else:
        casts = {"served": "::integer", "intended": "::integer", "greedy": "::integer", "direct": "::boolean"}

        def field(i: int, name: str) -> str:
            return f"((o.payload::json)->>{i}){casts.get(name, '')} AS {name}"
        head = "CREATE OR REPLACE VIEW"
    fields = ", ".join(field(i, name) for i, name in enumerate(PAYLOAD_FIELDS))
    labels = ", ".join(f"o.{c}" for c in LABEL_COLUMNS)
    return (f"{head} ecoserve_outcomes_v AS SELECT o.request_id, o.ecosystem, o.created_at, c.members, "
            f"c.versions, c.policy, {fields}, o.propensities, o.groups, {labels} FROM ecoserve_outcomes o "
            "JOIN ecoserve_contexts c ON c.id = o.context")
