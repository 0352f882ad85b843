"""PEFT folders read into the engine's form: scaling (alpha / r, rsLoRA's alpha / sqrt(r)),
zero-padded ranks, identity by weights; and every bad adapter refused with an error naming the
problem. SmolLM2's shapes, hand-made tensors: no model is loaded."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from xlaserve.errors import InvalidRequestError
from xlaserve.lora.manager import LoRAConfig, LoRAManager
from xlaserve.lora.request import LoRARequest
from xlaserve.models.registry import preset_config

_, CONFIG = preset_config("smollm2-135m")  # D 576, F 1536, 9 q heads, 3 kv heads of 64
PREFIX = "base_model.model.model.layers"


def write_adapter(folder, *, r=4, alpha=8, modules=("q_proj",), layers=(0, 5), seed=0,
                  config_extra=None, tensors_extra=None, shapes=None):  # fmt: skip
    """A PEFT folder for SmolLM2 with random A [r, in] and B [out, r] for each module/layer."""
    dims = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192),
            "o_proj": (576, 576), "gate_proj": (576, 1536), "up_proj": (576, 1536),
            "down_proj": (1536, 576)}  # fmt: skip
    rng = np.random.default_rng(seed)
    tensors = {}
    for m in modules:
        block = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        d_in, d_out = (shapes or {}).get(m, dims.get(m, (576, 576)))
        for layer in layers:
            key = f"{PREFIX}.{layer}.{block}.{m}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((r, d_in)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((d_out, r)).astype(np.float32)
    tensors.update(tensors_extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha,
              "target_modules": list(modules), **(config_extra or {})}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def manager(max_rank=8, max_loras=2, max_cpu=2) -> LoRAManager:
    return LoRAManager(LoRAConfig(max_loras, max_rank, max_cpu), CONFIG)


def test_scaling_padding_and_layers_left_alone(tmp_path):
    tensors = write_adapter(tmp_path / "a", r=4, alpha=8, modules=("q_proj", "down_proj"))
    adapter = manager().add(LoRARequest("a", 1, str(tmp_path / "a")))
    assert adapter.rank == 4 and adapter.scaling == 2.0  # alpha / r
    a, b = adapter.weights["wq"]
    assert a.shape == (30, 576, 8) and b.shape == (30, 8, 576)  # padded to max_lora_rank 8
    key = f"{PREFIX}.5.self_attn.q_proj"
    np.testing.assert_array_equal(a[5, :, :4], tensors[f"{key}.lora_A.weight"].T)
    np.testing.assert_allclose(b[5, :4], 2.0 * tensors[f"{key}.lora_B.weight"].T)
    assert not a[:, :, 4:].any() and not b[:, 4:].any()  # padded ranks are zero
    assert not a[1].any() and not b[1].any()  # layer 1 is not adapted
    assert set(adapter.weights) == {"wq", "w_down"}

    write_adapter(tmp_path / "rs", r=4, alpha=8, config_extra={"use_rslora": True})
    rs = manager().add(LoRARequest("rs", 1, str(tmp_path / "rs")))
    assert rs.scaling == 4.0  # alpha / sqrt(r)


def test_identity_follows_weights_not_names(tmp_path):
    write_adapter(tmp_path / "a", seed=0)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    write_adapter(tmp_path / "b", seed=1)
    m = manager(max_cpu=3, max_loras=3)
    a = m.add(LoRARequest("a", 1, str(tmp_path / "a")))
    copy = m.add(LoRARequest("copy", 2, str(tmp_path / "copy")))
    b = m.add(LoRARequest("b", 3, str(tmp_path / "b")))
    assert a.identity == copy.identity != b.identity
    assert [x.name for x in m.list_adapters()] == ["a", "copy", "b"]


def test_host_cache_evicts_least_recently_used_and_reads_again(tmp_path):
    m = manager(max_loras=1, max_cpu=1)
    for i, name in enumerate("ab"):
        write_adapter(tmp_path / name, seed=i)
        m.add(LoRARequest(name, i + 1, str(tmp_path / name)))
    assert m.loads_from_disk == 2
    again = m.get("a")  # pushed out of the one-adapter host cache: read from disk
    assert m.loads_from_disk == 3 and again.name == "a"
    write_adapter(tmp_path / "b", seed=7)  # b's weights change on disk while it is out
    with pytest.raises(InvalidRequestError, match="changed on disk"):
        m.get("b")


def refused(tmp_path, match, name="x", **kw):
    with pytest.raises(InvalidRequestError, match=match) as e:
        manager().add(LoRARequest(name, 1, str(tmp_path / name)), **kw)
    return e.value


def test_bad_folders_are_refused_naming_the_problem(tmp_path):
    assert refused(tmp_path, "folder not found").param == "lora_path"
    (tmp_path / "x").mkdir()
    refused(tmp_path, "no adapter_config.json")
    (tmp_path / "x" / "adapter_config.json").write_text("{not json")
    refused(tmp_path, "corrupt .*adapter_config.json")
    (tmp_path / "x" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    refused(tmp_path, "no adapter_model.safetensors or adapter_model.bin")
    (tmp_path / "x" / "adapter_model.safetensors").write_bytes(b"\x10\x00garbage")
    refused(tmp_path, "corrupt adapter weights")
    (tmp_path / "x" / "adapter_model.safetensors").unlink()
    (tmp_path / "x" / "adapter_model.bin").write_bytes(b"not a torch file")
    refused(tmp_path, "corrupt adapter weights .*adapter_model.bin")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(r=16), "LoRA rank 16 exceeds max_lora_rank 8"),
        (dict(modules=("c_attn",)), "target module 'c_attn' is not a module of this model"),
        (dict(modules=("embed_tokens",)), "embedding and LM-head adapters"),
        (dict(config_extra={"modules_to_save": ["lm_head"]}), "modules_to_save"),
        (dict(config_extra={"use_dora": True}), "use_dora"),
        (dict(config_extra={"bias": "all"}), "bias='all'"),
        (dict(shapes={"q_proj": (512, 576)}), r"needs \(4, 576\)"),  # another model's width
        (dict(layers=(30,)), "layer 30, but the model has 30 layers"),
        (
            dict(
                tensors_extra={
                    f"{PREFIX}.0.mlp.gate_proj.lora_A.weight": np.zeros((4, 576), np.float32)
                }
            ),
            "no lora_B weight",
        ),  # fmt: skip
        (
            dict(
                tensors_extra={
                    "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros(
                        (4, 49152), np.float32
                    )
                }
            ),
            "embedding and LM-head",
        ),  # fmt: skip
    ],
)
def test_adapters_the_model_cannot_take_are_refused(tmp_path, kw, match):
    write_adapter(tmp_path / "x", **kw)
    assert refused(tmp_path, match).param == "lora_path"


def test_names_and_ids_are_unique(tmp_path):
    write_adapter(tmp_path / "a")
    write_adapter(tmp_path / "b", seed=1)
    m = manager()
    m.add(LoRARequest("a", 1, str(tmp_path / "a")))
    with pytest.raises(InvalidRequestError, match="named 'a' is already loaded") as e:
        m.add(LoRARequest("a", 2, str(tmp_path / "b")))
    assert e.value.param == "lora_name"
    with pytest.raises(InvalidRequestError, match="lora_int_id 1 is already used by adapter 'a'"):
        m.add(LoRARequest("b", 1, str(tmp_path / "b")))
    with pytest.raises(InvalidRequestError, match="loaded from .* not "):
        m.resolve(LoRARequest("a", 1, str(tmp_path / "b")))
    assert m.resolve(LoRARequest("a", 1, str(tmp_path / "a"))).name == "a"
    with pytest.raises(InvalidRequestError, match="loaded with lora_int_id 1, not 5"):
        m.resolve(LoRARequest("a", 5, str(tmp_path / "a")))
    with pytest.raises(InvalidRequestError, match="no LoRA adapter named 'ghost' is loaded"):
        m.resolve(LoRARequest("ghost", 7))  # no path: it must be loaded already (serving)
    with pytest.raises(InvalidRequestError, match="no LoRA adapter named 'zzz'"):
        m.get("zzz")
    m.remove("a")
    with pytest.raises(InvalidRequestError, match="no LoRA adapter named 'a'"):
        m.remove("a")
    for bad in (dict(lora_name=""), dict(lora_int_id=0), dict(lora_int_id=True)):
        with pytest.raises(InvalidRequestError):
            LoRARequest(**{"lora_name": "n", "lora_int_id": 1, **bad})


def test_engine_without_lora_refuses_lora_requests_and_keeps_serving(tmp_path):
    from tests.engine.mock_runner import mock_engine
    from xlaserve.engine.sampling_params import SamplingParams

    engine = mock_engine()
    with pytest.raises(InvalidRequestError, match="LoRA adapters are not enabled") as e:
        engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=2),
                           lora_request=LoRARequest("a", 1, str(tmp_path)))  # fmt: skip
    assert e.value.param == "lora_request"
    assert engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=2)) == "r"
    assert not engine.scheduler.block_manager.ref_counts.count(1)  # nothing was allocated


def test_torch_backend_refuses_lora_at_start_up():
    pytest.importorskip("torch", reason="the torch parity backend needs torch")
    from xlaserve.config import EngineArgs
    from xlaserve.kernels_cuda.backend import TorchBackend

    with pytest.raises(ValueError, match="backend 'torch' does not serve LoRA adapters"):
        TorchBackend().load(EngineArgs(backend="torch", enable_lora=True), None)


def test_lora_options_are_validated():
    from xlaserve.config import EngineArgs

    with pytest.raises(ValueError, match="max_lora_rank must be a positive int"):
        EngineArgs(enable_lora=True, max_lora_rank=0)
    with pytest.raises(ValueError, match=r"max_cpu_loras \(2\) must be >= max_loras \(4\)"):
        EngineArgs(enable_lora=True, max_loras=4, max_cpu_loras=2)


def test_serve_flags_for_lora_modules():
    from xlaserve.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--enable-lora", "--lora-modules", "sql=/a/sql", "chat=/b", 
         "--allow-runtime-lora-loading"]
    )  # fmt: skip
    assert args.lora_modules == [("sql", "/a/sql"), ("chat", "/b")]
    assert args.allow_runtime_lora_loading and args.enable_lora
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--lora-modules", "no-equals-sign"])
