"""Gemma and mixture-of-experts specifics: preset sizes, grouped experts vs the dense loop,
configs refused with a clear error."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xlaserve.models import gemma, moe, qwen
from xlaserve.models.registry import preset_config

# Published parameter counts (the checkpoints' safetensors totals).
PUBLISHED = {
    "gemma-3-270m": 268_098_176,
    "gemma-3-1b": 999_885_952,
    "gemma-2-2b": 2_614_341_888,
    "mixtral-8x7b": 46_702_792_704,
    "qwen3-30b-a3b": 30_532_122_624,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_equals_published_size(name):
    model_cls, config = preset_config(name)
    abstract = nnx.eval_shape(lambda: model_cls(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert sum(int(np.prod(x.shape)) for x in leaves) == PUBLISHED[name]


def tiny_moe_config(norm_topk_prob: bool):
    _, config = preset_config("qwen3-30b-a3b")
    return dataclasses.replace(
        config, hidden_size=32, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
        norm_topk_prob=norm_topk_prob,
    )  # fmt: skip


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 5, 64])
def test_grouped_experts_equal_the_dense_loop(num_tokens, norm_topk_prob):
    c = tiny_moe_config(norm_topk_prob)
    keys = jax.random.split(jax.random.key(0), 5)
    D, E, F = c.hidden_size, c.num_experts, c.moe_intermediate_size
    p = {
        "w_router": jax.random.normal(keys[0], (D, E)),
        "we_gate": 0.3 * jax.random.normal(keys[1], (E, D, F)),
        "we_up": 0.3 * jax.random.normal(keys[2], (E, D, F)),
        "we_down": 0.3 * jax.random.normal(keys[3], (E, F, D)),
    }
    h = jax.random.normal(keys[4], (num_tokens, D))
    weights, experts = moe.route(h, p["w_router"], c)
    assert experts.shape == (num_tokens, 3)
    sums = np.asarray(weights.sum(-1))
    if norm_topk_prob:
        np.testing.assert_allclose(sums, 1.0, rtol=1e-6)
    else:
        assert (sums < 1).all()
    if num_tokens == 1:  # most experts get no token: their groups are empty
        assert len(set(np.asarray(experts).ravel())) == 3
    grouped = moe.moe_block(h, p, c, impl="grouped")
    dense = moe.moe_block(h, p, c, impl="dense")
    np.testing.assert_allclose(grouped, dense, atol=1e-5, rtol=1e-5)


def test_gemma_refuses_other_activations_and_qwen3_moe_dense_layers():
    hf = dict(
        architectures=["Gemma3ForCausalLM"], vocab_size=16, hidden_size=8, intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, hidden_activation="relu",
    )  # fmt: skip
    with pytest.raises(ValueError, match="hidden_activation 'relu'"):
        gemma.config_from_hf(hf)
    qwen_hf = dict(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=16, hidden_size=8,
        intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=8, mlp_only_layers=[1],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1\]"):
        qwen.qwen3_moe_config_from_hf(qwen_hf)


def test_gemma3_layer_pattern_five_local_then_one_global():
    kinds = gemma.gemma_layer_types(12, 6)
    assert kinds == ("sliding",) * 5 + ("full",) + ("sliding",) * 5 + ("full",)


@pytest.mark.parametrize("name", ["gemma3", "qwen3_moe"])
def test_orbax_round_trip_keeps_config_and_logits(name, tmp_path):
    from tests.models.tiny_configs import save_tiny_model
    from xlaserve.checkpoints import orbax_store
    from xlaserve.checkpoints.loader import load_model
    from xlaserve.models.generate import PagedModelRunner

    save_tiny_model(name, tmp_path / "hf")
    loaded = load_model(str(tmp_path / "hf"), dtype="float32", with_tokenizer=False)
    out = orbax_store.save(loaded.model, None, tmp_path / "orbax", dtype=jnp.float32, source=name)
    restored = load_model(str(out), dtype="float32", with_tokenizer=False)
    assert restored.config == loaded.config
    tokens = list(range(3, 40))  # longer than the window of 12

    def logits(model):
        runner = PagedModelRunner(model, num_seqs=1, max_len=len(tokens), page_size=8)
        return runner.step([tokens], all_logits=True).all_logits

    np.testing.assert_array_equal(logits(restored.model), logits(loaded.model))
