"""Tiny random-weight Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration:
logits of the prefill and of 16 decode steps within float32 tolerance (M-RoPE positions,
windowed + full attention vision tower, 2x2 merger), with 1 image, 2 images of different
sizes, and text only, all in one ragged batch over the paged cache."""

import numpy as np
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

from xlaserve.checkpoints.loader import load_model
from xlaserve.engine.input_batch import Chunk
from xlaserve.models.generate import PagedModelRunner
from xlaserve.multimodal.build import build_multimodal
from xlaserve.multimodal.mrope import mrope_positions
from xlaserve.multimodal.placement import image_placements

DECODE_STEPS = 16
CASES = {
    "one image": (f"Describe {PLACEHOLDER} briefly.", [(90, 130)]),
    "two images": (f"First {PLACEHOLDER} then {PLACEHOLDER}: compare.", [(200, 60), (64, 64)]),
    "text only": ("Just some text, no pictures at all.", []),
}


class Args:  # the engine options build_multimodal reads
    limit_mm_per_prompt = 4
    max_image_pixels = 10**6


@pytest.fixture(scope="module")
def qwen_vl(tmp_path_factory):
    tokenizer = qwen_tokenizer()
    folder = tmp_path_factory.mktemp("qwen-vl")
    hf_model = tiny_qwen_vl(tokenizer, seed=1)
    save_qwen_vl(folder, hf_model, tokenizer)
    loaded = load_model(str(folder), dtype="float32")
    encoder, processor = build_multimodal(loaded.vision, loaded.tokenizer, loaded.dtype, Args)
    return tokenizer, hf_model, loaded, encoder, processor


def test_logits_match_transformers(qwen_vl):
    tokenizer, hf_model, loaded, encoder, processor = qwen_vl
    assert loaded.config.mrope_section == (2, 3, 3)
    prompts, refs = [], []
    for text, sizes in CASES.values():
        images = [image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
        ids, items = processor.process(text, images, add_special_tokens=True)
        ref_in = reference_inputs(tokenizer, text, images)
        assert ids == ref_in["input_ids"][0].tolist()  # placeholder expansion as transformers'
        with torch.no_grad():
            gen = hf_model.generate(**ref_in, max_new_tokens=DECODE_STEPS, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)  # fmt: skip
            prefill = hf_model(**ref_in).logits[0].numpy()
            if images:  # our host M-RoPE positions are transformers' get_rope_index
                want, delta = hf_model.model.get_rope_index(
                    ref_in["input_ids"], ref_in["mm_token_type_ids"], ref_in["image_grid_thw"]
                )
                np.testing.assert_array_equal(mrope_positions(items, 0, len(ids)), want[:, 0])
                last = mrope_positions(items, len(ids), 1)
                assert (last == len(ids) + int(delta[0, 0])).all()  # decode: position + delta
        prompts.append((ids, items))
        refs.append((prefill, gen.sequences[0, len(ids) :].tolist(), gen.logits))
    assert [len(items) for _, items in prompts] == [1, 2, 0]
    assert len({it.grid for _, items in prompts for it in items}) == 3  # three image sizes

    max_len = max(len(ids) for ids, _ in prompts) + DECODE_STEPS + 1
    runner = PagedModelRunner(loaded.model, num_seqs=len(prompts), max_len=max_len)
    chunks = [Chunk(s, ids, 0, [], True) for s, (ids, _) in enumerate(prompts)]
    placements = image_placements(chunks, lambda s: prompts[s][1])
    total = sum(len(ids) for ids, _ in prompts)
    positions = np.concatenate([mrope_positions(items, 0, len(ids)) for ids, items in prompts], 1)
    out = runner.step([ids for ids, _ in prompts], all_logits=True, positions=positions,
                      images=encoder.merge_inputs(placements, total))  # fmt: skip
    offset = 0
    for (ids, _), ref in zip(prompts, refs, strict=True):
        np.testing.assert_allclose(out.all_logits[offset : offset + len(ids)], ref[0],
                                   atol=2e-4, rtol=0)  # fmt: skip
        offset += len(ids)
    for step in range(DECODE_STEPS):
        for s, ref in enumerate(refs):
            np.testing.assert_allclose(
                out.logits[s],
                ref[2][step][0].numpy(),
                atol=2e-4,
                rtol=0,
                err_msg=f"sequence {s}, decode step {step}",
            )
        if step + 1 < DECODE_STEPS:
            feed = [[ref[1][step]] for ref in refs]
            pos = np.concatenate([mrope_positions(items, len(ids) + step, 1)
                                  for ids, items in prompts], 1)  # fmt: skip
            out = runner.step(feed, positions=pos)
