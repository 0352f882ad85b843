"""The engine on the real SmolLM2-135M-Instruct: batching, caching and preemption never change
the tokens; sampling options do what they say; bad input is refused and serving goes on."""

import numpy as np
import pytest
import torch

from tests.conftest import ENGINE_KWARGS
from xlaserve import LLM, SamplingParams

TOPICS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at",
    "1, 2, 3, 4, 5,",
    "The chemical symbol for gold is",
    "Translate to French: I like apples.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The three primary colors are",
    "import numpy as np\n\ndef softmax(x):",
    "List five fruits:",
    "The largest planet in the solar system is",
    "Q: What is 12 times 12?\nA:",
    "In 1969, the first humans",
    "A haiku about autumn leaves:\n",
    "The quick brown fox",
    "Photosynthesis is the process by which plants",
]
# A long one so prefills are chunked across steps (budget 256 tokens per step).
LONG = " ".join(f"Item {i}: a note about topic number {i}." for i in range(20))
PROMPTS = [*TOPICS, LONG]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
SHARED_PREFIX = (
    "You are a meticulous assistant. Answer in one short sentence, avoid lists, and never "
    "repeat the question. Be precise with numbers and names. Question: "
)


def tokens_of(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def batch_tokens(smollm2_llm):
    return tokens_of(smollm2_llm.generate(PROMPTS, GREEDY, use_tqdm=False))


@pytest.fixture(scope="module")
def small_pool_llm():
    """Prefix caching off and a KV pool of 40 pages (one max_model_len sequence needs 32)."""
    page_bytes = 30 * 16 * 2 * 3 * 64 * 4  # layers * page * (K and V) * kv heads * dim * f32
    return LLM(
        "smollm2-135m-instruct",
        **ENGINE_KWARGS,
        enable_prefix_caching=False,
        kv_cache_memory=40 * page_bytes,
    )


def assert_no_compiles_and_pages_back(llm):
    m = llm.get_metrics()
    assert m["compiles_after_warmup"] == 0
    assert m["kv_pages_free"] == m["kv_pages_total"]
    assert m["num_running"] == m["num_waiting"] == 0


def test_batch_equals_each_prompt_alone(smollm2_llm, batch_tokens):
    assert len({len(smollm2_llm.get_tokenizer()(p)["input_ids"]) for p in PROMPTS}) > 8
    for prompt, expected in zip(PROMPTS, batch_tokens, strict=True):
        alone = tokens_of(smollm2_llm.generate(prompt, GREEDY, use_tqdm=False))[0]
        assert alone == expected, prompt
    assert_no_compiles_and_pages_back(smollm2_llm)


def test_greedy_batch_equals_transformers(smollm2_llm, smollm2_hf, batch_tokens):
    tok = smollm2_llm.get_tokenizer()
    for prompt, ours in list(zip(PROMPTS, batch_tokens, strict=True))[::4]:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            ref = smollm2_hf.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=16, do_sample=False,
            )[0, len(ids):].tolist()  # fmt: skip
        assert ours == ref, prompt


def test_prefix_cache_hits_and_equal_tokens_without_cache(smollm2_llm, small_pool_llm):
    questions = ("Who wrote Hamlet?", "What is 7 squared?", "Name the longest river.", "Kyoto?")
    prompts = [SHARED_PREFIX + q for q in questions]
    before = smollm2_llm.get_metrics()["prefix_cache_hits"]
    first = tokens_of(smollm2_llm.generate(prompts[:1], GREEDY, use_tqdm=False))
    cached = first + tokens_of(smollm2_llm.generate(prompts[1:], GREEDY, use_tqdm=False))
    hits = smollm2_llm.get_metrics()["prefix_cache_hits"] - before
    shared_pages = len(smollm2_llm.get_tokenizer()(SHARED_PREFIX)["input_ids"]) // 16
    assert hits >= 3 * 16 * shared_pages  # three later prompts reuse the shared full pages
    uncached = tokens_of(small_pool_llm.generate(prompts, GREEDY, use_tqdm=False))
    assert cached == uncached
    assert small_pool_llm.get_metrics()["prefix_cache_hits"] == 0
    assert_no_compiles_and_pages_back(smollm2_llm)


def test_small_pool_preempts_and_gives_equal_tokens(smollm2_llm, small_pool_llm):
    # 16 running sequences growing to ~4 pages each cannot all fit in 40 pages.
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    roomy = tokens_of(smollm2_llm.generate(PROMPTS, params, use_tqdm=False))
    before = small_pool_llm.get_metrics()["preemptions"]
    assert tokens_of(small_pool_llm.generate(PROMPTS, params, use_tqdm=False)) == roomy
    assert small_pool_llm.get_metrics()["preemptions"] > before
    assert smollm2_llm.get_metrics()["preemptions"] == 0
    assert_no_compiles_and_pages_back(small_pool_llm)


def test_seeded_sample_is_the_same_alone_and_in_a_busy_batch(smollm2_llm):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24)
    alone = tokens_of(smollm2_llm.generate(TOPICS[6], seeded, use_tqdm=False))[0]
    others = [
        SamplingParams(temperature=1.0, max_tokens=20),
        SamplingParams(temperature=0.0, max_tokens=8),
        SamplingParams(temperature=0.7, min_p=0.1, presence_penalty=1.0, max_tokens=30),
        SamplingParams(temperature=1.2, seed=7, repetition_penalty=1.3, max_tokens=12),
    ] * 3
    prompts = [*TOPICS[:6], TOPICS[6], *TOPICS[7:13]]
    params = [*others[:6], seeded, *others[6:]]
    busy = tokens_of(smollm2_llm.generate(prompts, params, use_tqdm=False))
    assert busy[6] == alone
    unseeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=24)
    assert tokens_of(smollm2_llm.generate(TOPICS[6], unseeded, use_tqdm=False))[0] != alone
    assert_no_compiles_and_pages_back(smollm2_llm)


