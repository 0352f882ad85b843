"""Request bodies and response shapes of the pooling endpoints: OpenAI's `/v1/embeddings`
(input as text, texts, token ids or token-id lists; encoding_format float | base64;
dimensions) and vLLM's `/v1/score` and `/v1/rerank`. Parsing is strict as for the other
OpenAI bodies (wrong types and unknown fields are errors naming the field)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from xlaserve.pooling.params import PoolingParams
from xlaserve.serving.errors import Kind, ServingError


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _PoolingFields(_Strict):
    model: str | None = None
    truncate_prompt_tokens: int | None = None
    priority: int = 0
    user: str | None = None  # OpenAI's end-user id: accepted, not used


def _bad(param: str, message: str) -> ServingError:
    return ServingError(Kind.INVALID, message, param=param)


class EmbeddingRequest(_PoolingFields):
    input: Any  # str | list[str] | list[int] | list[list[int]], checked in `prompts`
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    normalize: bool | None = None  # vLLM's extension
    add_special_tokens: bool = True

    def prompts(self) -> list:
        x = self.input
        if isinstance(x, str):
            return [x]
        if isinstance(x, list) and not x:
            raise _bad("input", "input is empty: send a string or a non-empty list")
        if isinstance(x, list):
            if all(isinstance(t, str) for t in x):
                return list(x)
            if all(isinstance(t, int) and not isinstance(t, bool) for t in x):
                return [{"prompt_token_ids": x}]
            if all(isinstance(t, list) for t in x):
                return [{"prompt_token_ids": t} for t in x]
        raise _bad(
            "input",
            "input must be a string, a list of strings, a list of token ids or a list of "
            f"token-id lists, got {json.dumps(x)[:80]}",
        )

    def pooling_params(self) -> PoolingParams:
        return PoolingParams(
            dimensions=self.dimensions,
            normalize=self.normalize,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            task="embed",
        )


def _texts(param: str, value: Any) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise _bad(param, f"{param} must be a string or a non-empty list of strings")
    return texts


class ScoreRequest(_PoolingFields):
    text_1: Any
    text_2: Any

    def texts(self) -> tuple[list[str], list[str]]:
        return _texts("text_1", self.text_1), _texts("text_2", self.text_2)


class RerankRequest(_PoolingFields):
    query: str
    documents: list[str]
    top_n: int | None = None
    return_documents: bool = True

    def check(self) -> None:
        if not self.documents:
            raise _bad("documents", "documents must be a non-empty list of strings")
        if self.top_n is not None and self.top_n < 1:
            raise _bad("top_n", f"top_n must be >= 1, got {self.top_n}")


def encode_embedding(values: np.ndarray, encoding_format: str) -> list[float] | str:
    """float: a JSON list; base64: the little-endian float32 bytes (what OpenAI's client
    decodes)."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(values, "<f4").tobytes()).decode("ascii")
    return np.asarray(values, np.float32).tolist()


def usage(num_prompt_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "total_tokens": num_prompt_tokens}


def embedding_response(outputs, model: str, encoding_format: str) -> dict:
    data = [
        {"object": "embedding", "index": i,
         "embedding": encode_embedding(o.outputs.data, encoding_format)}
        for i, o in enumerate(outputs)
    ]  # fmt: skip
    tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {"object": "list", "data": data, "model": model, "usage": usage(tokens)}


def score_response(request_id: str, scores: list[float], model: str, tokens: int) -> dict:
    return {
        "id": request_id,
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
        "usage": usage(tokens),
    }


def rerank_response(request_id: str, req: RerankRequest, scores: list[float], model: str,
                    tokens: int) -> dict:  # fmt: skip
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: req.top_n or len(scores)]
    results = []
    for i in order:
        result = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            result["document"] = {"text": req.documents[i]}
        results.append(result)
    return {"id": request_id, "model": model, "usage": {"total_tokens": tokens},
            "results": results}  # fmt: skip
