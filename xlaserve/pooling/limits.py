"""What a pooling engine derives from its options: the length limit (sentence-transformers'
max_seq_length unless max_model_len is set) and a token budget that holds a whole prompt
(pooling prompts are never chunked: an encoder attends over the whole sequence at once, and a
mean needs every token's hidden state in one step)."""

from __future__ import annotations

import dataclasses

from xlaserve.config import EngineArgs
from xlaserve.pooling.model_config import PoolerConfig
from xlaserve.pooling.runner_choice import resolve_runner


def check_pooling_backend(args: EngineArgs) -> None:
    """The torch parity backend does not run pooling models: refused at start-up."""
    if args.backend != "jax" and resolve_runner(args.model, args.runner, args.load_format) == (
        "pooling"
    ):
        raise ValueError(
            f"backend {args.backend!r} does not run pooling models (embeddings, "
            "classification, scores); use backend 'jax'"
        )


def pooling_limits(
    args: EngineArgs, pooler: PoolerConfig, max_model_len: int
) -> tuple[int, EngineArgs]:
    """(max_model_len, the options with a token budget of at least max_model_len)."""
    if args.max_model_len is None and pooler.max_seq_length:
        max_model_len = min(max_model_len, pooler.max_seq_length)
    budget = args.max_num_batched_tokens
    if budget is not None and budget < max_model_len:
        raise ValueError(
            f"max_num_batched_tokens must be >= max_model_len ({max_model_len}) for a pooling "
            f"model: its prompts are processed whole, in one step; got {budget}"
        )
    if budget is None:
        budget = max(args.resolve_max_num_batched_tokens(), max_model_len)
    return max_model_len, dataclasses.replace(args, max_num_batched_tokens=budget)
