"""The grammar-backend contract: compile a constraint once, then one matcher per sequence that
fills its row of the token bitmask and advances on each sampled token."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from xlaserve.structured.params import StructuredOutputsParams


class Matcher(Protocol):
    def fill_bitmask(self, row: np.ndarray) -> None:
        """Writes the allowed next tokens into `row` (int32[ceil(V/32)], bit t%32 of word
        t//32 set = token t allowed)."""

    def accept(self, token: int) -> bool:
        """Advances by a sampled token; False if the grammar does not allow it."""

    def is_terminated(self) -> bool:
        """The constraint is complete: nothing (but EOS) may follow."""


class CompiledGrammar(Protocol):
    def new_matcher(self) -> Matcher: ...


class GrammarBackend(Protocol):
    name: str

    def check(self, params: StructuredOutputsParams) -> None:
        """Fast checks of the constraint itself (syntax, supported features), on the caller's
        thread: raises `InvalidRequestError` naming what is wrong."""

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled constraint (may take long: runs off the engine thread). Raises
        `InvalidRequestError` for a constraint it cannot compile."""

    def fill_bitmasks(self, matchers: list[Matcher], out: np.ndarray) -> None:
        """Row i of `out` (int32[len(matchers), W]) = matchers[i]'s allowed next tokens; a
        backend may fill the rows in parallel."""


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32
