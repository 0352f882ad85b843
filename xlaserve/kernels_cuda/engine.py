"""`LLMEngine.from_engine_args` for `backend="torch"`: the same scheduler over the torch runner.

Mirrors the JAX path step by step (load, size the KV cache from the memory budget, build the
scheduler and runner); only the model, the runner and where free memory is read differ.
"""

from dataclasses import dataclass

import torch

from xlaserve.config import EngineArgs, kv_cache_pages
from xlaserve.engine.llm_engine import runner_config_for, scheduler_config_for
from xlaserve.engine.scheduler import Scheduler
from xlaserve.kernels_cuda.loader import load_torch_model
from xlaserve.kernels_cuda.runner import TorchModelRunner


@dataclass(frozen=True)
class TorchDeviceMemory:
    """What `config.kv_cache_pages` asks of a device (platform, memory_stats), for torch."""

    device: torch.device

    @property
    def platform(self) -> str:
        return "cpu" if self.device.type == "cpu" else "gpu"

    def memory_stats(self) -> dict[str, int]:
        free, total = torch.cuda.mem_get_info(self.device)
        return {"bytes_limit": total, "bytes_in_use": total - free}


def build_torch_engine(engine_cls, args: EngineArgs, mesh=None):
    """An `engine_cls` (LLMEngine) over the torch backend, from the same options."""
    if mesh is not None or args.tensor_parallel_size != 1 or args.data_parallel_size != 1:
        raise ValueError(
            "backend 'torch' runs on one device (no mesh): tensor_parallel_size and "
            f"data_parallel_size must be 1, got {args.tensor_parallel_size} and "
            f"{args.data_parallel_size}"
        )
    loaded = load_torch_model(
        args.model, load_format=args.load_format, dtype=args.dtype, seed=args.seed
    )
    c = loaded.config
    max_model_len = args.resolve_max_model_len(c.max_position_embeddings)
    itemsize = torch.empty(0, dtype=loaded.dtype).element_size()
    page_bytes = c.num_layers * args.page_size * 2 * c.num_kv_heads * c.head_dim * itemsize
    num_pages = kv_cache_pages(
        args,
        page_bytes=page_bytes,
        max_model_len=max_model_len,
        device=TorchDeviceMemory(loaded.device),
    )
    scheduler = Scheduler(scheduler_config_for(args, max_model_len, num_pages))
    runner = TorchModelRunner(loaded.model, runner_config_for(args, max_model_len, num_pages))
    return engine_cls(
        scheduler,
        runner,
        tokenizer=loaded.tokenizer,
        vocab_size=c.vocab_size,
        eos_token_ids=c.eos_token_ids,
        model_name=args.model,
        dtype=str(loaded.dtype).removeprefix("torch."),
    )
