"""Bearer tokens: who may post labels and outcomes, for which ecosystems, and who may infer.

Three kinds of token, each read from an environment variable once when the app is built
(`serving.config.AuthConfig`): the all-ecosystems label token (`feedback_token_env`), tokens
scoped to some ecosystems (`ecosystem_tokens`), and an optional inference token. A presented
token is compared with every configured one in constant time (`hmac.compare_digest`), so the
time an answer takes says nothing about how much of a token was right, or which token matched.
No token is ever logged, put in an error message, or exported as a metric (docs/security.md).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from serving.errors import Forbidden, Unauthorized

__all__ = ["Credentials", "Scope", "ALL", "authorize_labels", "authorize_inference", "check_scope"]

Scope = frozenset[str] | None  # the ecosystems a caller may label; None: every ecosystem
ALL: Scope = None


@dataclass(frozen=True)
class Credentials:
    feedback: str | None = None  # every ecosystem
    scoped: tuple[tuple[str, frozenset[str]], ...] = ()  # (token, the ecosystems it covers)
    inference: str | None = None

    @property
    def labels_open(self) -> bool:
        """No label token configured: the feedback and outcomes APIs are open (a trusted network)."""
        return self.feedback is None and not self.scoped


def _bearer(header: str | None, what: str) -> bytes:
    if not header or not header.startswith("Bearer "):
        raise Unauthorized(f"{what} needs 'Authorization: Bearer <token>'")
    return header.removeprefix("Bearer ").encode("utf-8", "surrogateescape")


def authorize_labels(header: str | None, creds: Credentials) -> Scope:
    """The ecosystems the caller may post labels and outcomes for (None: all), or 401."""
    if creds.labels_open:
        return ALL
    presented = _bearer(header, "this API")
    scope: Scope = frozenset()
    matched = False
    # compare with every token (no early exit): which one matched does not show in the timing
    if creds.feedback is not None and hmac.compare_digest(presented, creds.feedback.encode()):
        matched, scope = True, ALL
    for token, ecosystems in creds.scoped:
        if hmac.compare_digest(presented, token.encode()) and not matched:
            matched, scope = True, ecosystems
    if not matched:
        raise Unauthorized("the bearer token is wrong")
    return scope


def authorize_inference(header: str | None, creds: Credentials) -> None:
    """Inference is open unless an inference token is configured; then it must be presented (401)."""
    if creds.inference is None:
        return
    if not hmac.compare_digest(_bearer(header, "inference"), creds.inference.encode()):
        raise Unauthorized("the bearer token is wrong")


def check_scope(scope: Scope, ecosystem: str, where: str) -> None:
    """403 when a scoped token posts for an ecosystem it does not cover."""
    if scope is not None and ecosystem not in scope:
        raise Forbidden(f"{where}: this token does not cover ecosystem {ecosystem!r}")
