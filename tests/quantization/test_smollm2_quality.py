"""SmolLM2-135M-Instruct quantized: perplexity on a fixed English text against bfloat16, and
the GGUF file's packed blocks give the dequantized model's greedy tokens (quantization="gguf")
or stay within 1% of its perplexity with int8 activations ("gguf_a8"), on the CPU kernels too."""

import dataclasses

import pytest

from tests.quantization.conftest import perplexity
from xlaserve.checkpoints.loader import load_model
from xlaserve.kernels_cpu import skinny
from xlaserve.models.generate import greedy_generate

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The three primary colors are",
    "Q: What is 12 times 12?\nA:",
    "Photosynthesis is the process by which plants",
]


@pytest.fixture(scope="module")
def bf16(smollm2_gguf):
    return load_model(str(smollm2_gguf), dtype="bfloat16", with_tokenizer=False).model


@pytest.fixture(scope="module")
def bf16_perplexity(bf16, english_ids):
    return perplexity(bf16, english_ids)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("quantization", "kv_cache_dtype", "within"),
    [
        ("int8", "auto", 0.01),
        ("w8a8", "auto", 0.03),
        ("fp8-activations", "auto", 0.03),
        ("gguf_a8", "auto", 0.01),  # the file's blocks against their own dequantized weights
        (None, "int8", 0.01),
        (None, "fp8", 0.03),
    ],
)
def test_perplexity_stays_within_the_stated_share_of_bfloat16(
    smollm2_gguf, english_ids, bf16, bf16_perplexity, quantization, kv_cache_dtype, within
):
    model = bf16
    if quantization is not None:
        # "fp8-activations": fp8 as it runs on a GPU / TPU with fp8 matmuls (this CPU has none,
        # so the loader left it weight-only; XLA's CPU product is exact, only slow).
        method = quantization.split("-")[0]
        model = load_model(str(smollm2_gguf), dtype="bfloat16", with_tokenizer=False,
                           quantization=method).model  # fmt: skip
        assert not model.quant.fp8_activations
        if quantization == "fp8-activations":
            model.quant = dataclasses.replace(model.quant, fp8_activations=True)
    ppl = perplexity(model, english_ids, kv_cache_dtype)
    assert 5 < bf16_perplexity < 40  # a real English text under a real model
    assert abs(ppl / bf16_perplexity - 1) <= within, (ppl, bf16_perplexity)


@pytest.mark.slow
def test_gguf_packed_blocks_give_the_dequantized_models_greedy_tokens(smollm2_gguf, smollm2, bf16):
    packed = load_model(str(smollm2_gguf), dtype="bfloat16", with_tokenizer=False,
                        quantization="gguf").model  # fmt: skip
    assert packed.layers.wq[...].dtype.name == "uint8"  # kept packed: Q4_1 rows
    prompts = [smollm2.tokenizer(p)["input_ids"] for p in PROMPTS]
    want = greedy_generate(bf16, prompts, 12)
    assert greedy_generate(packed, prompts, 12) == want


@pytest.mark.slow
@pytest.mark.skipif(not skinny.available(), reason="the CPU kernels are not used on this machine")
@pytest.mark.parametrize("method", ["gguf", "gguf_a8"])
def test_gguf_on_the_cpu_kernels_stays_within_one_percent_of_bfloat16(
    smollm2_gguf, english_ids, bf16_perplexity, method
):
    # The per-layer layout is the one the engine serves on the CPU: its GGUF projections and
    # head run gguf_matmul.cc / gguf_matmul_a8.cc. Their products equal the reference up to
    # float32 sums (tests/kernels_cpu), but a bfloat16 model carries each rounding onward,
    # so greedy tokens can part from the reference path's at near-ties; perplexity over the
    # whole text is the stable check.
    model = load_model(str(smollm2_gguf), dtype="bfloat16", with_tokenizer=False,
                       quantization=method, layer_layout="per_layer").model  # fmt: skip
    assert model.quant.kernel_layout and model.quant.int8_activations == (method == "gguf_a8")
    ppl = perplexity(model, english_ids)
    assert abs(ppl / bf16_perplexity - 1) <= 0.01, (ppl, bf16_perplexity)
