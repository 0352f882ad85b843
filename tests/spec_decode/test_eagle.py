"""EAGLE and EAGLE-3 heads with random weights on a tiny Llama target: every draft the engine
proposes equals a reference head written here independently (numpy, full causal attention over
the whole context, no pages, no cache), greedy outputs equal plain decoding, and heads that do
not fit the target are refused at start-up naming the misfit."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from tests.models.tiny_configs import COMMON, save_tiny_model
from xlaserve import LLM, SamplingParams

D, F, N, K = COMMON["hidden_size"], COMMON["intermediate_size"], 4, 2
H = D // N
V = COMMON["vocab_size"]
DRAFT_V = 100
ENGINE = dict(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
              enable_prefix_caching=False, min_token_bucket=16)  # fmt: skip
PROMPTS = [[5, 17, 42, 9, 88, 3], [100, 7, 7, 23], list(range(30, 52)), [1, 2, 3, 4, 5, 6, 7, 8]]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("target")
    model = save_tiny_model("llama3", folder)
    return str(folder), model


def head_tensors(method: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.2):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32)

    attn_in = 2 * D if method == "eagle3" else D
    prefix = "midlayer." if method == "eagle3" else "layers.0."
    t = {
        f"{prefix}self_attn.q_proj.weight": w(N * H, attn_in),
        f"{prefix}self_attn.k_proj.weight": w(K * H, attn_in),
        f"{prefix}self_attn.v_proj.weight": w(K * H, attn_in),
        f"{prefix}self_attn.o_proj.weight": w(D, N * H),
        f"{prefix}post_attention_layernorm.weight": norm(),
        f"{prefix}mlp.gate_proj.weight": w(F, D),
        f"{prefix}mlp.up_proj.weight": w(F, D),
        f"{prefix}mlp.down_proj.weight": w(D, F),
    }
    if method == "eagle":
        t["fc.weight"], t["fc.bias"] = w(D, 2 * D), w(D)
    else:
        t["fc.weight"] = w(D, 3 * D)
        t[f"{prefix}input_layernorm.weight"] = norm()
        t[f"{prefix}hidden_norm.weight"] = norm()
        t["norm.weight"] = norm()
        t["lm_head.weight"] = w(DRAFT_V, D, scale=1.0)
        subset = np.sort(rng.choice(V, DRAFT_V, replace=False))
        t["d2t"] = (subset - np.arange(DRAFT_V)).astype(np.int64)
    return t


def save_head(folder, method, tensors=None, **config_overrides):
    config = dict(architectures=["LlamaForCausalLM"], hidden_size=D, intermediate_size=F,
                  num_attention_heads=N, num_key_value_heads=K, num_hidden_layers=1,
                  vocab_size=V, rms_norm_eps=1e-6, rope_theta=10000.0)  # fmt: skip
    if method == "eagle3":
        config["draft_vocab_size"] = DRAFT_V
    config.update(config_overrides)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors or head_tensors(method), str(folder / "model.safetensors"))
    return str(folder)


# ---- the reference head -----------------------------------------------------------------------
def rms(x, w, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, positions):  # x [T, heads, H]: rotate-half over the head dim
    inv = 1.0 / (10000.0 ** (np.arange(0, H, 2) / H))
    angles = positions[:, None] * inv[None, :]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    a, b = x[..., : H // 2], x[..., H // 2 :]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def head_layer(t, method, tokens, features, embed):
    """The head over the whole sequence of (token, feature) pairs at positions 0..n-1."""
    p = "midlayer." if method == "eagle3" else "layers.0."
    e = embed[tokens]
    if method == "eagle":
        x = np.concatenate([e, features], -1) @ t["fc.weight"].T + t["fc.bias"]
        h, residual = x, x
    else:
        f = np.stack([fe if fe.shape[-1] == D else fe @ t["fc.weight"].T for fe in features])
        h = np.concatenate([rms(e, t[p + "input_layernorm.weight"]),
                            rms(f, t[p + "hidden_norm.weight"])], -1)  # fmt: skip
        residual = f
    n = len(tokens)
    pos = np.arange(n, dtype=np.float64)
    q = rope((h @ t[p + "self_attn.q_proj.weight"].T).reshape(n, N, H), pos)
    k = rope((h @ t[p + "self_attn.k_proj.weight"].T).reshape(n, K, H), pos)
    v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(n, K, H)
    k, v = np.repeat(k, N // K, axis=1), np.repeat(v, N // K, axis=1)
    scores = np.einsum("qnh,knh->nqk", q, k) / np.sqrt(H)
    scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum("nqk,knh->qnh", probs, v).reshape(n, N * H)
    x = residual + attn @ t[p + "self_attn.o_proj.weight"].T
    hh = rms(x, t[p + "post_attention_layernorm.weight"])
    gate, up = hh @ t[p + "mlp.gate_proj.weight"].T, hh @ t[p + "mlp.up_proj.weight"].T
    return x + (gate / (1 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T


def reference_drafts(t, method, target_model, context, k):
    """Drafts after `context` (its last token not yet seen by the target)."""
    with torch.no_grad():
        out = target_model(torch.tensor([context[:-1]]), output_hidden_states=True)
    states = [s[0].double().numpy() for s in out.hidden_states]
    if method == "eagle":
        features = list(states[-1])  # the final normed hidden states
    else:
        aux = (0, 1, 2)  # (2, L // 2, L - 3) for L = 3, sorted
        features = list(np.concatenate([states[i] for i in aux], -1))
    embed = target_model.model.embed_tokens.weight.detach().double().numpy()
    lm_head = target_model.lm_head.weight.detach().double().numpy()
    t = {name: a.astype(np.float64) if a.dtype.kind == "f" else a for name, a in t.items()}
    tokens, drafts = list(context[1:]), []
    for _ in range(k):
        x = head_layer(t, method, np.array(tokens), features, embed)[-1]
        if method == "eagle":
            token = int(np.argmax(x @ lm_head.T))
        else:
            d = int(np.argmax(rms(x, t["norm.weight"]) @ t["lm_head.weight"].T))
            token = d + int(t["d2t"][d])
        drafts.append(token)
        tokens.append(token)
        features.append(x)
    return drafts


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_drafts_equal_the_reference_head_and_outputs_equal_plain(method, target, tmp_path):
    folder, model = target
    head = save_head(tmp_path / method, method)
    tensors = head_tensors(method)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    plain = LLM(folder, **ENGINE)
    want = [o.outputs[0].token_ids for o in plain.generate(
        [{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)]  # fmt: skip
    llm = LLM(folder, **ENGINE, speculative_config={"method": method, "model": head,
              "num_speculative_tokens": 3, "adaptive": False})  # fmt: skip
    proposer = llm.engine.runner.proposer
    recorded = []
    propose = proposer.propose

    def recording(batch, step, emitted, seq_ids):
        drafts = propose(batch, step, emitted, seq_ids)
        for s in seq_ids:
            recorded.append((list(batch.token_ids(s)) + emitted[s], drafts.get(s, [])))
        return drafts

    proposer.propose = recording
    got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    assert len(recorded) >= 10
    for context, drafts in recorded:
        k = min(3, 128 - len(context) - 1)
        assert drafts == reference_drafts(tensors, method, model, context, k), context
    m = llm.get_metrics()
    assert m["compiles_after_warmup"] == 0 and m["spec_decode_num_draft_tokens"] > 0


@pytest.mark.parametrize(
    "method, change, message",
    [
        ("eagle", dict(config={"hidden_size": 32}), "hidden_size 32 does not fit the target's"),
        ("eagle", dict(tensor=("fc.weight", (D, 3 * D))), "fc has shape"),
        ("eagle3", dict(tensor=("lm_head.weight", (DRAFT_V, D + 2))), "lm_head has shape"),
        ("eagle3", dict(d2t_shift=V), "outside the target's vocabulary"),
        (
            "eagle3",
            dict(config={"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 7]}}),
            "do not fit the target's 3 layers",
        ),  # fmt: skip
        ("eagle", dict(drop="layers.0.mlp.up_proj.weight"), "lacks"),
    ],
)
def test_heads_that_do_not_fit_are_refused(method, change, message, target, tmp_path):
    tensors = head_tensors(method)
    if "tensor" in change:
        name, shape = change["tensor"]
        tensors[name] = np.zeros(shape, np.float32)
    if "d2t_shift" in change:
        tensors["d2t"] = tensors["d2t"] + change["d2t_shift"]
    if "drop" in change:
        del tensors[change["drop"]]
    head = save_head(tmp_path / "head", method, tensors, **change.get("config", {}))
    with pytest.raises(ValueError, match=message):
        LLM(target[0], **ENGINE, speculative_config={"method": method, "model": head,
            "num_speculative_tokens": 2})  # fmt: skip
