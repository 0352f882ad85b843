"""What pooling requests return, shaped as vLLM's: `.outputs.embedding` (embed),
`.outputs.probs` (classify), `.outputs.score` (score)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xlaserve.engine.outputs import RequestMetrics


@dataclass
class PoolingOutput:
    """data: the embedding f32[D'] or the classifier's scores f32[C]."""

    data: np.ndarray

    @property
    def embedding(self) -> list[float]:
        return self.data.tolist()

    @property
    def probs(self) -> list[float]:
        return self.data.tolist()

    @property
    def score(self) -> float:
        if self.data.shape != (1,):
            raise ValueError(f"a score is one value; this output has {self.data.shape[0]}")
        return float(self.data[0])


@dataclass
class PoolingRequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: PoolingOutput
    task: str  # "embed", "classify", "score" or "reward"
    metrics: RequestMetrics
    finished: bool = True
    error: str | None = None


@dataclass
class ScoringRequestOutput:
    """`LLM.score`'s answer for one pair: `.outputs.score`."""

    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True
