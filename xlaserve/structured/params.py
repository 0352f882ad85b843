"""`StructuredOutputsParams`: the constraint a request's output must follow (vLLM's names).

Exactly one of `json` (a JSON schema, dict or string), `json_object=True` (any JSON object),
`regex`, `choice` (a list of strings) or `grammar` (a Lark grammar for llguidance, EBNF/GBNF for
xgrammar; llguidance also reads GBNF). Bad values raise `InvalidRequestError` with param
"structured_outputs" (or the OpenAI field a server maps it to).
"""

from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass, field

from xlaserve.errors import InvalidRequestError

KINDS = ("json", "json_object", "regex", "choice", "grammar")
PARAM = "structured_outputs"


def _invalid(message: str) -> InvalidRequestError:
    return InvalidRequestError(PARAM, message)


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    # JSON only: no whitespace between tokens (compact JSON) / the whitespace allowed.
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None
    # The resolved JSON schema text, for hashing and the backends (set in __post_init__).
    schema_text: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise _invalid(
                f"give exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})"
            )
        if not isinstance(self.json_object, bool):
            raise _invalid(f"json_object must be a bool, got {self.json_object!r}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise _invalid(
                f"disable_any_whitespace must be a bool, got {self.disable_any_whitespace!r}"
            )
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise _invalid(f"whitespace_pattern must be a string, got {self.whitespace_pattern!r}")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = jsonlib.loads(schema)
                except jsonlib.JSONDecodeError as e:
                    raise _invalid(f"json schema is not valid JSON: {e}") from None
            if not isinstance(schema, dict | bool):
                raise _invalid(f"json schema must be a JSON object, got {type(schema).__name__}")
            object.__setattr__(self, "schema_text", jsonlib.dumps(schema))  # key order kept
        if self.json_object:
            object.__setattr__(self, "schema_text", jsonlib.dumps({"type": "object"}))
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise _invalid(f"regex must be a non-empty string, got {self.regex!r}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar):
            raise _invalid(f"grammar must be a non-empty string, got {self.grammar!r}")
        if self.choice is not None:
            if not isinstance(self.choice, list | tuple) or not self.choice:
                raise _invalid(f"choice must be a non-empty list of strings, got {self.choice!r}")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise _invalid(f"choice must hold non-empty strings, got {list(self.choice)!r}")
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def cache_key(self) -> tuple:
        """What identifies the compiled grammar (with the backend's name)."""
        value = {
            "json": self.schema_text,
            "json_object": self.schema_text,
            "regex": self.regex,
            "choice": self.choice,
            "grammar": self.grammar,
        }[self.kind]
        return (self.kind, value, self.disable_any_whitespace, self.whitespace_pattern)

    @classmethod
    def from_dict(cls, data: object) -> StructuredOutputsParams:
        """From a request body's `structured_outputs` object (unknown keys refused)."""
        if isinstance(data, StructuredOutputsParams):
            return data
        if not isinstance(data, dict):
            raise _invalid(f"structured_outputs must be an object, got {type(data).__name__}")
        known = {*KINDS, "disable_any_whitespace", "whitespace_pattern"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise _invalid(f"unsupported structured_outputs field(s) {unknown}")
        return cls(**data)
