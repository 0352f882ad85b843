"""`xlaserve convert`: the source precision is kept unless a dtype is asked for, the report says
what was stored, and a converted folder serves exactly like the checkpoint it came from."""

import json
from pathlib import Path

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from tests.checkpoints.test_gguf import tiny_tensors, write_gguf
from tests.conftest import ENGINE_KWARGS
from tests.models.tiny_configs import make_tiny_model
from xlaserve.checkpoints import orbax_store
from xlaserve.checkpoints.convert import ConvertReport, convert, source_dtype
from xlaserve.checkpoints.loader import load_model, resolve_dtype

Q = gguf.GGMLQuantizationType


def save_tiny(folder, torch_dtype):
    make_tiny_model("llama_tied").to(torch_dtype).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny_f32"), torch.float32)


@pytest.fixture(scope="module")
def tiny_converted(tiny_f32, tmp_path_factory):
    """The float32 tiny folder converted without a dtype (one conversion for the module)."""
    return convert(str(tiny_f32), tmp_path_factory.mktemp("conv") / "out")


def params(model) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def stored_dtype(folder) -> str:
    return json.loads((folder / orbax_store.MARKER).read_text())["dtype"]


# ---------------------------------------------------------------- source_dtype


def test_bundled_q4_gguf_dequantizes_to_float32():
    assert source_dtype("smollm2-135m-instruct") == "float32"


def test_dummy_preset_is_float32():
    assert source_dtype("smollm2-135m", load_format="dummy") == "float32"


@pytest.mark.parametrize(
    ("torch_dtype", "expected"),
    [(torch.float32, "float32"), (torch.float16, "float16"), (torch.bfloat16, "bfloat16")],
)
def test_hf_folder_gives_its_stored_dtype(tmp_path, torch_dtype, expected):
    assert source_dtype(str(save_tiny(tmp_path, torch_dtype))) == expected


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        ((np.float16, np.float32), "float32"),
        ((np.float16, np.int64), "float16"),  # integer tensors hold no precision
        ((np.float16, ml_dtypes.bfloat16), "float32"),  # neither holds the other exactly
    ],
)
def test_mixed_safetensors_give_the_widest_float(tmp_path, dtypes, expected):
    (tmp_path / "config.json").write_text("{}")
    tensors = {f"t{i}": np.zeros(4, dt) for i, dt in enumerate(dtypes)}
    # A float32 rotary buffer beside float16 weights is not a parameter (the loader drops it).
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert source_dtype(str(tmp_path), load_format="hf") == expected


@pytest.mark.parametrize(
    ("weights", "norms", "expected"),
    [
        (Q.F16, np.float16, "float16"),
        (Q.BF16, None, "bfloat16"),
        (Q.F16, np.float32, "float32"),  # llama.cpp keeps norms in F32
        (Q.Q8_0, np.float16, "float32"),  # quantized tensors are read as float32
    ],
    ids=["f16", "bf16", "f16+f32-norms", "q8_0+f16"],
)
def test_gguf_gives_the_widest_tensor_type_once_read(tmp_path, weights, norms, expected):
    def stored(x):
        if x.ndim == 1 and norms is not None:
            return x.astype(norms)
        if weights == Q.F16:
            return x.astype(np.float16)
        return (gguf.quants.quantize(x, weights), weights)

    tensors = {k: stored(v) for k, v in tiny_tensors(np.random.default_rng(0)).items()}
    assert source_dtype(str(write_gguf(tmp_path / "m.gguf", tensors))) == expected


# ---------------------------------------------------------------- convert


def test_convert_keeps_a_float32_source_exactly(tiny_f32, tiny_converted):
    out = Path(tiny_converted.out)
    assert (tiny_converted.dtype, tiny_converted.source_dtype) == ("float32", "float32")
    assert stored_dtype(out) == "float32" and source_dtype(str(out)) == "float32"
    source = params(load_model(str(tiny_f32), dtype="float32").model)
    restored = params(load_model(str(out), dtype="float32").model)
    assert restored.keys() == source.keys()
    for name, value in source.items():
        np.testing.assert_array_equal(restored[name], value, err_msg=name)
    assert tiny_converted.num_params == sum(v.size for v in source.values())


