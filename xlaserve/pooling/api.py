"""The offline pooling API behind `LLM.embed / classify / reward / score`: requests through the
engine's one intake, batched by its scheduler, outputs in input order."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from xlaserve.engine.intake import prompt_list
from xlaserve.errors import InvalidRequestError
from xlaserve.pooling.outputs import PoolingOutput, PoolingRequestOutput, ScoringRequestOutput
from xlaserve.pooling.params import PoolingParams
from xlaserve.pooling.postprocess import cosine


def params_for(
    task: str,
    count: int,
    pooling_params: PoolingParams | Sequence[PoolingParams] | None,
    truncate_prompt_tokens: int | None,
) -> list[PoolingParams]:
    """One PoolingParams per prompt, each with `task` (and `truncate_prompt_tokens`) set."""
    if pooling_params is None or isinstance(pooling_params, PoolingParams):
        given = [pooling_params or PoolingParams()] * count
    else:
        given = list(pooling_params)
        if len(given) != count or not all(isinstance(p, PoolingParams) for p in given):
            raise InvalidRequestError(
                "pooling_params",
                f"pooling_params must be one PoolingParams or one per prompt ({count})",
            )
    out = []
    for p in given:
        if p.task is not None and p.task != task:
            raise InvalidRequestError("task", f"pooling_params.task is {p.task!r}, not {task!r}")
        trunc = p.truncate_prompt_tokens if truncate_prompt_tokens is None else (
            truncate_prompt_tokens
        )  # fmt: skip
        out.append(dataclasses.replace(p, task=task, truncate_prompt_tokens=trunc))
    return out


def run(engine, prompts: list, params: list[PoolingParams], use_tqdm: bool):
    """Adds every request (all or none), steps until each finished; outputs in input order."""
    ids = []
    try:
        for prompt, p in zip(prompts, params, strict=True):
            ids.append(engine.add_request(None, prompt, p))
    except Exception:
        for rid in ids:
            engine.abort_request(rid)
        raise
    results: dict[str, PoolingRequestOutput] = {}
    bar = tqdm(total=len(ids), desc="Pooling", disable=not use_tqdm, unit="req")
    try:
        while len(results) < len(ids):
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
    except BaseException:
        for rid in ids:
            if rid not in results:
                engine.abort_request(rid)
        raise
    finally:
        bar.close()
    return [results[rid] for rid in ids]


def pool(engine, task: str, prompts, pooling_params, truncate_prompt_tokens, use_tqdm: bool):
    prompts = prompt_list(prompts)
    params = params_for(task, len(prompts), pooling_params, truncate_prompt_tokens)
    return run(engine, prompts, params, use_tqdm)


def score_pairs(data_1, data_2) -> list[tuple]:
    """vLLM's pairing: one against many, or many against as many (one each)."""
    ones = [prompt_list(d) for d in (data_1, data_2)]
    a, b = ones
    if len(a) == 1:
        a = a * len(b)
    if len(b) == 1:
        b = b * len(a)
    if len(a) != len(b):
        raise InvalidRequestError(
            "text_2", f"score needs 1 or {len(ones[0])} texts in text_2, got {len(ones[1])}"
        )
    return list(zip(a, b, strict=True))


def score(
    engine, data_1, data_2, pooling_params, truncate_prompt_tokens, use_tqdm: bool
) -> list[ScoringRequestOutput]:
    """Relevance of each pair: a cross-encoder's score of the pair tokenized together, or the
    cosine similarity of the two embeddings (embedding models)."""
    pooler = engine.pooler
    if pooler is None:
        raise InvalidRequestError("model", "score needs a pooling model (runner 'pooling')")
    pairs = score_pairs(data_1, data_2)
    if pooler.is_cross_encoder:
        for a, b in pairs:
            if not isinstance(a, str) or not isinstance(b, str):
                raise InvalidRequestError("text_1", "a cross-encoder scores pairs of texts")
        prompts = [{"prompt": a, "prompt_pair": b} for a, b in pairs]
        params = params_for("score", len(prompts), pooling_params, truncate_prompt_tokens)
        outs = run(engine, prompts, params, use_tqdm)
        return [ScoringRequestOutput(o.request_id, o.outputs, o.prompt_token_ids) for o in outs]
    if "score" not in pooler.tasks():
        raise InvalidRequestError("task", f"this model does not score pairs; it supports "
                                  f"{pooler.tasks()}")  # fmt: skip
    flat = [p for pair in pairs for p in pair]
    params = params_for("embed", len(flat), pooling_params, truncate_prompt_tokens)
    embeds = run(engine, flat, params, use_tqdm)
    result = []
    for i in range(len(pairs)):
        a, b = embeds[2 * i], embeds[2 * i + 1]
        value = cosine(a.outputs.data, b.outputs.data)
        result.append(
            ScoringRequestOutput(
                f"{a.request_id}-{b.request_id}",
                PoolingOutput(np.asarray([value], np.float32)),
                a.prompt_token_ids + b.prompt_token_ids,
            )
        )
    return result
