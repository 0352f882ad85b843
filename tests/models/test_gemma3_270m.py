"""Gemma 3 270M (real weights, the bundled Q4_K_M GGUF): greedy tokens equal transformers'."""

import pytest
import torch

from xlaserve.models.generate import greedy_generate

# Eight prompts of 32+ tokens (checked below), of different lengths so the batch is ragged.
PROMPTS = [
    "The history of the Roman Empire spans many centuries, beginning with the founding of the "
    "city and ending with the fall of Constantinople. Historians often divide it into",
    "def merge_sort(items):\n    if len(items) <= 1:\n        return items\n    middle = "
    "len(items) // 2\n    left = merge_sort(items[:middle])\n",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight "
    "to synthesize foods from carbon dioxide and water, releasing oxygen as a by-product. "
    "The main steps of the process are",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who had never left his workshop. One winter morning",
    "1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987,",
    "Dear hiring manager, I am writing to apply for the position of senior data analyst at "
    "your company, which I saw advertised last week. Over the past five years I have worked on",
    "Q: What is the boiling point of water at sea level in degrees Celsius?\nA: 100 degrees.\n"
    "Q: What is the freezing point of water in degrees Fahrenheit?\nA:",
    "The three primary colors of light are red, green and blue. When they are mixed together "
    "in equal amounts they produce white light, while mixing paints of the same colours gives "
    "a very different result, because",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gemma3():
    from xlaserve.checkpoints.loader import load_model

    return load_model("gemma-3-270m", dtype="float32", layer_layout="per_layer")


@pytest.fixture(scope="module")
def gemma3_hf():
    from transformers import AutoModelForCausalLM

    from xlaserve.checkpoints.presets import resolve_bundled

    path = resolve_bundled("gemma-3-270m")
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def hf_greedy(hf_model, ids: list[int], eos: tuple[int, ...]) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=list(eos),
        )
    return out[0, len(ids) :].tolist()


def test_chat_template_renders_gemma_turns(gemma3):
    text = gemma3.tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a colour."},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
    )
    # Chat replies stop at <end_of_turn> as well as <eos>.
    assert gemma3.config.eos_token_ids == (
        1,
        gemma3.tokenizer.convert_tokens_to_ids("<end_of_turn>"),
    )


@pytest.mark.slow
def test_greedy_tokens_equal_transformers(gemma3, gemma3_hf):
    tok = gemma3.tokenizer
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Write one sentence about the sea and the sky at dawn."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    prompts.append(tok(chat, add_special_tokens=False)["input_ids"])
    assert all(len(p) >= 32 for p in prompts[:8]), [len(p) for p in prompts]
    assert len({len(p) for p in prompts}) > 4  # genuinely ragged
    eos = gemma3.config.eos_token_ids
    ours = greedy_generate(gemma3.model, prompts, NEW_TOKENS, stop_token_ids=eos)
    assert sum(len(o) for o in ours) > 6 * NEW_TOKENS  # most run the full length
    for ids, got in zip(prompts, ours, strict=True):
        assert got == hf_greedy(gemma3_hf, ids, eos), tok.decode(ids)


@pytest.mark.slow
def test_packed_gguf_blocks_give_the_dequantized_models_greedy_tokens():
    # quantization="gguf" keeps the Q4_K_M file's blocks packed where every layer shares the
    # type (q, k, gate, up: Q5_0, as 640 is no multiple of 256; o: Q4_K) and its Q8_0 head;
    # v (Q8_0 / Q5_0) and down (Q6_K / Q4_K) mix types over the layers and are dequantized.
    # The product equals the dequantized bfloat16 model's up to float32 summation order, so
    # the greedy tokens are the same.
    from xlaserve.checkpoints.loader import load_model

    plain = load_model("gemma-3-270m", dtype="bfloat16")
    packed = load_model("gemma-3-270m", dtype="bfloat16", with_tokenizer=False,
                        quantization="gguf").model  # fmt: skip
    kept = dict(packed.quant.gguf_types)
    assert set(kept) == {"wq", "wk", "wo", "w_gate", "w_up"}
    assert all(getattr(packed.layers, name)[...].dtype.name == "uint8" for name in kept)
    prompts = [plain.tokenizer(p)["input_ids"] for p in PROMPTS[:4]]
    want = greedy_generate(plain.model, prompts, 8)
    assert greedy_generate(packed, prompts, 8) == want
