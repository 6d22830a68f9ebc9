"""The error tree of the serving layer, and the one table mapping it to HTTP statuses.

    EcoserveError
    ├── BadRequest            400  malformed JSON, wrong tensor name/shape/dtype, bad data
    ├── Unauthorized          401  missing or wrong bearer token
    ├── Forbidden             403  a token posting for an ecosystem it does not cover
    ├── NotFound              404  unknown model, version or route
    ├── PayloadTooLarge       413  body over `limits.max_body_bytes`, too many rows
    ├── UnprocessableEntity   422  well-formed but semantically invalid items
    └── Unavailable           503  no member could answer; not ready

Errors from onnxruntime, Ray or the database are converted where they are caught,
with `raise ... from exc`; the HTTP layer only looks the status up here.
"""

from __future__ import annotations

__all__ = [
    "EcoserveError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "UnprocessableEntity",
    "Unavailable",
    "status_of",
]


class EcoserveError(Exception):
    """Base of every error the serving layer reports to a client."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(EcoserveError):
    status = 400


class Unauthorized(EcoserveError):
    status = 401


class Forbidden(EcoserveError):
    status = 403


class NotFound(EcoserveError):
    status = 404


class PayloadTooLarge(EcoserveError):
    status = 413


class UnprocessableEntity(EcoserveError):
    status = 422


class Unavailable(EcoserveError):
    status = 503


def status_of(exc: EcoserveError) -> int:
    return exc.status
