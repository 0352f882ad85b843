"""A pooling model's own defaults, read from its folder at load: sentence-transformers'
`modules.json` (is there a Normalize module), the Pooling module's `config.json` (mean / CLS /
last token), `sentence_bert_config.json` (max_seq_length), and config.json's Matryoshka
declaration and classifier labels. Plain data; no jax.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from xlaserve.errors import InvalidRequestError
from xlaserve.pooling.params import PoolingParams, PoolingTask

ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
# sentence-transformers' pooling modes -> ours (a mode we cannot run is an error at load).
ST_MODES = {
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_cls_token": "CLS",
    "pooling_mode_lasttoken": "LAST",
}
ST_UNSUPPORTED_MODES = (
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
)


@dataclass(frozen=True)
class PoolerConfig:
    """What a pooling model does by default.

    task: "embed" for embedding models, "classify" for models with a classification head.
    pooling_type / normalize: the default pooling of embeddings.
    matryoshka_dimensions: None (no Matryoshka support: `dimensions` is refused), () (any
        dimensions up to the hidden size) or the declared sizes.
    max_seq_length: sentence-transformers' limit (the default max_model_len), or None.
    labels: the classifier's label names, in logit order.
    hidden_size: the embedding size.
    """

    task: str
    pooling_type: str
    normalize: bool
    hidden_size: int
    matryoshka_dimensions: tuple[int, ...] | None = None
    max_seq_length: int | None = None
    labels: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_cross_encoder(self) -> bool:
        """A one-logit classifier scores text pairs (sentence-transformers' CrossEncoder)."""
        return self.task == "classify" and len(self.labels) == 1

    def tasks(self) -> tuple[str, ...]:
        if self.task == "embed":
            return ("embed", "score")  # score: cosine of the two embeddings
        return ("classify", "score", "reward") if self.is_cross_encoder else ("classify", "reward")

    def resolve(self, params: PoolingParams, *, pair_start: int | None = None) -> PoolingTask:
        """The request's options with this model's defaults filled in; options the model
        cannot honour are refused naming the field."""
        task = params.task or self.task
        if task not in self.tasks():
            raise InvalidRequestError(
                "task",
                f"this model does not support the {task!r} task; it supports {self.tasks()}",
            )
        embeds = task == "embed" or (task == "score" and self.task == "embed")
        if params.dimensions is not None:
            if not embeds:
                raise InvalidRequestError("dimensions", "dimensions only applies to embeddings")
            self._check_dimensions(params.dimensions)
        if not embeds and (params.normalize is not None or params.pooling_type is not None):
            name = "normalize" if params.normalize is not None else "pooling_type"
            raise InvalidRequestError(name, f"{name} only applies to embeddings, not {task}")
        if embeds and params.activation is not None:
            raise InvalidRequestError("activation", "activation only applies to classifiers")
        return PoolingTask(
            task=task,
            pooling_type=params.pooling_type or self.pooling_type,
            normalize=self.normalize if params.normalize is None else params.normalize,
            dimensions=params.dimensions,
            activation=task != "reward" if params.activation is None else params.activation,
            pair_start=pair_start,
        )

    def _check_dimensions(self, dims: int) -> None:
        declared = self.matryoshka_dimensions
        if declared is None:
            raise InvalidRequestError(
                "dimensions",
                "this model does not declare Matryoshka embeddings, so its embeddings cannot "
                f"be shortened (dimensions={dims}); leave dimensions unset",
            )
        if dims > self.hidden_size or (declared and dims not in declared):
            allowed = list(declared) if declared else f"1 ... {self.hidden_size}"
            raise InvalidRequestError(
                "dimensions", f"dimensions must be one of {allowed} for this model, got {dims}"
            )


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt sentence-transformers file {path}: {e}") from None


def read_sentence_transformers(folder: Path) -> tuple[str | None, bool | None, int | None]:
    """(pooling type, normalize, max_seq_length) from a sentence-transformers folder; None for
    what it does not say (no modules.json: not a sentence-transformers folder)."""
    max_len = None
    if (folder / "sentence_bert_config.json").is_file():
        max_len = _read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    if not (folder / "modules.json").is_file():
        return None, None, max_len
    modules = _read_json(folder / "modules.json")
    types = [m.get("type", "") for m in modules]
    known = (ST_TRANSFORMER, ST_POOLING, ST_NORMALIZE)
    unknown = [t for t in types if t not in known]
    if unknown:  # a Dense projection, say: our output would differ from sentence-transformers'
        raise ValueError(f"{folder}: sentence-transformers modules {unknown} are not supported")
    pooling = None
    for m in modules:
        if m.get("type") == ST_POOLING:
            config = _read_json(folder / m.get("path", "") / "config.json")
            bad = [k for k in ST_UNSUPPORTED_MODES if config.get(k)]
            modes = [ours for k, ours in ST_MODES.items() if config.get(k)]
            if bad or len(modes) != 1:
                raise ValueError(
                    f"{folder}: pooling modes {bad or modes} are not supported (one of "
                    f"{list(ST_MODES)})"
                )
            pooling = modes[0]
    return pooling, ST_NORMALIZE in types, max_len


def matryoshka_from_hf(hf_config: dict) -> tuple[int, ...] | None:
    """config.json's Matryoshka declaration (vLLM's keys): `matryoshka_dimensions` (the sizes)
    or `is_matryoshka: true` (any size)."""
    dims = hf_config.get("matryoshka_dimensions")
    if dims:
        return tuple(int(d) for d in dims)
    return () if hf_config.get("is_matryoshka") else None


def pooler_config_for(
    folder: Path | None, hf_config: dict, *, hidden_size: int, num_labels: int, decoder: bool
) -> PoolerConfig:
    """The defaults of the model in `folder`: a classifier when it has labels; otherwise an
    embedder pooling as its sentence-transformers config says (without one: mean for encoders,
    last token for decoders as Qwen3-Embedding, normalized either way, as vLLM does)."""
    st_pooling = st_normalize = max_len = None
    if folder is not None and folder.is_dir():
        st_pooling, st_normalize, max_len = read_sentence_transformers(folder)
    labels = ()
    if num_labels:
        id2label = hf_config.get("id2label") or {}
        labels = tuple(
            str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_labels)
        )
    return PoolerConfig(
        task="classify" if num_labels else "embed",
        # A classifier reads its head from the last token (decoders) or [CLS] (BERT).
        pooling_type=default_pooling(st_pooling, decoder=decoder, classifier=bool(num_labels)),
        normalize=st_normalize if st_normalize is not None else True,
        hidden_size=hidden_size,
        matryoshka_dimensions=matryoshka_from_hf(hf_config),
        max_seq_length=max_len,
        labels=labels,
    )


def default_pooling(st_pooling: str | None, *, decoder: bool, classifier: bool) -> str:
    if classifier:
        return "LAST" if decoder else "CLS"
    return st_pooling or ("LAST" if decoder else "MEAN")
