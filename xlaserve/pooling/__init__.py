"""Pooling models: embeddings, classification, cross-encoder scores (`LLM.embed / classify /
score / reward`, `/v1/embeddings`, `/v1/score`, `/v1/rerank`, gRPC `Embed`).

params.py (PoolingParams), model_config.py (a model's defaults from its sentence-transformers
files), loader.py (encoders and decoder heads from HF folders), intake.py (pooling prompts
through the engine's one intake), poolers.py (mean / CLS / last token, normalize, activation),
runner.py (the Runner returning pooled rows), api.py (the offline API), limits.py (derived
engine limits), outputs.py.
"""

from xlaserve.pooling.params import PoolingParams

__all__ = ["PoolingParams"]