def test_n_samples_share_the_prompt_and_differ(smollm2_llm):
    out = smollm2_llm.generate(
        TOPICS[9], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12), use_tqdm=False
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert_no_compiles_and_pages_back(smollm2_llm)


def test_stop_strings_and_min_tokens(smollm2_llm):
    prompt = TOPICS[3]  # "1, 2, 3, 4, 5," continues with " 6, 7, 8, ..."
    free = smollm2_llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]
    assert free.text.startswith(" 6, 7, 8")
    out = smollm2_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, stop=["8,"]),
                               use_tqdm=False)[0].outputs[0]  # fmt: skip
    assert (out.text, out.finish_reason, out.stop_reason) == (" 6, 7, ", "stop", "8,")
    out = smollm2_llm.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=16, stop=[" 7,", "8"],
                       include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]  # fmt: skip
    assert (out.text, out.stop_reason) == (" 6, 7,", " 7,")
    first = free.token_ids[0]
    out = smollm2_llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[first]),
        use_tqdm=False,
    )[0].outputs[0]  # fmt: skip
    assert (out.token_ids, out.finish_reason, out.stop_reason) == ([first], "stop", first)
    out = smollm2_llm.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[first], min_tokens=5),
        use_tqdm=False,
    )[0].outputs[0]  # fmt: skip
    # first token recurs in " 6, 7, 8, ..." (it is the space) only after min_tokens counts
    assert len(out.token_ids) >= 5 and out.token_ids[:5] == free.token_ids[:5]
    assert_no_compiles_and_pages_back(smollm2_llm)


def test_logprobs_equal_log_softmax_of_model_logits(smollm2_llm, smollm2_hf):
    prompt = TOPICS[0]
    out = smollm2_llm.generate(
        prompt,
        SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, prompt_logprobs=3),
        use_tqdm=False,
    )[0]
    comp = out.outputs[0]
    full = out.prompt_token_ids + comp.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(smollm2_hf(torch.tensor([full])).logits[0], -1).numpy()
    n = len(out.prompt_token_ids)
    for i, (token, position) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
        row = ref[n - 1 + i]
        assert position[token].logprob == pytest.approx(row[token], abs=1e-3)
        top5 = [t for t, lp in position.items() if lp.rank is not None]
        assert sorted(position[t].rank for t in top5) == [1, 2, 3, 4, 5]
        np.testing.assert_allclose([position[t].logprob for t in top5], row[top5], atol=1e-3)
        assert position[token].rank == 1  # greedy picks the most likely token
    assert comp.cumulative_logprob == pytest.approx(
        sum(p[t].logprob for t, p in zip(comp.token_ids, comp.logprobs, strict=True))
    )
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
    for pos in range(1, n):
        token = out.prompt_token_ids[pos]
        assert out.prompt_logprobs[pos][token].logprob == pytest.approx(
            ref[pos - 1, token], abs=1e-3
        )
    assert_no_compiles_and_pages_back(smollm2_llm)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("", None, "prompt is empty"),
        ({"prompt_token_ids": []}, None, "prompt is empty"),
        ("word " * 600, None, "max_model_len"),
        ({"prompt_token_ids": [1, 49152]}, None, "49152"),
        ({"prompt_token_ids": [1, -3]}, None, "-3"),
        ("hi", dict(temperature=-1.0), "temperature"),
        ("hi", dict(top_p=0.0), "top_p"),
        ("hi", dict(max_tokens=0), "max_tokens"),
        ("hi", dict(n=0), "n"),
        ("hi", dict(logprobs=21), "logprobs"),
        ("hi", dict(stop_token_ids=[10**6]), "stop_token_ids"),
        ("hi", dict(logit_bias={49152: 1.0}), "logit_bias"),
    ],
)
def test_bad_input_is_refused_and_serving_goes_on(smollm2_llm, batch_tokens, prompt, params,
                                                   message):  # fmt: skip
    with pytest.raises(ValueError, match=message):
        sp = SamplingParams(**params) if params else GREEDY
        smollm2_llm.generate([PROMPTS[0], prompt], sp, use_tqdm=False)
    assert tokens_of(smollm2_llm.generate(PROMPTS[0], GREEDY, use_tqdm=False))[0] == batch_tokens[0]
    assert_no_compiles_and_pages_back(smollm2_llm)


def test_chat_passes_tools_to_the_template_or_its_fallback(smollm2_llm):
    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": city}}]
    conversation = [{"role": "user", "content": "Weather in Paris?"}]
    params = SamplingParams(temperature=0, max_tokens=1)
    with_tools = smollm2_llm.chat(conversation, params, use_tqdm=False, tools=tools)[0]
    without = smollm2_llm.chat(conversation, params, use_tqdm=False)[0]
    # SmolLM2's template has no tools section: the fallback system preamble lists the tool.
    assert "<tools>" in with_tools.prompt and '"get_weather"' in with_tools.prompt
    assert "<tools>" not in without.prompt
    assert with_tools.prompt_token_ids[:2] == without.prompt_token_ids[:2]  # same template