def test_convert_keeps_a_float16_source(tmp_path):
    report = convert(str(save_tiny(tmp_path / "src", torch.float16)), tmp_path / "out")
    assert (report.dtype, report.source_dtype) == ("float16", "float16")
    assert stored_dtype(tmp_path / "out") == "float16"
    source = params(load_model(str(tmp_path / "src"), dtype="float16").model)
    restored = params(load_model(str(tmp_path / "out"), dtype="float16").model)
    for name, value in source.items():
        assert restored[name].dtype == np.float16
        np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_explicit_bfloat16_is_stored_and_reported(tiny_f32, tmp_path):
    report = convert(str(tiny_f32), tmp_path / "out", dtype="bfloat16")
    assert (report.dtype, report.source_dtype) == ("bfloat16", "float32")
    assert stored_dtype(tmp_path / "out") == "bfloat16"
    assert report.describe().startswith("stored bfloat16 (source float32) parameters, ")
    assert str(tmp_path / "out") in report.describe()


def test_explicit_auto_is_the_engines_auto_dtype(tiny_f32, tmp_path):
    report = convert(str(tiny_f32), tmp_path / "out", dtype="auto")
    assert report.dtype == np.dtype(resolve_dtype("auto")).name
    assert stored_dtype(tmp_path / "out") == report.dtype


def test_bad_dtype_and_non_empty_out_fail_before_loading(tiny_f32, tmp_path):
    with pytest.raises(ValueError, match="'float64' is not supported"):
        convert(str(tiny_f32), tmp_path / "a", dtype="float64")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        convert("no-such-model", tmp_path / "b")


def test_describe_is_one_line_naming_dtypes_size_and_time():
    report = ConvertReport(
        source="m.gguf",
        out="/models/smol",
        dtype="float32",
        source_dtype="float32",
        num_params=134_515_008,
        bytes_written=538_060_032,
        seconds=3.14,
    )
    assert report.describe() == (
        "stored float32 (source float32) parameters, 134.5M params, 538 MB -> /models/smol in 3.1s"
    )


# ---------------------------------------------------------------- served like the source


def placement(model) -> dict:
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    return {
        jax.tree_util.keystr(p): (x.shape, x.dtype, x.weak_type, x.committed, x.sharding)
        for p, x in leaves
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_restored_params_are_placed_like_the_hf_loaders(tiny_f32, tiny_converted, dtype):
    # Committed parameters commit every jit output (KV cache, penalty state), so graphs warmed
    # up with the fresh uncommitted cache were lowered again on the first real steps.
    hf = placement(load_model(str(tiny_f32), dtype=dtype).model)
    restored = placement(load_model(tiny_converted.out, dtype=dtype).model)
    assert restored == hf
    assert not any(committed for *_, committed, _ in restored.values())


@pytest.fixture(scope="module")
def smollm2_orbax(tmp_path_factory):
    return convert("smollm2-135m-instruct", tmp_path_factory.mktemp("smol") / "orbax")


MIXED_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at",
    "1, 2, 3, 4, 5,",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "import numpy as np\n\ndef softmax(x):",
    "List five fruits:",
    "Q: What is 12 times 12?\nA:",
    "A haiku about autumn leaves:\n",
    "Photosynthesis is the process by which plants",
    "Hi",
    " ".join(f"Item {i}: a note about topic number {i}." for i in range(20)),
]


@pytest.mark.slow
def test_converted_smollm2_serves_the_gguf_tokens_without_recompiling(smollm2_orbax, smollm2_llm):
    from xlaserve import LLM, SamplingParams

    assert smollm2_orbax.dtype == "float32"
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    llm = LLM(smollm2_orbax.out, **ENGINE_KWARGS)
    ours = [o.outputs[0].token_ids for o in llm.generate(MIXED_PROMPTS, greedy, use_tqdm=False)]
    assert llm.get_metrics()["compiles_after_warmup"] == 0
    gguf_out = smollm2_llm.generate(MIXED_PROMPTS, greedy, use_tqdm=False)
    assert ours == [o.outputs[0].token_ids for o in gguf_out]


def test_a_non_empty_out_needs_overwrite_and_is_replaced_whole(tiny_f32, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(str(tiny_f32), str(out))
    assert (out / "old.txt").read_text() == "old"  # untouched
    monkeypatch.chdir(tmp_path)
    report = convert(str(tiny_f32), "out", overwrite=True)
    assert report.out == str(out) and Path(report.out).is_absolute()
    assert str(out) in report.describe()
    assert not (out / "old.txt").exists()
    assert orbax_store.read_meta(out)["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old siblings


def test_overwrite_failure_leaves_the_old_contents(tiny_f32, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(orbax_store, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(str(tiny_f32), out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_out_that_is_a_file_is_refused_even_with_overwrite(tiny_f32, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        convert(str(tiny_f32), path, overwrite=True)
