"""The torch backend for the engine builder (`EngineArgs(backend="torch")`): the torch model,
its KV cache spec and `TorchModelRunner`, on one device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from xlaserve.checkpoints import hf
from xlaserve.config import EngineArgs
from xlaserve.engine.runner_api import KVCacheSpec, LoadedForRunner, RunnerConfig
from xlaserve.kernels_cuda.loader import load_torch_model
from xlaserve.kernels_cuda.runner import TorchModelRunner
from xlaserve.multimodal.loader import is_multimodal


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


def refuse_multimodal(model: str) -> None:
    """The parity backend runs text decoders only: a vision-language checkpoint is refused
    before anything loads."""
    folder = Path(model)
    if not hf.is_hf_folder(folder):
        return
    config = hf.read_config(folder)
    if is_multimodal(config):
        raise ValueError(
            f"backend 'torch' does not run vision-language models ({config['architectures']}); "
            "use the jax backend"
        )


class TorchBackend:
    name = "torch"

    def load(self, args: EngineArgs, mesh=None) -> LoadedForRunner:
        sizes = (args.tensor_parallel_size, args.data_parallel_size, args.expert_parallel_size)
        if mesh is not None or sizes != (1, 1, 1):
            raise ValueError(
                "backend 'torch' runs on one device (no mesh): tensor_parallel_size, "
                "data_parallel_size and expert_parallel_size must be 1, got "
                f"{', '.join(map(str, sizes))}"
            )
        if args.enable_lora:
            raise ValueError(
                "backend 'torch' does not serve LoRA adapters (enable_lora=True); use the jax "
                "backend"
            )
        if args.quantization is not None or args.kv_cache_dtype != "auto":
            raise ValueError(
                "backend 'torch' runs 16/32-bit weights and KV caches; quantization="
                f"{args.quantization!r} and kv_cache_dtype={args.kv_cache_dtype!r} need the jax "
                "backend"
            )
        if args.attention_backend != "auto":
            raise ValueError(
                "attention_backend selects the JAX kernels; backend 'torch' picks its own "
                f"(Triton on CUDA, the torch reference on the CPU), got {args.attention_backend!r}"
            )
        refuse_multimodal(args.model)
        loaded = load_torch_model(
            args.model, load_format=args.load_format, dtype=args.dtype, seed=args.seed
        )
        dtype = str(loaded.dtype).removeprefix("torch.")
        return LoadedForRunner(
            model=loaded.model,
            config=loaded.config,
            tokenizer=loaded.tokenizer,
            dtype_name=dtype,
            kv_cache_spec=KVCacheSpec.for_model(
                loaded.config, page_size=args.page_size, dtype=dtype
            ),
            memory_device=TorchDeviceMemory(loaded.device),
        )

    def make_runner(
        self, model: LoadedForRunner, config: RunnerConfig, speculative_config=None
    ) -> TorchModelRunner:
        if speculative_config is not None:
            raise ValueError(
                "speculative_config is not supported by the torch parity backend (it checks "
                "the target model's numerics); use backend 'jax'"
            )
        return TorchModelRunner(model.model, config, model.kv_cache_spec)
