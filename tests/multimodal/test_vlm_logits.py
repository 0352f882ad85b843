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


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(vlm, case):
    arch, hf_model, loaded, encoder, processor = vlm
    text, sizes = CASES[case]
    images = [image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    ids, items = processor.process(text, images, add_special_tokens=True)
    # Resized to a longest edge of 2 tiles: 64x20 -> 1 x 2 tiles + the global one; 50x70 ->
    # 2 x 2 + 1.
    assert [it.num_tiles for it in items] == [3 if w == 2 * TILE else 5 for w, h in sizes]
    # The reference: transformers' processor and model on the same prompt.
    from transformers.models.idefics3.processing_idefics3 import Idefics3Processor

    ref_proc = Idefics3Processor(image_processor(arch), processor.processor.tokenizer,
                                 image_seq_len=encoder.config.tokens_per_tile)  # fmt: skip
    ref_in = ref_proc(text=[text], images=[images] if images else None, return_tensors="pt")
    assert ref_in["input_ids"][0].tolist() == ids  # placeholder expansion as the processor's
    if images:
        assert sum(it.num_tiles for it in items) == ref_in["pixel_values"].shape[1]
    with torch.no_grad():
        gen = hf_model.generate(**ref_in, max_new_tokens=DECODE_STEPS, do_sample=False,
                                output_logits=True, return_dict_in_generate=True)  # fmt: skip
        ref_prefill = hf_model(**ref_in).logits[0].numpy()
    ref_tokens = gen.sequences[0, len(ids) :].tolist()
    ref_decode = [step[0].numpy() for step in gen.logits]

    runner = PagedModelRunner(loaded.model, num_seqs=1, max_len=len(ids) + DECODE_STEPS + 1)
    chunk = Chunk(0, ids, 0, [], True)
    placements = image_placements([chunk], lambda _: items)
    merged = encoder.merge_inputs(placements, len(ids)) if items else None
    out = runner.step([ids], all_logits=True, images=merged)
    # float32 on both sides; logits of these random weights are ~1, differences ~1e-6.
    np.testing.assert_allclose(out.all_logits, ref_prefill, atol=2e-4, rtol=0)
    np.testing.assert_allclose(out.logits[0], ref_decode[0], atol=2e-4, rtol=0)
    for step in range(1, DECODE_STEPS):
        out = runner.step([[ref_tokens[step - 1]]])
        np.testing.assert_allclose(out.logits[0], ref_decode[step], atol=2e-4, rtol=0)
    assert len(ref_decode) == DECODE_STEPS
