"""SmolVLM built from a small vision config, the real SmolLM2-135M text weights (the bundled
GGUF, through transformers) and a seeded vision tower: greedy tokens equal transformers'."""

import pytest
import torch
from conftest import image, save_vlm, tiny_vlm

from tests.conftest import TEST_TOKEN_BUCKETS
from xlaserve import LLM, SamplingParams

ARCH = "SmolVLMForConditionalGeneration"
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smolvlm_real(tmp_path_factory, smollm2_hf, vlm_tokenizer):
    text = {**smollm2_hf.config.to_dict(), "vocab_size": len(vlm_tokenizer)}
    text.pop("architectures", None)
    hf_model = tiny_vlm(ARCH, vlm_tokenizer, seed=3, text_config=text)
    state = smollm2_hf.model.state_dict()
    embed = state["embed_tokens.weight"]  # [49152, 576]: the image tokens get new rows
    extra = torch.randn(len(vlm_tokenizer) - embed.shape[0], embed.shape[1],
                        generator=torch.Generator().manual_seed(4)) * 0.02  # fmt: skip
    state["embed_tokens.weight"] = torch.cat([embed, extra])
    hf_model.model.text_model.load_state_dict(state)
    hf_model.tie_weights()
    assert (
        hf_model.lm_head.weight.data_ptr()
        == hf_model.model.text_model.embed_tokens.weight.data_ptr()
    )
    folder = tmp_path_factory.mktemp("smolvlm-smollm2")
    save_vlm(folder, hf_model, vlm_tokenizer, ARCH)
    return folder, hf_model


@pytest.mark.slow
def test_greedy_tokens_equal_transformers(smolvlm_real, vlm_tokenizer):
    from test_vlm_engine import hf_greedy

    folder, hf_model = smolvlm_real
    llm = LLM(str(folder), dtype="float32", max_model_len=512, max_num_seqs=4,
              max_num_batched_tokens=64, compilation_cache_dir=None,
              token_buckets=TEST_TOKEN_BUCKETS)  # fmt: skip
    chat = vlm_tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in "
                                      "this picture?"}]}],
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    cases = [
        (chat, [image(50, 70, 21)]),
        ("The capital of France is", []),
        ("<image> and <image> show two kinds of", [image(64, 20, 22), image(30, 30, 23)]),
    ]
    prompts = [{"prompt": t, "multi_modal_data": {"image": ims}} if ims else t for t, ims in cases]
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0),
                        use_tqdm=False)  # fmt: skip
    assert sum(len(o.outputs[0].token_ids) for o in outs) > 2 * NEW_TOKENS  # not stopped at once
    for (text, images), out in zip(cases, outs, strict=True):
        expected = hf_greedy(hf_model, vlm_tokenizer, text, images, NEW_TOKENS)
        assert list(out.outputs[0].token_ids) == expected, text
