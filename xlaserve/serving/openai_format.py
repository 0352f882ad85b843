"""OpenAI response bodies and stream chunks built from engine outputs and sample deltas."""

from __future__ import annotations

import json
import time

from xlaserve.serving.deltas import SampleDelta, Usage, ranked_top


class ResponseFormatter:
    """Builds the JSON of one OpenAI response (all its chunks share id, created, model).

    Choice index = prompt index * n + sample index (OpenAI's order for batched prompts).
    """

    def __init__(self, kind: str, request_id: str, model: str, *, n: int, top_logprobs: int,
                 tokens_as_ids: bool, tool_calls=None) -> None:  # fmt: skip
        self.kind = kind  # "completion" or "chat"
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.n = n
        self.top_logprobs = top_logprobs
        self.tokens_as_ids = tokens_as_ids
        # A serving.tool_calls.ToolCallFormatter: chat text read into content and tool_calls.
        self.tool_calls = tool_calls
        self._text_offset: dict[int, int] = {}

    def choice_index(self, prompt_index: int, sample_index: int) -> int:
        return prompt_index * self.n + sample_index

    # ---- logprobs --------------------------------------------------------------------------
    def _token(self, token_id: int, decoded: str | None) -> str:
        return f"token_id:{token_id}" if self.tokens_as_ids else (decoded or "")

    def completion_logprobs(self, index: int, d: SampleDelta) -> dict | None:
        if d.logprobs is None:
            return None
        tokens, token_lps, tops, offsets = [], [], [], []
        offset = self._text_offset.get(index, 0)
        for token_id, position in zip(d.token_ids, d.logprobs, strict=True):
            chosen = position[token_id]
            token = self._token(token_id, chosen.decoded_token)
            tokens.append(token)
            token_lps.append(chosen.logprob)
            top = {self._token(t, lp.decoded_token): lp.logprob for t, lp in ranked_top(position)}
            top.setdefault(token, chosen.logprob)
            tops.append(top)
            offsets.append(offset)
            offset += len(chosen.decoded_token or "")
        self._text_offset[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": token_lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _chat_entry(self, token_id: int, logprob: float, decoded: str | None) -> dict:
        token = self._token(token_id, decoded)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    def chat_logprobs(self, d: SampleDelta) -> dict | None:
        if d.logprobs is None:
            return None
        content = []
        for token_id, position in zip(d.token_ids, d.logprobs, strict=True):
            chosen = position[token_id]
            entry = self._chat_entry(token_id, chosen.logprob, chosen.decoded_token)
            entry["top_logprobs"] = [
                self._chat_entry(t, lp.logprob, lp.decoded_token)
                for t, lp in ranked_top(position, self.top_logprobs)
            ]
            content.append(entry)
        return {"content": content, "refusal": None}

    # ---- choices ---------------------------------------------------------------------------
    def choice(self, prompt_index: int, d: SampleDelta, *, stream: bool, first: bool) -> dict:
        index = self.choice_index(prompt_index, d.index)
        if self.kind == "completion":
            return {
                "index": index,
                "text": d.text,
                "logprobs": self.completion_logprobs(index, d),
                "finish_reason": d.finish_reason,
                "stop_reason": d.stop_reason,
            }
        finish_reason = d.finish_reason
        if self.tool_calls is not None:
            body, finish_reason = self.tool_calls.choice_body(
                index, d.text, d.finish_reason, stream=stream, first=first
            )
        elif stream:
            delta = {"role": "assistant", "content": d.text} if first else {"content": d.text}
            body = {"delta": delta}
        else:
            body = {"message": {"role": "assistant", "content": d.text, "refusal": None}}
        return {
            "index": index,
            **body,
            "logprobs": self.chat_logprobs(d),
            "finish_reason": finish_reason,
            "stop_reason": d.stop_reason,
        }

    def _envelope(self, stream: bool) -> dict:
        if self.kind == "completion":
            obj = "text_completion"
        else:
            obj = "chat.completion.chunk" if stream else "chat.completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, choices: list[dict], usage: Usage) -> dict:
        return {**self._envelope(False), "choices": choices, "usage": usage.openai()}

    def chunk(self, choices: list[dict], usage: Usage | None = None, *,
              with_usage_field: bool = False) -> str:  # fmt: skip
        body = {**self._envelope(True), "choices": choices}
        if with_usage_field:
            body["usage"] = usage.openai() if usage is not None else None
        return sse(body)


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
