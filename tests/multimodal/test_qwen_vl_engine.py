"""A tiny Qwen2.5-VL through `LLM`: greedy tokens equal transformers' generate with M-RoPE
positions carried through chunked prefill and decode (the rope delta), prompts batched
together, the prefix cache keyed by image content, no compile after warm-up across image
sizes, chat with an image part, and the openai client with a data URL."""

import pytest
import torch
from qwen_tiny import (
    PLACEHOLDER,
    image,
    qwen_tokenizer,
    reference_inputs,
    save_qwen_vl,
    tiny_qwen_vl,
)

from tests.conftest import TEST_TOKEN_BUCKETS
from xlaserve import SamplingParams

NEW_TOKENS = 16
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
PROMPTS = [
    (f"A picture: {PLACEHOLDER} What is it?", [(90, 130)]),
    (f"Two: {PLACEHOLDER} and {PLACEHOLDER}.", [(200, 60), (64, 64)]),
    ("Only words in this one, nothing else.", []),
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A 16-token budget chunks every image prompt, most chunks starting inside an image."""
    from xlaserve import LLM

    tokenizer = qwen_tokenizer()
    folder = tmp_path_factory.mktemp("qwen-vl-engine")
    hf_model = tiny_qwen_vl(tokenizer, seed=2)
    save_qwen_vl(folder, hf_model, tokenizer)
    llm = LLM(str(folder), dtype="float32", max_model_len=256, max_num_seqs=4,
              max_num_batched_tokens=16, compilation_cache_dir=None, limit_mm_per_prompt=2,
              max_image_pixels=10**6, token_buckets=TEST_TOKEN_BUCKETS)  # fmt: skip
    return llm, hf_model, tokenizer


def hf_greedy(hf_model, tokenizer, text, images):
    inputs = reference_inputs(tokenizer, text, images)
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def prompt(text, *images):
    return {"prompt": text, "multi_modal_data": {"image": list(images)}} if images else text


def test_greedy_tokens_equal_transformers_batched_and_alone(qwen):
    llm, hf_model, tokenizer = qwen
    cases = [(t, [image(w, h, i) for i, (w, h) in enumerate(sizes)]) for t, sizes in PROMPTS]
    batch = llm.generate([prompt(t, *ims) for t, ims in cases], GREEDY, use_tqdm=False)
    for (text, images), out in zip(cases, batch, strict=True):
        expected = hf_greedy(hf_model, tokenizer, text, images)
        assert len(expected) == NEW_TOKENS
        assert list(out.outputs[0].token_ids) == expected, text
        alone = llm.generate(prompt(text, *images), GREEDY, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
    # Chunked: every image prompt is longer than a step's 16-token budget.
    assert all(len(o.prompt_token_ids) > 16 for o in batch[:2])


def test_prefix_cache_hits_and_misses_by_image_content(qwen):
    llm, _, tokenizer = qwen
    vision = llm.engine.runner.vision
    text = f"Caption the following image with care please: {PLACEHOLDER} Caption:"
    first, second = image(84, 84, 11), image(84, 84, 12)  # same size, other pixels
    a = llm.generate(prompt(text, first), GREEDY, use_tqdm=False)[0]
    misses = vision.misses
    again = llm.generate(prompt(text, first), GREEDY, use_tqdm=False)[0]
    other = llm.generate(prompt(text, second), GREEDY, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == a.outputs[0].token_ids
    page, n = llm.engine.page_size, len(a.prompt_token_ids)
    assert again.num_cached_tokens == (n - 1) // page * page
    first_image_token = a.prompt_token_ids.index(tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    assert other.num_cached_tokens == first_image_token // page * page
    assert other.num_cached_tokens < again.num_cached_tokens
    assert vision.misses == misses + 1  # only the new image was encoded
    assert other.prompt_token_ids == a.prompt_token_ids


def test_no_compile_after_warmup_across_image_sizes(qwen):
    llm, _, _ = qwen
    vision = llm.engine.runner.vision
    # Patch-count buckets from the processor's pixel range (16 .. 256 patches).
    assert vision.buckets == (16, 32, 64, 128, 256)
    # 16, 32, 64, 96 and 256 patches: one image in each bucket.
    sizes = [(28, 28), (56, 112), (112, 112), (168, 112), (300, 300)]
    outs = llm.generate([prompt(f"Look: {PLACEHOLDER}", image(w, h, i)) for i, (w, h) in
                         enumerate(sizes)], GREEDY, use_tqdm=False)  # fmt: skip
    assert len({len(o.prompt_token_ids) for o in outs}) == 5
    assert llm.engine.runner.stats().compiles_after_warmup == 0


def test_chat_with_an_image_part_equals_the_prompt_form(qwen):
    llm, _, tokenizer = qwen
    img = image(60, 40, 7)
    messages = [{"role": "user", "content": [{"type": "text", "text": "See "},
                                             {"type": "image", "image": img}]}]  # fmt: skip
    chat = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "See "}, {"type": "image"}]}],
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    assert text.count(PLACEHOLDER) == 1
    plain = llm.generate(prompt(text, img), GREEDY, use_tqdm=False)[0]
    assert chat.prompt_token_ids == plain.prompt_token_ids
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids


def test_bucket_sweep_lists_the_patch_buckets(qwen):
    from xlaserve.bench.buckets import vision_rows

    llm, _, _ = qwen
    rows = vision_rows(llm.engine.runner.vision, repeats=1)
    assert [(r["kind"], r["bucket"]) for r in rows] == [
        ("vision patches", b) for b in (16, 32, 64, 128, 256)
    ]
    # A bucket of P patches makes P / 4 features (the 2x2 merger).
    assert all(r["step_s"] > 0 and r["tokens_per_s"] * r["step_s"] == pytest.approx(
        r["bucket"] / 4) for r in rows)  # fmt: skip


@pytest.mark.parametrize(
    "bad, match",
    [
        (prompt(f"two {PLACEHOLDER} {PLACEHOLDER}", image(30, 30, 0)),
         r"2 <\|image_pad\|> placeholder\(s\) for 1 image"),
        (prompt("none here", image(30, 30, 0)), r"0 <\|image_pad\|> placeholder"),
        (prompt(PLACEHOLDER * 3, *[image(30, 30, i) for i in range(3)]),
         "3 images in one prompt; the limit is 2"),
        (prompt(PLACEHOLDER, b"\x89PNG\r\n\x1a\n-truncated"), "image 0 cannot be decoded"),
        (prompt(PLACEHOLDER, image(1001, 1000, 0)), "1001000 pixels"),
    ],
)  # fmt: skip
def test_bad_images_are_refused_and_the_engine_keeps_serving(qwen, bad, match):
    from xlaserve.errors import InvalidRequestError

    llm, _, _ = qwen
    with pytest.raises(InvalidRequestError, match=match) as e:
        llm.generate(bad, GREEDY, use_tqdm=False)
    assert e.value.param == "multi_modal_data"
    out = llm.generate(prompt(PLACEHOLDER, image(40, 40, 5)), GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == NEW_TOKENS


@pytest.mark.slow
def test_ngram_speculative_decoding_keeps_greedy_tokens(qwen, tmp_path):
    """Drafts continue the M-RoPE positions past the prompt (position + the image shift)."""
    from xlaserve import LLM

    llm, hf_model, tokenizer = qwen
    folder = tmp_path / "qwen-vl"
    save_qwen_vl(folder, hf_model, tokenizer)
    spec = LLM(str(folder), dtype="float32", max_model_len=256, max_num_seqs=4,
               max_num_batched_tokens=32, compilation_cache_dir=None,
               token_buckets=TEST_TOKEN_BUCKETS,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3})  # fmt: skip
    cases = [(t, [image(w, h, i) for i, (w, h) in enumerate(sizes)]) for t, sizes in PROMPTS]
    outs = spec.generate([prompt(t, *ims) for t, ims in cases], GREEDY, use_tqdm=False)
    for (text, images), out in zip(cases, outs, strict=True):
        assert list(out.outputs[0].token_ids) == hf_greedy(hf_model, tokenizer, text, images)
    assert spec.engine.runner.stats().compiles_after_warmup == 0


def test_openai_chat_with_a_data_url_gives_the_offline_tokens(qwen):
    """Last in this module: the server's thread owns the engine from here on."""
    import base64
    import io

    import openai

    from xlaserve.engine.async_engine import AsyncEngine
    from xlaserve.serving.server import ServerConfig, ServerThread

    llm, _, _ = qwen
    img = image(70, 50, 31)
    question = {"type": "text", "text": "What is shown?"}
    offline = [{"role": "user", "content": [{"type": "image", "image": img}, question]}]
    expected = llm.chat(offline, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # lossless: the server decodes the same pixels
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    server = ServerThread(AsyncEngine(llm.engine), ServerConfig(grpc_port=0, http_port=0))
    server.start()
    try:
        client = openai.OpenAI(base_url=server.endpoints.http_url + "/v1", api_key="-",
                               max_retries=0)  # fmt: skip
        response = client.chat.completions.create(
            model=str(llm.engine.model_name), max_tokens=NEW_TOKENS, temperature=0,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, question]}],
            extra_body={"return_tokens_as_token_ids": True}, logprobs=True,
        )  # fmt: skip
        served = [int(t.token.split(":")[1]) for t in response.choices[0].logprobs.content]
        assert served == list(expected)
    finally:
        assert server.stop() == 0
