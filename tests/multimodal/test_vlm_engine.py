"""A tiny SmolVLM through `LLM`: greedy tokens equal transformers' with prompts chunked inside
their images, image and text prompts batched together, the encoder and prefix caches keyed by
image content, and no compile after warm-up whatever the image size."""

import io

import pytest
import torch
from conftest import image, image_processor

from tests.conftest import TEST_TOKEN_BUCKETS
from xlaserve import SamplingParams
from xlaserve.errors import InvalidRequestError

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
ARCH = "SmolVLMForConditionalGeneration"


@pytest.fixture(scope="module")
def tiny(tiny_llm, smolvlm_folder):
    return tiny_llm, smolvlm_folder[1]


def hf_greedy(hf_model, tokenizer, text, images, new_tokens=8):
    from transformers.models.idefics3.processing_idefics3 import Idefics3Processor

    proc = Idefics3Processor(image_processor(ARCH), tokenizer, image_seq_len=4)
    inputs = proc(text=[text], images=[images] if images else None, return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def encoded(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def prompt(text, *images):
    return {"prompt": text, "multi_modal_data": {"image": list(images)}} if images else text


PROMPTS = [
    ("A picture: <image> What is it?", [image(50, 70, 1)]),
    ("Two: <image> and <image>.", [image(64, 20, 2), image(30, 30, 3)]),
    ("Only words in this one, nothing else.", []),
]


def test_batch_of_image_and_text_prompts_equals_transformers_and_each_alone(tiny):
    llm, hf_model = tiny
    tok = llm.get_tokenizer()
    batch = llm.generate([prompt(t, *ims) for t, ims in PROMPTS], GREEDY, use_tqdm=False)
    for (text, images), out in zip(PROMPTS, batch, strict=True):
        expected = hf_greedy(hf_model, tok, text, images)
        assert list(out.outputs[0].token_ids) == expected, text
        alone = llm.generate(prompt(text, *images), GREEDY, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids


def test_chat_with_image_parts_equals_the_prompt_form(tiny):
    llm, _ = tiny
    img = image(40, 60, 7)
    messages = [{"role": "user", "content": [{"type": "text", "text": "See "},
                                             {"type": "image", "image": img}]}]  # fmt: skip
    chat = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    text = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "See "}, {"type": "image"}]}],
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    assert text.count("<image>") == 1
    plain = llm.generate(
        {"prompt": text, "multi_modal_data": {"image": img}}, GREEDY, use_tqdm=False
    )[0]
    assert chat.prompt_token_ids == plain.prompt_token_ids
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids


def test_encoder_and_prefix_caches_key_on_image_content(tiny):
    llm, _ = tiny
    vision = llm.engine.runner.vision
    text = "Caption the following image with care please: <image> Caption:"
    first, second = image(70, 50, 11), image(70, 50, 12)  # same size, other pixels
    a = llm.generate(prompt(text, first), GREEDY, use_tqdm=False)[0]
    misses = vision.misses
    again = llm.generate(prompt(text, first), GREEDY, use_tqdm=False)[0]
    other = llm.generate(prompt(text, second), GREEDY, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == a.outputs[0].token_ids
    page = llm.engine.page_size
    n = len(a.prompt_token_ids)
    # The same image: every full page is a prefix-cache hit (the image's pages included);
    # the encoder is not run again.
    assert again.num_cached_tokens == (n - 1) // page * page
    # Another image: only the pages before its first placeholder hit.
    first_image_token = a.prompt_token_ids.index(llm.get_tokenizer().convert_tokens_to_ids(
        "<image>"))  # fmt: skip
    assert other.num_cached_tokens == first_image_token // page * page
    assert other.num_cached_tokens < again.num_cached_tokens
    assert vision.misses == misses + 1  # only the new image was encoded
    assert other.prompt_token_ids == a.prompt_token_ids  # same layout, other pixels


def test_no_compile_after_warmup_across_image_sizes(tiny):
    llm, _ = tiny
    before = llm.engine.runner.stats().compiles_after_warmup
    sizes = [(8, 8), (33, 17), (64, 64), (100, 30), (15, 90)]
    outs = llm.generate([prompt("Look: <image>", image(w, h, i)) for i, (w, h) in
                         enumerate(sizes)], GREEDY, use_tqdm=False)  # fmt: skip
    assert len({len(o.prompt_token_ids) for o in outs}) >= 3  # 1, 3 and 5 tiles
    assert llm.engine.runner.stats().compiles_after_warmup == before == 0


@pytest.mark.parametrize(
    "bad, match",
    [
        (prompt("two <image> <image>", image(9, 9, 0)), "2 <image> placeholder"),
        (prompt("none here", image(9, 9, 0)), "0 <image> placeholder"),
        (prompt("three <image><image><image>", *[image(9, 9, i) for i in range(3)]),
         "3 images in one prompt; the limit is 2"),
        (prompt("<image>", b"\x89PNG\r\n\x1a\n-truncated"), "image 0 cannot be decoded"),
        (prompt("<image>", b"GIF89a"), "image 0 cannot be decoded"),
        (prompt("<image>", encoded(image(9, 9, 0), "TIFF")), "format TIFF is not supported"),
        (prompt("<image>", image(1001, 1000, 0)), "1001000 pixels"),
        (prompt("<image>", "not an image"), "image 0 must be a PIL image"),
        ({"prompt_token_ids": [1, 2], "multi_modal_data": {"image": []}}, "need a text prompt"),
    ],
)  # fmt: skip
def test_bad_images_are_refused_and_the_engine_keeps_serving(tiny, bad, match):
    llm, _ = tiny
    with pytest.raises(InvalidRequestError, match=match) as e:
        llm.generate(bad, GREEDY, use_tqdm=False)
    assert e.value.param == "multi_modal_data"
    out = llm.generate(prompt("ok <image>", image(20, 20, 5)), GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8


def test_bucket_sweep_lists_the_vision_tile_buckets(tiny):
    from xlaserve.bench.buckets import vision_rows

    llm, _ = tiny
    vision = llm.engine.runner.vision
    # Tiles of the largest image: a 2 x 2 split plus the global tile -> buckets up to 8.
    assert vision.buckets == (1, 2, 4, 8)
    rows = vision_rows(vision, repeats=1)
    assert [(r["kind"], r["bucket"]) for r in rows] == [("vision tiles", b) for b in (1, 2, 4, 8)]
    assert all(r["step_s"] > 0 and r["compile_s"] > 0 for r in rows)


@pytest.mark.slow
def test_ngram_speculative_decoding_with_images_keeps_greedy_tokens(smolvlm_folder):
    from xlaserve import LLM

    folder, hf_model = smolvlm_folder
    llm = LLM(str(folder), dtype="float32", max_model_len=256, max_num_seqs=4,
              max_num_batched_tokens=32, compilation_cache_dir=None,
              token_buckets=TEST_TOKEN_BUCKETS,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3})  # fmt: skip
    params = SamplingParams(max_tokens=16, temperature=0.0)
    outs = llm.generate([prompt(t, *ims) for t, ims in PROMPTS], params, use_tqdm=False)
    for (text, images), out in zip(PROMPTS, outs, strict=True):
        expected = hf_greedy(hf_model, llm.get_tokenizer(), text, images, new_tokens=16)
        assert list(out.outputs[0].token_ids) == expected, text
    assert llm.engine.runner.stats().compiles_after_warmup == 0
