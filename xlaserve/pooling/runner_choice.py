"""Which runner a model gets, from its folder's config.json alone (imports nothing heavy: the
engine builder asks before any model code is loaded)."""

from __future__ import annotations

from pathlib import Path

from xlaserve.checkpoints import hf
from xlaserve.checkpoints.presets import resolve_bundled

RUNNERS = ("auto", "generate", "pooling")
ENCODER_ARCHITECTURES = ("BertModel", "BertForSequenceClassification")  # models/bert.py
# Sequence-classification architecture -> the causal-LM architecture of its trunk.
DECODER_CLASSIFIERS = {
    "LlamaForSequenceClassification": "LlamaForCausalLM",
    "MistralForSequenceClassification": "MistralForCausalLM",
    "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
    "Qwen3ForSequenceClassification": "Qwen3ForCausalLM",
}
POOLING_ONLY = (*ENCODER_ARCHITECTURES, *DECODER_CLASSIFIERS)


def hf_folder(model: str) -> Path | None:
    path = resolve_bundled(model) or Path(model)
    return path if hf.is_hf_folder(path) else None


def resolve_runner(model: str, runner: str, load_format: str = "auto") -> str:
    """ "generate" or "pooling" for `model`: "auto" picks pooling for encoder and
    sequence-classification architectures (which cannot generate), generation otherwise; an
    explicit choice the architecture cannot serve is a ValueError saying why."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    folder = hf_folder(model) if load_format in ("auto", "hf") else None
    archs = (hf.read_config(folder).get("architectures") or []) if folder else []
    pooling_only = [a for a in archs if a in POOLING_ONLY]
    if runner == "auto":
        return "pooling" if pooling_only else "generate"
    if runner == "generate" and pooling_only:
        raise ValueError(
            f"{pooling_only[0]} cannot generate text: it is served with runner 'pooling' "
            "(embeddings, classification, scores)"
        )
    return runner
