import copy

import pytest

from tests.conftest import TEST_TOKEN_BUCKETS
from tests.lora.peft_adapters import ATTN, MLP, AdapterSpec, hf_greedy, make_adapters

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]
NEW_TOKENS = 8
SPECS = {
    "attn8": AdapterSpec(r=8, alpha=16, targets=ATTN, seed=1),
    "mlp4": AdapterSpec(r=4, alpha=8, targets=MLP, seed=2),
    "all16-rslora": AdapterSpec(r=16, alpha=16, targets=ATTN + MLP, seed=3, rslora=True),
    "qv2-bin": AdapterSpec(
        r=2, alpha=4, targets=["q_proj", "v_proj"], seed=4, bin_file=True, scale=0.15
    ),
    "attn8-other": AdapterSpec(r=8, alpha=16, targets=ATTN, seed=5),  # attn8's shape, new weights
}
# One engine configuration for the SmolLM2 LoRA tests (compiled once per session); token
# buckets as in tests/conftest.py.
LORA_ENGINE_KWARGS = dict(
    dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
    enable_lora=True, max_loras=4, max_lora_rank=16, max_cpu_loras=4,
    token_buckets=TEST_TOKEN_BUCKETS,
)  # fmt: skip


@pytest.fixture(scope="session")
def prompt_ids(smollm2):
    return [smollm2.tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="session")
def smollm2_adapters(tmp_path_factory, smollm2_hf, prompt_ids):
    """name -> MadeAdapter (path, peft greedy tokens per prompt, prompt log-softmax), plus
    "base": transformers' own greedy tokens."""
    base = copy.deepcopy(smollm2_hf)
    folder = tmp_path_factory.mktemp("adapters")
    made = make_adapters(base, SPECS, folder, prompt_ids, NEW_TOKENS, prompt_ids[2])
    made["base"] = [hf_greedy(base, ids, NEW_TOKENS) for ids in prompt_ids]
    return made


@pytest.fixture(scope="session")
def lora_llm():
    from xlaserve import LLM

    return LLM("smollm2-135m-instruct", **LORA_ENGINE_KWARGS)
