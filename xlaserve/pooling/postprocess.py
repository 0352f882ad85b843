"""The host-side finish of a pooled row (Matryoshka truncation, L2 normalization, classifier
activation) and cosine scores. numpy only: the servers import this without jax."""

from __future__ import annotations

import numpy as np

from xlaserve.pooling.params import PoolingTask


def finish(values: np.ndarray, task: PoolingTask) -> np.ndarray:
    """A row's final output: for embeddings the pooled vector cut to `dimensions` and then
    normalized (as sentence-transformers' Matryoshka truncation); for classifiers the head's
    logits through softmax (several labels) or sigmoid (one), unless activation is off."""
    x = np.asarray(values, np.float32)
    if not task.uses_head:
        if task.dimensions is not None:
            x = x[: task.dimensions]
        if task.normalize:
            x = x / max(float(np.linalg.norm(x)), 1e-12)
        return x
    if not task.activation:
        return x
    if x.shape[0] == 1:
        return 1.0 / (1.0 + np.exp(-x))
    e = np.exp(x - x.max())
    return e / e.sum()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (what `score` returns for embedding models)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
