"""Data parallel: `data_parallel_size` engine replicas, each on its own sub-mesh of
`tensor_parallel_size` devices, behind the one-engine interface (add_request / step / abort).

New requests go to the replica with the least outstanding work (running + waiting requests);
each step advances every busy replica on its own thread (device work releases the GIL).
"""

import itertools
from concurrent.futures import ThreadPoolExecutor

from xlaserve.config import EngineArgs
from xlaserve.engine.llm_engine import LLMEngine, PromptType
from xlaserve.engine.outputs import RequestOutput
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.sharding.mesh import make_mesh, replica_meshes

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
    def __init__(self, args: EngineArgs):
        mesh = make_mesh(args.tensor_parallel_size, args.data_parallel_size)
        self.replicas = [LLMEngine.from_engine_args(args, m) for m in replica_meshes(mesh)]
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
        request_id = f"dp-{next(self._request_ids)}" if request_id is None else str(request_id)
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        engine = min(self.replicas, key=self._load)
        engine.add_request(request_id, prompt, params, **kwargs)
        self._owner[request_id] = engine
        return request_id

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

    def get_metrics(self) -> dict:
        per_replica = [e.get_metrics() for e in self.replicas]
        merged = {k: sum(m[k] for m in per_replica) for k in SUMMED_METRICS}
        merged["warmup_seconds"] = max(m["warmup_seconds"] or 0.0 for m in per_replica)
        merged["replicas"] = per_replica
        return merged


def build_engine(args: EngineArgs) -> LLMEngine | DataParallelEngine:
    """The engine for these options: one replica, or a data-parallel set of them."""
    if args.data_parallel_size > 1:
        return DataParallelEngine(args)
    return LLMEngine.from_engine_args(args)
