"""The one rule for client-supplied text that reaches the outcome store, a metric or a header.

Checked at the edge (the HTTP adapter and the feedback parser) with the same functions, so a
value that passes is one every store can hold, the same on SQLite and PostgreSQL:

- **request ids** (`id`, `x-request-id`, `parameters.request_ids`, a label's `request_id`):
  1 to 128 *visible ASCII* characters, 0x21-0x7E (letters, digits, punctuation). No space,
  no control character, nothing outside ASCII. An id is a key in the store, is echoed in the
  `x-request-id` response header and is posted back with its label, so it must come back byte
  for byte from every store, header and log.
- **free text** (subgroup values, a label's `source`, a class name given as a label): any
  Unicode up to a length bound, except control characters (Unicode category Cc: NUL, newlines,
  escapes, DEL, C1) and lone surrogates. PostgreSQL's text cannot hold NUL; UTF-8 cannot hold a
  lone surrogate, which Python's JSON decoder lets through from `"\\ud800"`.

Bad text is rejected with a message naming what is wrong, never escaped or cut: a changed id or
subgroup value would no longer match what the client sends later.
"""

from __future__ import annotations

import re

__all__ = ["MAX_ID_LENGTH", "MAX_TEXT_LENGTH", "id_problem", "text_problem"]

MAX_ID_LENGTH = 128
MAX_TEXT_LENGTH = 64  # a subgroup value, a label's source
_ID = re.compile(r"[!-~]+")
_NOT_ID = re.compile(r"[^!-~]")
_BAD_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _first_bad(value: str, pattern: re.Pattern[str]) -> str:
    m = pattern.search(value)
    assert m is not None
    ch = m.group(0)
    return f"character U+{ord(ch):04X} at position {m.start()} is not allowed"


def id_problem(value: object) -> str | None:
    """What is wrong with a request id (None: nothing). The message never repeats the raw value."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_ID_LENGTH:
        return f"is {len(value)} characters long; at most {MAX_ID_LENGTH}"
    if _ID.fullmatch(value) is None:
        return (_first_bad(value, _NOT_ID)
                + " (an id is visible ASCII: letters, digits and punctuation, no space)")
    return None


def text_problem(value: object, max_length: int = MAX_TEXT_LENGTH) -> str | None:
    """What is wrong with a piece of free text (None: nothing)."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if len(value) > max_length:
        return f"is {len(value)} characters long; at most {max_length}"
    if _BAD_TEXT.search(value) is not None:
        return _first_bad(value, _BAD_TEXT) + " (no control characters or lone surrogates)"
    return None
