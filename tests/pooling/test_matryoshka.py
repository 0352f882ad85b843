"""`dimensions` for models that declare Matryoshka embeddings: the first dimensions, then
normalized; sizes the model does not offer are refused naming the field."""

import json

import numpy as np
import pytest

from xlaserve import LLM, InvalidRequestError, PoolingParams
from xlaserve.pooling.model_config import PoolerConfig, matryoshka_from_hf
from xlaserve.pooling.postprocess import finish


def test_declarations_and_resolution():
    assert matryoshka_from_hf({}) is None
    assert matryoshka_from_hf({"is_matryoshka": True}) == ()
    assert matryoshka_from_hf({"matryoshka_dimensions": [64, 128]}) == (64, 128)
    listed = PoolerConfig("embed", "MEAN", True, 384, matryoshka_dimensions=(64, 128))
    assert listed.resolve(PoolingParams(dimensions=64)).dimensions == 64
    for bad in (96, 512):
        with pytest.raises(InvalidRequestError) as e:
            listed.resolve(PoolingParams(dimensions=bad))
        assert e.value.param == "dimensions"
    any_size = PoolerConfig("embed", "MEAN", True, 384, matryoshka_dimensions=())
    assert any_size.resolve(PoolingParams(dimensions=100)).dimensions == 100
    with pytest.raises(InvalidRequestError, match="1 ... 384"):
        any_size.resolve(PoolingParams(dimensions=385))
    task = any_size.resolve(PoolingParams(dimensions=3))
    np.testing.assert_allclose(finish(np.array([3.0, 4.0, 0.0, 9.0]), task), [0.6, 0.8, 0.0])


@pytest.fixture(scope="module")
def matryoshka_llm(minilm_path, tmp_path_factory):
    """MiniLM's folder (linked) with a config.json that declares Matryoshka sizes."""
    folder = tmp_path_factory.mktemp("matryoshka")
    for item in minilm_path.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((minilm_path / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [64, 384]}))
    return LLM(str(folder), dtype="float32", max_num_seqs=16)


def test_engine_shortens_then_normalizes(matryoshka_llm, minilm_st):
    text = "Matryoshka embeddings keep their first dimensions."
    short = np.array(matryoshka_llm.embed(text, PoolingParams(dimensions=64),
                                          use_tqdm=False)[0].outputs.embedding)  # fmt: skip
    full = minilm_st.encode([text], normalize_embeddings=False)[0]
    assert short.shape == (64,)
    assert abs(np.linalg.norm(short) - 1.0) < 1e-5
    cosine = short @ full[:64] / np.linalg.norm(full[:64])
    assert cosine >= 0.9999
    with pytest.raises(InvalidRequestError) as e:
        matryoshka_llm.embed(text, PoolingParams(dimensions=128), use_tqdm=False)
    assert e.value.param == "dimensions"
