"""LoRA on the real SmolLM2-135M-Instruct against peft + transformers (float32): adapters of
several ranks and target sets (one rsLoRA, one saved as .bin) give peft's greedy tokens and
log-probabilities, alone and mixed in one batch, with more adapters than device slots, with
no compile after warm-up; the prefix cache shares KV only under the same adapter weights."""

import shutil

import numpy as np
import pytest

from tests.lora.conftest import NEW_TOKENS, PROMPTS, SPECS
from xlaserve import InvalidRequestError, LoRARequest, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
IDS = {name: i + 1 for i, name in enumerate(SPECS)}
pytestmark = pytest.mark.slow  # builds a SmolLM2 engine and five peft adapters (~60 s)


def request(adapters, name: str) -> LoRARequest:
    return LoRARequest(name, IDS[name], adapters[name].path)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_clean(llm) -> None:
    m = llm.get_metrics()
    assert m["compiles_after_warmup"] == 0
    assert m["kv_pages_free"] == m["kv_pages_total"]


def test_each_adapter_alone_gives_peft_greedy_tokens(lora_llm, smollm2_adapters):
    base = tokens(lora_llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert base == smollm2_adapters["base"]
    for name in SPECS:
        made = smollm2_adapters[name]
        got = tokens(lora_llm.generate(PROMPTS, GREEDY, use_tqdm=False,
                                       lora_request=request(smollm2_adapters, name)))  # fmt: skip
        assert got == made.greedy, name
        assert got != base, f"{name} changes nothing: the test could not fail"
    assert_clean(lora_llm)


@pytest.mark.parametrize("name", ["all16-rslora", "mlp4", "qv2-bin"])
def test_prompt_logprobs_equal_peft(lora_llm, smollm2_adapters, prompt_ids, name):
    made = smollm2_adapters[name]
    ids = prompt_ids[2]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    out = lora_llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False,
                            lora_request=request(smollm2_adapters, name))[0]  # fmt: skip
    ours = np.array([out.prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))])
    ref = made.prompt_logprobs[np.arange(len(ids) - 1), ids[1:]]
    # float32 on both sides over 30 layers: the base model alone differs by < 1e-4 in logits.
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)


def test_mixed_batch_of_four_adapters_and_base_equals_each_alone(lora_llm, smollm2_adapters):
    names = ["attn8", "mlp4", "all16-rslora", "qv2-bin", None]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    loras = [None if n is None else request(smollm2_adapters, n) for n in names]
    got = tokens(lora_llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras))
    for i, name in enumerate(names):
        ref = smollm2_adapters["base"] if name is None else smollm2_adapters[name].greedy
        assert got[i] == ref[i % len(PROMPTS)], name
    assert_clean(lora_llm)


def test_more_adapters_than_slots_all_complete_correctly(lora_llm, smollm2_adapters):
    # Five adapters (and the base) for four device slots and a host cache of four: requests
    # wait for a slot, adapters leave the device and the host cache and come back.
    names = [*SPECS, None] * 2
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    loras = [None if n is None else request(smollm2_adapters, n) for n in names]
    before = lora_llm.engine.runner.batch.lora_slots.num_loads
    got = tokens(lora_llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=loras))
    for i, name in enumerate(names):
        ref = smollm2_adapters["base"] if name is None else smollm2_adapters[name].greedy
        assert got[i] == ref[i % len(PROMPTS)], name
    assert lora_llm.engine.runner.batch.lora_slots.num_loads > before  # a fifth adapter came in
    assert_clean(lora_llm)


def test_prefix_cache_shares_only_under_the_same_adapter_weights(
    lora_llm, smollm2_adapters, tmp_path
):
    prompt = " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(8))
    assert len(lora_llm.get_tokenizer()(prompt)["input_ids"]) > 48  # three full pages

    def cached(lora):
        out = lora_llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=lora)[0]
        return out.num_cached_tokens, out.outputs[0].token_ids

    attn8 = request(smollm2_adapters, "attn8")
    first, tokens_a = cached(attn8)
    again, tokens_b = cached(attn8)
    assert first == 0 and again >= 48 and tokens_a == tokens_b
    assert cached(request(smollm2_adapters, "attn8-other"))[0] == 0  # same shape, other weights
    assert cached(None)[0] == 0  # the base model
    # The same weights under another name (a copied folder) share the pages.
    shutil.copytree(smollm2_adapters["attn8"].path, tmp_path / "copy")
    renamed, tokens_c = cached(LoRARequest("attn8-renamed", 99, str(tmp_path / "copy")))
    assert renamed >= 48 and tokens_c == tokens_a
    assert_clean(lora_llm)


def test_bad_adapters_refused_engine_keeps_serving(lora_llm, smollm2_adapters, tmp_path):
    missing = LoRARequest("missing", 77, str(tmp_path / "nope"))
    with pytest.raises(InvalidRequestError, match="folder not found") as e:
        lora_llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=[None, None, missing])
    assert e.value.param == "lora_path"
    shutil.copytree(smollm2_adapters["all16-rslora"].path, tmp_path / "big")
    config = tmp_path / "big" / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 16', '"r": 32'))
    with pytest.raises(InvalidRequestError, match="rank 32 exceeds max_lora_rank 16"):
        lora_llm.generate(PROMPTS[0], GREEDY, use_tqdm=False,
                          lora_request=LoRARequest("big", 78, str(tmp_path / "big")))  # fmt: skip
    assert {"missing", "big"}.isdisjoint(a.name for a in lora_llm.list_loras())
    got = lora_llm.generate(PROMPTS, GREEDY, use_tqdm=False,
                            lora_request=request(smollm2_adapters, "attn8"))  # fmt: skip
    assert tokens(got) == smollm2_adapters["attn8"].greedy
    assert_clean(lora_llm)
