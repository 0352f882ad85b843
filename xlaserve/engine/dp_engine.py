"""Data parallel: `data_parallel_size` engine replicas, each on its own sub-mesh of
`tensor_parallel_size` devices, behind the one-engine interface (add_request / step / abort).

New requests go to the replica with the least outstanding work (running + waiting requests);
each step advances every busy replica on its own thread (device work releases the GIL).
"""

import dataclasses
import itertools
from concurrent.futures import ThreadPoolExecutor

from xlaserve.engine.intake import PromptType, check_request_id
from xlaserve.engine.llm_engine import LLMEngine
from xlaserve.engine.outputs import RequestOutput
from xlaserve.engine.runner_api import DeviceInfo
from xlaserve.engine.sampling_params import SamplingParams

SPEC_DECODE_SUMMED = (
    "spec_decode_num_drafts",
    "spec_decode_num_draft_tokens",
    "spec_decode_num_accepted_tokens",
    "spec_decode_disabled_steps",
    "spec_decode_propose_seconds",
)
SUMMED_METRICS = (
    "compiles",
    "compiles_after_warmup",
    "preemptions",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "kv_pages_total",
    "kv_pages_free",
    "num_running",
    "num_waiting",
    "steps",
    "step_seconds",
    "device_seconds",
)


class DataParallelEngine:
    """Replicas built by `xlaserve.engine.builder.build_engine`, behind one engine interface."""

    def __init__(self, replicas: list[LLMEngine]):
        self.replicas = replicas
        first = self.replicas[0]
        self.tokenizer = first.tokenizer
        self.vocab_size = first.vocab_size
        self.max_model_len = first.max_model_len
        self.eos_token_ids = first.eos_token_ids
        self.model_name, self.dtype = first.model_name, first.dtype
        self._owner: dict[str, LLMEngine] = {}
        self._request_ids = itertools.count()
        self._pool = ThreadPoolExecutor(len(self.replicas), thread_name_prefix="dp-replica")

    def _load(self, engine: LLMEngine) -> int:
        return len(engine.requests)

    def add_request(
        self,
        request_id: str | None,
        prompt: PromptType,
        params: SamplingParams | None = None,
        **kwargs,
    ) -> str:
        """`LLMEngine.add_request` on the least-loaded replica (its intake validates)."""
        request_id = f"dp-{next(self._request_ids)}" if request_id is None else request_id
        check_request_id(request_id, self._owner)
        engine = min(self.replicas, key=self._load)
        engine.add_request(request_id, prompt, params, **kwargs)
        self._owner[request_id] = engine
        return request_id

    # ---- LoRA adapters: every replica holds the same set -----------------------------------
    def add_lora(self, lora_request):
        infos = [engine.add_lora(lora_request) for engine in self.replicas]
        return infos[0]

    def remove_lora(self, lora_name: str) -> None:
        for engine in self.replicas:
            engine.remove_lora(lora_name)

    def list_loras(self) -> list:
        return self.replicas[0].list_loras()

    def step(self) -> list[RequestOutput]:
        busy = [e for e in self.replicas if e.has_unfinished_requests()]
        outputs: list[RequestOutput] = []
        for result in self._pool.map(LLMEngine.step, busy):
            outputs.extend(result)
        for out in outputs:
            if out.finished:
                self._owner.pop(out.request_id, None)
        return outputs

    def abort_request(self, request_id: str) -> RequestOutput | None:
        engine = self._owner.pop(request_id, None)
        return None if engine is None else engine.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.replicas)

    def shutdown(self) -> None:
        for engine in self.replicas:
            engine.shutdown()
        self._pool.shutdown(wait=False)

    def device_info(self) -> DeviceInfo:
        """All replicas' devices; the mesh shape gains a `data` axis of the replica count."""
        infos = [e.device_info() for e in self.replicas]
        return dataclasses.replace(
            infos[0],
            num_devices=sum(i.num_devices for i in infos),
            mesh_shape={**infos[0].mesh_shape, "data": len(infos)},
            parameter_count=sum(i.parameter_count for i in infos),
            parameter_bytes=sum(i.parameter_bytes for i in infos),
        )

    @property
    def max_num_seqs(self) -> int:
        """Sequences in flight at most, over all replicas."""
        return sum(e.max_num_seqs for e in self.replicas)

    @property
    def structured_outputs_backend(self) -> str | None:
        return self.replicas[0].structured_outputs_backend

    @property
    def page_size(self) -> int:
        return self.replicas[0].page_size

    def get_metrics(self) -> dict:
        per_replica = [e.get_metrics() for e in self.replicas]
        merged = {k: sum(m[k] for m in per_replica) for k in SUMMED_METRICS}
        merged["warmup_seconds"] = max(m["warmup_seconds"] or 0.0 for m in per_replica)
        if "spec_decode_num_drafts" in per_replica[0]:
            for k in SPEC_DECODE_SUMMED:
                merged[k] = sum(m[k] for m in per_replica)
            merged["spec_decode_accepted_per_position"] = [
                sum(c) for c in zip(*(m["spec_decode_accepted_per_position"] for m in per_replica),
                                    strict=True)
            ]  # fmt: skip
            drafted = merged["spec_decode_num_draft_tokens"]
            merged["spec_decode_acceptance_rate"] = (
                merged["spec_decode_num_accepted_tokens"] / drafted if drafted else None
            )
        merged["replicas"] = per_replica
        return merged
