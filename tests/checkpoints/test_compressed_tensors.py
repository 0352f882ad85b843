"""Pre-quantized compressed-tensors checkpoints (xlaserve/checkpoints/compressed_tensors.py),
written by the compressed-tensors package from a tiny random Llama: the stored values and
scales load as they are, run as xlaserve's own modes, and match the package's dequantized
model; what is not served is refused naming the field."""

import json

import numpy as np
import pytest
import torch

from tests.checkpoints.compressed_tensors_writer import dense_model, write_checkpoint
from xlaserve import LLM, SamplingParams
from xlaserve.checkpoints.loader import load_model
from xlaserve.models.generate import PagedModelRunner, greedy_generate

# scheme -> (the mode it runs as, its format, the stored values' dtype)
SERVED = {
    "W8A8": ("w8a8", "int-quantized", "int8"),
    "W8A16_CHANNEL": ("int8", "pack-quantized", "int8"),
    "FP8_DYNAMIC": ("fp8", "float-quantized", "float8_e4m3fn"),
    "FP8": ("fp8", "float-quantized", "float8_e4m3fn"),
}
TOKENS = [5, 77, 3, 200, 41, 9, 128, 64, 250, 17, 33, 1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed_tensors")
    folders = {}
    for scheme in (*SERVED, "W4A16"):
        folders[scheme] = root / scheme
        write_checkpoint(folders[scheme], scheme)
    return folders


def logits_of(model) -> np.ndarray:
    runner = PagedModelRunner(model, num_seqs=1, max_len=len(TOKENS))
    return runner.step([TOKENS], all_logits=True).all_logits


@pytest.mark.parametrize("scheme", SERVED)
def test_stored_weights_load_as_they_are(checkpoints, scheme):
    method, fmt, dtype = SERVED[scheme]
    config = json.loads((checkpoints[scheme] / "config.json").read_text())
    assert config["quantization_config"]["format"] == fmt
    loaded = load_model(str(checkpoints[scheme]), dtype="float32", with_tokenizer=False)
    model = loaded.model
    assert model.quant.method == method
    reference = dense_model(checkpoints[scheme]).state_dict()
    for name, hf in (("wq", "self_attn.q_proj"), ("w_down", "mlp.down_proj")):
        values = np.asarray(getattr(model.layers, name)[...])  # [L, in, out]
        scale = np.asarray(getattr(model.layers, name + "_scale")[...])  # [L, out]
        assert values.dtype.name == dtype
        for layer in range(2):
            # The package dequantizes in bfloat16: values x scale, rounded once.
            ours = torch.from_numpy(values[layer].astype(np.float32).T * scale[layer][:, None])
            want = reference[f"model.layers.{layer}.{hf}.weight"]
            assert torch.equal(ours.to(torch.bfloat16), want)
    # The embedding table and the LM head stay as stored (unquantized).
    assert model.embed_scale is None and model.lm_head_scale is None
    np.testing.assert_array_equal(
        np.asarray(model.lm_head[...]).T, reference["lm_head.weight"].float().numpy()
    )


@pytest.mark.parametrize("scheme", SERVED)
def test_logits_match_the_packages_dequantized_model(checkpoints, scheme):
    loaded = load_model(str(checkpoints[scheme]), dtype="float32", with_tokenizer=False)
    ours = logits_of(loaded.model)
    with torch.no_grad():
        dense = dense_model(checkpoints[scheme]).float()
        want = dense(torch.tensor([TOKENS])).logits[0].numpy()
    # Weight-only modes differ from the reference only by its bfloat16 rounding of each
    # dequantized weight (|logits| ~ 0.3 here); w8a8 adds int8 activations (one scale per token).
    tol = 0.05 if SERVED[scheme][0] == "w8a8" else 5e-3
    np.testing.assert_allclose(ours, want, atol=tol)
    assert (ours.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_an_engine_serves_the_checkpoint_without_a_quantization_option(checkpoints):
    # The engine (CPU kernels, per-layer layout) and the plain model give the same greedy
    # tokens from the same stored weights.
    folder = str(checkpoints["W8A8"])
    llm = LLM(model=folder, dtype="float32", max_model_len=64, max_num_seqs=2)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": TOKENS}, params)[0].outputs[0].token_ids
    model = load_model(folder, dtype="float32", with_tokenizer=False).model
    assert list(out) == greedy_generate(model, [TOKENS], 6)[0]


def test_a_conflicting_quantization_option_is_refused(checkpoints):
    with pytest.raises(ValueError, match="pre-quantized for 'w8a8' .*quantization='fp8'"):
        load_model(str(checkpoints["W8A8"]), with_tokenizer=False, quantization="fp8")


def test_unserved_schemes_are_refused_naming_the_field(checkpoints):
    with pytest.raises(ValueError, match="weights.num_bits 4"):
        load_model(str(checkpoints["W4A16"]), with_tokenizer=False)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(quant_method="gptq"), "quant_method 'gptq'"),
        (dict(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme"),
        (dict(sparsity_config={"format": "sparse-24"}), "sparsity_config"),
    ],
)
def test_other_methods_and_features_are_refused(checkpoints, tmp_path, change, match):
    folder = tmp_path / "changed"
    folder.mkdir()
    config = json.loads((checkpoints["W8A8"] / "config.json").read_text())
    config["quantization_config"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(checkpoints["W8A8"] / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        load_model(str(folder), with_tokenizer=False)


def test_corrupt_scales_are_refused(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "config.json").write_text((checkpoints["W8A8"] / "config.json").read_text())
    tensors = load_file(checkpoints["W8A8"] / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight_scale"][3] = float("nan")
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match="up_proj.weight_scale .*corrupt"):
        load_model(str(folder), with_tokenizer=False)


def test_torch_backend_refuses_a_prequantized_checkpoint(checkpoints):
    from xlaserve.kernels_cuda.loader import load_torch_model

    with pytest.raises(ValueError, match="backend 'torch' runs 16/32-bit weights"):
        load_torch_model(str(checkpoints["W8A8"]), with_tokenizer=False)
