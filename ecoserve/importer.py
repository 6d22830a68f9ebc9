"""`ecoserve import-outcomes FILE.csv --ecosystem E`: a prediction log into a running server.

The table is the one `ecoserve analyze` reads: one row per instance, a label column, one column
per member (its output: a class name or id, a number for regression; empty = missing), optional
subgroup columns, plus a request id column (`--id-column`, default `request_id`; without one the
ids are `<file stem>-<row number>`). Member columns are the ecosystem's external members found in
the header. The outcomes go through `POST /v2/outcomes`, then the labels through
`POST /v2/feedback` (rows with an empty label have none), in batches.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["ImportError_", "ImportResult", "import_outcomes"]


class ImportError_(ValueError):  # noqa: N801 - not the builtin ImportError
    """The table or the server refused the import; one line saying why."""


@dataclass
class ImportResult:
    outcomes: int
    recorded: int
    unchanged: int
    labels: int


async def import_outcomes(
    path: str | Path, ecosystem: str, members: list[str] | None, client: httpx.AsyncClient, *,
    id_column: str = "request_id", label_column: str = "label", group_columns: tuple[str, ...] = (),
    token: str | None = None, batch: int = 1000,
) -> ImportResult:
    """Post the table's outcomes, then its labels. `members`: the member columns (default: every
    column but the id, label and subgroup ones; the server refuses any that is not external)."""
    p = Path(path)
    try:
        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ImportError_(f"{p}: cannot read the table: {exc}") from exc
    others = {id_column, label_column, *group_columns}
    cols = [m for m in members if m in header] if members else [c for c in header if c not in others]
    if not cols:
        raise ImportError_(f"{p}: no member columns (header: {', '.join(header)})")
    missing = [c for c in (label_column, *group_columns) if c not in header]
    if missing:
        raise ImportError_(f"{p}: no column {missing[0]!r}")
    headers = {"authorization": f"Bearer {token}"} if token else {}

    def rid(i: int, row: dict[str, str]) -> str:
        return row[id_column] if id_column in header else f"{p.stem}-{i}"

    def cell(v: str) -> Any:
        if v == "":
            return None
        try:
            return float(v) if any(ch in v for ch in ".eE") else int(v)
        except ValueError:
            return v

    recorded = unchanged = labels = 0
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        records = [{"request_id": rid(start + i, r), "ecosystem": ecosystem,
                    "outputs": {m: cell(r[m]) for m in cols},
                    **({"subgroups": {g: r[g] for g in group_columns if r[g] != ""}} if group_columns else {})}
                   for i, r in enumerate(part)]
        reply = await _post(client, "/v2/outcomes", {"outcomes": records}, headers)
        recorded += int(reply.get("recorded", 0))
        unchanged += int(reply.get("unchanged", 0))
    for start in range(0, len(rows), batch):
        items = [{"request_id": rid(start + i, r), "label": cell(r[label_column])}
                 for i, r in enumerate(rows[start : start + batch]) if r[label_column] != ""]
        if items:
            await _post(client, "/v2/feedback", {"labels": items}, headers)
            labels += len(items)
    return ImportResult(len(rows), recorded, unchanged, labels)


async def _post(client: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    try:
        r = await client.post(path, json=body, headers=headers, timeout=120)
    except httpx.HTTPError as exc:
        raise ImportError_(f"{path}: {type(exc).__name__}: {exc}") from exc
    if r.status_code != 200:
        try:
            message = r.json().get("error", r.text)
        except ValueError:
            message = r.text[:200]
        raise ImportError_(f"{path}: HTTP {r.status_code}: {message}")
    reply: dict[str, Any] = r.json()
    return reply
