"""Proposers: what drafts the next step's tokens for the sequences the scheduler picked.

A proposer runs in the runner after a step's tokens are known, and sees the runner's input
batch (committed tokens), the tokens each sequence emitted in this step and, for proposers that
run a model, the step's prepared inputs. It returns seq_id -> drafts (at most k each).
"""

from __future__ import annotations

from typing import Protocol

from xlaserve.engine.input_batch import InputBatch, PreparedStep
from xlaserve.spec_decode.config import SpeculativeConfig
from xlaserve.spec_decode.ngram import propose_ngram


class Proposer(Protocol):
    # Target layers whose inputs the target's forward keeps for the proposer (EAGLE-3).
    target_aux_layers: tuple[int, ...]

    def warmup_graphs(self, runner) -> list:
        """(name, call) of every graph the proposer runs, compiled at the runner's warm-up."""

    def on_forward(self, step: PreparedStep) -> None:
        """Called right after the target's forward of each step is dispatched."""

    def propose(
        self,
        batch: InputBatch,
        step: PreparedStep,
        emitted: dict[int, list[int]],
        seq_ids: list[int],
    ) -> dict[int, list[int]]:
        """Called after every step: `emitted` holds the tokens each sampled sequence emitted
        (accepted drafts, then the sampled one), `seq_ids` those to draft for."""


class NgramProposer:
    """Prompt lookup over each sequence's own prompt and outputs (host, numpy)."""

    target_aux_layers = ()

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.k = config.num_speculative_tokens
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max
        self.max_model_len = max_model_len

    def warmup_graphs(self, runner) -> list:
        return []

    def on_forward(self, step) -> None:
        pass

    def propose(self, batch, step, emitted, seq_ids):
        if not seq_ids:
            return {}
        contexts = [batch.token_ids(s) + emitted[s] for s in seq_ids]
        # A draft is only useful if it can be accepted before max_model_len.
        limits = [self.max_model_len - len(c) - 1 for c in contexts]
        drafts = propose_ngram(contexts, self.k, self.min_n, self.max_n, limits=limits)
        return {s: d for s, d in zip(seq_ids, drafts, strict=True) if d}
