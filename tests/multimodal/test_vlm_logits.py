"""Tiny random-weight SmolVLM and Idefics3 against transformers' classes: logits of the prefill
and of 16 decode steps within float32 tolerance, with 1 image, 2 images of different sizes
(the larger split into 2 x 2 tiles + the global one), and text only."""

import numpy as np
import pytest
import torch
from conftest import TILE, image, image_processor, save_vlm, tiny_vlm

from xlaserve.checkpoints.loader import load_model
from xlaserve.engine.input_batch import Chunk
from xlaserve.models.generate import PagedModelRunner
from xlaserve.multimodal.build import build_multimodal
from xlaserve.multimodal.placement import image_placements

DECODE_STEPS = 16
CASES = {
    "one image": ("Describe <image> briefly.", [(50, 70)]),
    "two images": ("First <image> then <image>: compare.", [(2 * TILE, 20), (50, 70)]),
    "text only": ("Just some text, no pictures at all.", []),
}


class Args:  # the engine options build_multimodal reads
    limit_mm_per_prompt = 4
    max_image_pixels = 10**6


@pytest.fixture(scope="module", params=["SmolVLMForConditionalGeneration",
                                        "Idefics3ForConditionalGeneration"])  # fmt: skip
def vlm(request, tmp_path_factory, vlm_tokenizer):
    arch = request.param
    folder = tmp_path_factory.mktemp(arch)
    hf_model = tiny_vlm(arch, vlm_tokenizer, seed=1)
    save_vlm(folder, hf_model, vlm_tokenizer, arch)
    loaded = load_model(str(folder), dtype="float32")
    encoder, processor = build_multimodal(loaded.vision, loaded.tokenizer, loaded.dtype, Args)
    return arch, hf_model, loaded, encoder, processor


def reference(hf_model, processor, arch, text, images, tokens_per_tile):
    """transformers' processor and model: (input ids, prefill logits, greedy tokens, logits of
    each decode step)."""
    from transformers.models.idefics3.processing_idefics3 import Idefics3Processor

    ref_proc = Idefics3Processor(image_processor(arch), processor.processor.tokenizer,
                                 image_seq_len=tokens_per_tile)  # fmt: skip
    ref_in = ref_proc(text=[text], images=[images] if images else None, return_tensors="pt")
    with torch.no_grad():
        gen = hf_model.generate(**ref_in, max_new_tokens=DECODE_STEPS, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)  # fmt: skip
        prefill = hf_model(**ref_in).logits[0].numpy()
    ids = ref_in["input_ids"][0].tolist()
    tiles = 0 if not images else ref_in["pixel_values"].shape[1]
    return ids, tiles, prefill, gen.sequences[0, len(ids) :].tolist(), gen.logits


def smolvlm_expansion(processor, text, images, encoder) -> list[int]:
    """Token ids from transformers' SmolVLM prompt expansion (its processor class needs a
    video processor, hence torchvision; its expansion function does not)."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    if images:
        info = processor.image_processor(images=[images], return_row_col_info=True)
        pieces = text.split("<image>")
        text = pieces[0]
        for rows, cols, piece in zip(info["rows"][0], info["cols"][0], pieces[1:], strict=True):
            text += get_image_prompt_string(
                rows, cols, encoder.config.tokens_per_tile, "<fake_token_around_image>",
                "<image>", "<global-img>",
            ) + piece  # fmt: skip
    return processor.processor.tokenizer(text)["input_ids"]


def test_logits_match_transformers(vlm):
    """All three prompts in one ragged batch (the image rows of each land in its own rows)."""
    arch, hf_model, loaded, encoder, processor = vlm
    prompts, refs = [], []
    for text, sizes in CASES.values():
        images = [image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
        ids, items = processor.process(text, images, add_special_tokens=True)
        # Resized to a longest edge of 2 tiles: 64x20 -> 1 x 2 tiles + the global one;
        # 50x70 -> 2 x 2 + 1.
        assert [it.num_tiles for it in items] == [3 if w == 2 * TILE else 5 for w, _ in sizes]
        ref = reference(hf_model, processor, arch, text, images, encoder.config.tokens_per_tile)
        assert ref[0] == ids  # placeholder expansion exactly as the processor's
        assert sum(it.num_tiles for it in items) == ref[1]
        if arch == "SmolVLMForConditionalGeneration":  # and as SmolVLM's own expansion
            assert smolvlm_expansion(processor, text, images, encoder) == ids
        prompts.append((ids, items))
        refs.append(ref)

    max_len = max(len(ids) for ids, _ in prompts) + DECODE_STEPS + 1
    runner = PagedModelRunner(loaded.model, num_seqs=len(prompts), max_len=max_len)
    chunks = [Chunk(s, ids, 0, [], True) for s, (ids, _) in enumerate(prompts)]
    placements = image_placements(chunks, lambda s: prompts[s][1])
    assert len(placements) == 3  # one image, two images, none
    total = sum(len(ids) for ids, _ in prompts)
    out = runner.step([ids for ids, _ in prompts], all_logits=True,
                      images=encoder.merge_inputs(placements, total))  # fmt: skip
    # float32 on both sides; these random weights give logits ~1 that agree to ~1e-6.
    offset = 0
    for (ids, _), ref in zip(prompts, refs, strict=True):
        np.testing.assert_allclose(out.all_logits[offset : offset + len(ids)], ref[2],
                                   atol=2e-4, rtol=0)  # fmt: skip
        offset += len(ids)
    for step in range(DECODE_STEPS):
        for s, ref in enumerate(refs):
            expected = ref[4][step][0].numpy()
            np.testing.assert_allclose(out.logits[s], expected, atol=2e-4, rtol=0,
                                       err_msg=f"sequence {s}, decode step {step}")  # fmt: skip
        if step + 1 < DECODE_STEPS:
            out = runner.step([[ref[3][step]] for ref in refs])
