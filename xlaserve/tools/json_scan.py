"""Finding JSON values in text that may still be growing (a stream of model output).

The scanners report where a value ends, or None while it is incomplete: a prefix of valid JSON
is never called malformed. Structure errors they meet raise `Malformed`; what they cannot see
(e.g. `{"a": 1]`) is left to `json.loads` on the complete value.
"""

from __future__ import annotations

import json
import re

WHITESPACE = " \t\n\r"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_SPECIAL = re.compile(r'[{}\[\]"]')
_SCALAR = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")


class Malformed(ValueError):
    """The text cannot become valid JSON however it continues."""


def skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in WHITESPACE:
        i += 1
    return i


def container_end(text: str, i: int) -> int | None:
    """The index after the object or array opening at text[i] ("{" or "["), None while it is
    incomplete."""
    closers, j = [], i
    while True:
        m = _SPECIAL.search(text, j)
        if m is None:
            return None
        k, c = m.start(), m.group()
        if c == '"':
            s = _STRING.match(text, k)
            if s is None:
                return None
            j = s.end()
            continue
        if c in "{[":
            closers.append("}" if c == "{" else "]")
        elif not closers or closers.pop() != c:
            raise Malformed(f"unbalanced {c!r} at {k}")
        if not closers:
            return k + 1
        j = k + 1


def value_end(text: str, i: int, final: bool) -> int | None:
    """The index after the JSON value starting at text[i], None while it is incomplete. With
    `final`, the text ends where it ends (a number at the end is complete)."""
    if i >= len(text):
        if final:
            raise Malformed("the text ends before a value")
        return None
    c = text[i]
    if c == '"':
        s = _STRING.match(text, i)
        return None if s is None else s.end()
    if c in "{[":
        return container_end(text, i)
    m = _SCALAR.match(text, i)
    if m is not None and (m.end() < len(text) or final):
        return m.end()
    if final or m is None and not _may_start_scalar(text[i:]):
        raise Malformed(f"no JSON value at {i}: {text[i : i + 20]!r}")
    return None


def _may_start_scalar(rest: str) -> bool:
    return any(word.startswith(rest) for word in ("true", "false", "null")) or bool(
        re.fullmatch(r"-?\d*(?:\.\d*)?(?:[eE][+-]?\d*)?", rest)
    )


def object_members(
    text: str, i: int, final: bool
) -> tuple[list[tuple[str, int, int | None]], int | None]:
    """The members of the object opening at text[i] == "{": [(key, value start, value end)]
    (the last value's end None while it is incomplete), and the index after the closing "}"
    (None while the object is incomplete)."""
    members: list[tuple[str, int, int | None]] = []
    n = len(text)
    j = skip_ws(text, i + 1)
    if j < n and text[j] == "}":
        return members, j + 1
    while j < n:
        if text[j] != '"':
            raise Malformed(f"expected a key at {j}, got {text[j]!r}")
        s = _STRING.match(text, j)
        if s is None:
            break
        try:
            key = json.loads(s.group())
        except json.JSONDecodeError as e:
            raise Malformed(f"bad key at {j}: {e}") from None
        j = skip_ws(text, s.end())
        if j >= n:
            break
        if text[j] != ":":
            raise Malformed(f"expected ':' at {j}, got {text[j]!r}")
        start = skip_ws(text, j + 1)
        end = value_end(text, start, final and start < n)
        members.append((key, start, end))
        if end is None:
            break
        j = skip_ws(text, end)
        if j >= n:
            break
        if text[j] == "}":
            return members, j + 1
        if text[j] != ",":
            raise Malformed(f"expected ',' or '}}' at {j}, got {text[j]!r}")
        j = skip_ws(text, j + 1)
    return members, None
