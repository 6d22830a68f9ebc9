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

from telemetry.store.errors import STORE_ERRORS, InvalidRecord, StoreError, is_data_error
from telemetry.store.outcomes import OutcomeStore, open_store
from telemetry.store.rows import FirstLabel, StoredOutcome
from telemetry.store.schema import SCHEMA_VERSION

__all__ = [
    "STORE_ERRORS",
    "SCHEMA_VERSION",
    "FirstLabel",
    "InvalidRecord",
    "OutcomeStore",
    "StoreError",
    "StoredOutcome",
    "is_data_error",
    "open_store",
]
