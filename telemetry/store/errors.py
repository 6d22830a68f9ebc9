"""What the store raises, and how a write error is told apart: the data (refused for good) or the
database (unreachable, busy, full: a retry may cure it)."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, SQLAlchemyError, StatementError

__all__ = ["StoreError", "InvalidRecord", "STORE_ERRORS", "is_data_error", "as_invalid"]


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


def as_invalid(exc: Exception, what: str) -> Exception:
    """A data error as `InvalidRecord` (its first line: the driver's message, without the SQL)."""
    if is_data_error(exc) and not isinstance(exc, InvalidRecord):
        return InvalidRecord(f"{what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return exc
