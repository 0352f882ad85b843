"""xlaserve: a JAX/XLA-compiled LLM inference and serving engine."""

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "EngineArgs",
    "RequestOutput",
    "CompletionOutput",
    "SamplingParams",
    "PoolingParams",
    "InvalidRequestError",
    "LoRARequest",
]


def __getattr__(name: str):
    # Lazy, so `import xlaserve` stays cheap and importing submodules does not load jax.
    if name == "LLM":
        from xlaserve.engine.llm import LLM

        return LLM
    if name == "EngineArgs":
        from xlaserve.config import EngineArgs

        return EngineArgs
    if name in ("RequestOutput", "CompletionOutput"):
        from xlaserve.engine import outputs

        return getattr(outputs, name)
    if name == "InvalidRequestError":
        from xlaserve.errors import InvalidRequestError

        return InvalidRequestError
    if name == "LoRARequest":
        from xlaserve.lora.request import LoRARequest

        return LoRARequest
    if name == "SamplingParams":
        from xlaserve.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "PoolingParams":
        from xlaserve.pooling.params import PoolingParams

        return PoolingParams
    raise AttributeError(f"module 'xlaserve' has no attribute {name!r}")
