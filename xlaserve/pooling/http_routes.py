"""The pooling routes of the OpenAI server: POST /v1/embeddings, /v1/score, /v1/rerank.

Requests go through the server's one `submit` (so the engine's intake validates them): a
generative server refuses them with 400 naming the model's runner, as a pooling server refuses
completions. Errors name the field the client sent (`input`, `text_2`, `documents`).
"""

from __future__ import annotations

import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from xlaserve.pooling import protocol
from xlaserve.pooling.api import score_pairs
from xlaserve.pooling.params import PoolingParams
from xlaserve.pooling.postprocess import cosine
from xlaserve.pooling.submit import pool_all
from xlaserve.serving.context import ServingContext
from xlaserve.serving.errors import classify
from xlaserve.serving.openai_protocol import parse_body


class PoolingRoutes:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def _pooler(self):
        """The served model's pooling defaults (None: a generative model)."""
        return self.ctx.engine.engine.pooler

    async def embeddings(self, request: Request):
        req = parse_body(await request.body(), protocol.EmbeddingRequest)
        self.ctx.check_model(req.model)
        prompts = req.prompts()
        try:
            params = req.pooling_params()
        except ValueError as e:
            raise classify(e) from e
        outputs = await pool_all(self.ctx, 
            prompts, params, f"embd-{uuid.uuid4().hex}", priority=req.priority,
            client_param="input", add_special_tokens=req.add_special_tokens,
        )  # fmt: skip
        body = protocol.embedding_response(outputs, self.ctx.model_name, req.encoding_format)
        return JSONResponse(body)

    async def _scores(self, text_1: list[str], text_2: list[str], req, base_id: str,
                      client_param: str) -> tuple[list[float], int]:  # fmt: skip
        """(score of each pair, prompt tokens): a cross-encoder's score of the pair, or the
        cosine similarity of the two texts' embeddings."""
        try:
            pairs = score_pairs(text_1, text_2)
            pooler = self._pooler()
            cross = pooler is not None and pooler.is_cross_encoder
            task = "score" if cross else "embed"
            params = PoolingParams(truncate_prompt_tokens=req.truncate_prompt_tokens, task=task)
        except ValueError as e:
            raise classify(e) from e
        if cross:
            prompts = [{"prompt": a, "prompt_pair": b} for a, b in pairs]
            outs = await pool_all(self.ctx, prompts, params, base_id, priority=req.priority,
                                    client_param=client_param)  # fmt: skip
            scores = [o.outputs.score for o in outs]
        else:
            flat = [text for pair in pairs for text in pair]
            outs = await pool_all(self.ctx, flat, params, base_id, priority=req.priority,
                                    client_param=client_param)  # fmt: skip
            scores = [cosine(outs[2 * i].outputs.data, outs[2 * i + 1].outputs.data)
                      for i in range(len(pairs))]  # fmt: skip
        return scores, sum(len(o.prompt_token_ids) for o in outs)

    async def score(self, request: Request):
        req = parse_body(await request.body(), protocol.ScoreRequest)
        self.ctx.check_model(req.model)
        text_1, text_2 = req.texts()
        base_id = f"score-{uuid.uuid4().hex}"
        scores, tokens = await self._scores(text_1, text_2, req, base_id, "text_2")
        return JSONResponse(protocol.score_response(base_id, scores, self.ctx.model_name, tokens))

    async def rerank(self, request: Request):
        req = parse_body(await request.body(), protocol.RerankRequest)
        self.ctx.check_model(req.model)
        req.check()
        base_id = f"rerank-{uuid.uuid4().hex}"
        scores, tokens = await self._scores([req.query], req.documents, req, base_id,
                                            "documents")  # fmt: skip
        body = protocol.rerank_response(base_id, req, scores, self.ctx.model_name, tokens)
        return JSONResponse(body)


def add_pooling_routes(app, ctx: ServingContext) -> None:
    routes = PoolingRoutes(ctx)
    app.post("/v1/embeddings")(routes.embeddings)
    app.post("/v1/score")(routes.score)
    app.post("/v1/rerank")(routes.rerank)
