"""Offline API: `LLM(model=...).generate(prompts, sampling_params)` and `.chat(...)`."""

import time
from collections.abc import Sequence

from tqdm import tqdm

from xlaserve.config import EngineArgs
from xlaserve.engine.builder import build_engine
from xlaserve.engine.intake import Conversation, PromptType, prompt_list
from xlaserve.engine.outputs import RequestOutput
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.errors import InvalidRequestError
from xlaserve.lora.request import LoRARequest
from xlaserve.pooling import api as pooling_api


class LLM:
    """Generates for many prompts at once with continuous batching.

    Options are those of `EngineArgs` (model, dtype, max_model_len, max_num_seqs,
    max_num_batched_tokens, kv_cache_memory, enable_prefix_caching, seed, load_format, ...).
    """

    def __init__(self, model: str | None = None, **kwargs):
        args = EngineArgs(**kwargs) if model is None else EngineArgs(model=model, **kwargs)
        self.engine = build_engine(args)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_metrics(self) -> dict:
        return self.engine.get_metrics()

    def add_lora(self, lora_request: LoRARequest):
        """Loads a LoRA adapter ahead of use (generate/chat also load one on first use)."""
        return self.engine.add_lora(lora_request)

    def remove_lora(self, lora_name: str) -> None:
        self.engine.remove_lora(lora_name)

    def list_loras(self) -> list:
        """The loaded adapters (`AdapterInfo`: name, lora_int_id, path, identity, rank)."""
        return self.engine.list_loras()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in input order. A prompt is text, {"prompt_token_ids": [...]}, or
        {"prompt": text}; a list of them is a batch. One SamplingParams or one per prompt;
        one LoRARequest (or None: the base model) or one per prompt."""
        prompts = prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise InvalidRequestError(
                    "sampling_params",
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts",
                )
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise InvalidRequestError(
                    "lora_request", f"got {len(loras)} LoRA requests for {len(prompts)} prompts"
                )
        return self._run(prompts, params_list, use_tqdm, loras)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them. `tools`
        (OpenAI tool dicts) go to the template (or its fallback, see xlaserve/tools/template.py);
        `chat_template_kwargs` are extra template variables."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if not isinstance(conversations, list | tuple) or not conversations:
            raise InvalidRequestError("messages", "messages must be a non-empty list")
        extra = {"tools": tools} if tools is not None else {}
        if chat_template_kwargs is not None:
            extra["chat_template_kwargs"] = chat_template_kwargs
        prompts = [
            {"messages": conv, "add_generation_prompt": add_generation_prompt, **extra}
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    # ---- pooling models (runner "pooling"; see xlaserve/pooling/) -------------------------
    def embed(self, prompts, pooling_params=None, use_tqdm: bool = True,
              truncate_prompt_tokens: int | None = None) -> list:  # fmt: skip
        """Embeddings (`.outputs.embedding`), in input order. `pooling_params`: one
        `PoolingParams` (dimensions, normalize, truncate_prompt_tokens, pooling_type) or one
        per prompt."""
        return pooling_api.pool(self.engine, "embed", prompts, pooling_params,
                                truncate_prompt_tokens, use_tqdm)  # fmt: skip

    def classify(self, prompts, pooling_params=None, use_tqdm: bool = True,
                 truncate_prompt_tokens: int | None = None) -> list:  # fmt: skip
        """Class probabilities (`.outputs.probs`) of a classification model."""
        return pooling_api.pool(self.engine, "classify", prompts, pooling_params,
                                truncate_prompt_tokens, use_tqdm)  # fmt: skip

    def reward(self, prompts, pooling_params=None, use_tqdm: bool = True,
               truncate_prompt_tokens: int | None = None) -> list:  # fmt: skip
        """The classification head's raw outputs (`.outputs.data`; no activation)."""
        return pooling_api.pool(self.engine, "reward", prompts, pooling_params,
                                truncate_prompt_tokens, use_tqdm)  # fmt: skip

    def score(self, text_1, text_2, pooling_params=None, use_tqdm: bool = True,
              truncate_prompt_tokens: int | None = None) -> list:  # fmt: skip
        """`.outputs.score` of each pair (one text against many, or many against as many):
        a cross-encoder's score, or the cosine similarity of two embeddings."""
        return pooling_api.score(self.engine, text_1, text_2, pooling_params,
                                 truncate_prompt_tokens, use_tqdm)  # fmt: skip

    def _run(self, prompts, params_list, use_tqdm: bool, loras) -> list[RequestOutput]:
        engine = self.engine
        ids = []
        try:
            for prompt, params, lora in zip(prompts, params_list, loras, strict=True):
                extra = {} if lora is None else {"lora_request": lora}
                ids.append(engine.add_request(None, prompt, params, **extra))
        except Exception:
            for rid in ids:  # leave the engine as it was
                engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm, unit="req")
        output_tokens, start = 0, time.perf_counter()
        try:
            while len(results) < len(ids):
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        output_tokens += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix(tok_per_s=f"{output_tokens / max(elapsed, 1e-9):.1f}")
        except BaseException:
            for rid in ids:
                if rid not in results:
                    engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [results[rid] for rid in ids]
