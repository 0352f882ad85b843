"""Draft-model proposer: a smaller checkpoint sharing the target's tokenizer drafts k tokens.

The draft runs in the same engine with its own paged KV cache laid over the target's page
tables (same page ids, its own layer/head shapes), so the scheduler's page logic serves both:

- every target forward is mirrored by a draft forward over the same tokens (prompt chunks,
  committed tokens and drafts), which keeps the draft's cache in step with the target's;
- after verification, one device call drafts k tokens for every proposing sequence: starting
  from its last emitted token it decodes k times (a `fori_loop`), writing its own K/V into the
  look-ahead slots the scheduler reserved. Positions past a sequence's pages are not written.

Drafts are the draft model's argmax, so q is one-hot and the rejection rule needs no draft
probabilities; greedy requests accept exactly where the draft agrees with the target.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xlaserve.engine.input_batch import InputBatch, PreparedStep
from xlaserve.engine.runner_api import LoadedForRunner, RunnerConfig
from xlaserve.engine.sampler import first_argmax
from xlaserve.spec_decode.config import SpeculativeConfig
from xlaserve.spec_decode.draft_rows import empty_rows, one_token_metadata


def check_draft_fits(target: LoadedForRunner, draft: LoadedForRunner, name: str) -> None:
    """The draft must speak the target's vocabulary: same size and, when both have
    tokenizers, the same token -> id map."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ValueError(
            f"speculative_config model {name!r} has a vocabulary of {dv} tokens; the "
            f"target's has {tv}: a draft must share the target's tokenizer"
        )
    if target.tokenizer is not None and draft.tokenizer is not None:
        if target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
            raise ValueError(
                f"speculative_config model {name!r} has a different tokenizer from the "
                "target's: a draft must share the target's tokenizer"
            )


class DraftModelProposer:
    target_aux_layers = ()

    def __init__(
        self, spec: SpeculativeConfig, draft: LoadedForRunner, config: RunnerConfig, mesh=None
    ):
        from xlaserve.engine.runner import DeviceSteps  # the runner imports proposers

        self.k = spec.num_speculative_tokens
        self.config = config
        # The draft has no LoRA slots: adapters shape the target only (drafts just get
        # accepted less often under an adapter).
        draft_config = dataclasses.replace(config, max_loras=0, max_lora_rank=0)
        self.steps = DeviceSteps(draft.model, draft_config, draft.kv_cache_spec, mesh)
        self._draft_loop = jax.jit(self._draft_loop_fn, donate_argnums=(1,))

    # ---- the runner's hooks -------------------------------------------------------------------
    def warmup_graphs(self, runner) -> list:
        graphs = [
            (f"draft forward T={t}", lambda t=t: self.steps.forward(runner.empty_step_inputs(t)))
            for t in self.config.token_buckets
        ]
        graphs.append(("draft loop", lambda: self._run_loop(*empty_rows(self.config))))
        return graphs

    def on_forward(self, step: PreparedStep) -> None:
        """Mirrors the target's forward into the draft's cache."""
        self.steps.forward(step.inputs)

    def propose(self, batch: InputBatch, step, emitted, seq_ids) -> dict[int, list[int]]:
        if not seq_ids:
            return {}
        c = self.config
        tokens, positions, pages, limits, num = empty_rows(self.config)
        caps = []
        for i, seq_id in enumerate(seq_ids):
            length = len(batch.token_ids(seq_id)) + len(emitted[seq_id])
            page_ids = batch.page_ids(seq_id)
            tokens[i] = emitted[seq_id][-1]
            positions[i] = length - 1
            pages[i, : len(page_ids)] = page_ids
            limits[i] = min(len(page_ids) * c.page_size, c.max_model_len)
            caps.append(max(0, min(self.k, c.max_model_len - length - 1)))
        num[0] = len(seq_ids)
        drafts = np.asarray(self._run_loop(tokens, positions, pages, limits, num))
        pairs = zip(seq_ids, caps, strict=True)
        return {s: drafts[i, :cap].tolist() for i, (s, cap) in enumerate(pairs) if cap}

    # ---- the device loop ------------------------------------------------------------------------
    def _run_loop(self, tokens, positions, pages, limits, num):
        kv, drafts = self._draft_loop(
            self.steps.params, self.steps.kv_cache, tokens, positions, pages, limits, num
        )
        self.steps.kv_cache = kv
        return drafts

    def _draft_loop_fn(self, params, kv_cache, tokens, positions, pages, limits, num_seqs):
        """k greedy decode steps of the draft for rows [0, num_seqs): i32[R, k] drafts."""
        model = nnx.merge(self.steps.graphdef, params)

        def body(j, carry):
            kv_cache, current, out = carry
            pos = positions + j
            metadata = one_token_metadata(pos, pages, limits, num_seqs, self.config.page_size)
            kv_cache, hidden = model(current, pos, kv_cache, metadata)
            nxt = first_argmax(model.compute_logits(hidden)).astype(jnp.int32)
            return kv_cache, nxt, out.at[:, j].set(nxt)

        out = jnp.zeros((tokens.shape[0], self.k), jnp.int32)
        kv_cache, _, out = jax.lax.fori_loop(0, self.k, body, (kv_cache, tokens, out))
        return kv_cache, out
