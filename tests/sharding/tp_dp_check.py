"""Run as a script with 8 fake CPU devices (XLA_FLAGS set before jax loads); prints JSON.

Greedy tokens and logprobs of tiny random Llama and Qwen2 models under tensor parallel 1, 2, 4,
8 and data parallel 2 x tensor parallel 4.
"""

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from xlaserve import LLM, SamplingParams  # noqa: E402

# N=8 query heads so every size up to 8 splits them; Llama has K=2 KV heads (split at tp 2,
# replicated at tp 4 and 8), Qwen2 K=8 (split at every size) and biases.
MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(num_key_value_heads=8)),
}
LAYOUTS = [(1, 1), (2, 1), (4, 1), (8, 1), (4, 2)]  # (tensor, data)
# Token buckets from 16: fewer graphs to compile per engine. Tensor parallel 2 keeps the
# generation default (1, 2, 4, ...), so sharded small-bucket steps are compared with one device.
DEFAULT_BUCKETS = (2, 1)


def save(name: str, folder: str) -> None:
    model_cls, config_cls, extra = MODELS[name]
    torch.manual_seed(0)
    config = config_cls(vocab_size=256, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=8,
                        max_position_embeddings=256, **extra)  # fmt: skip
    model = model_cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(folder)


def main() -> None:
    results = {}
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 17, 33, 2)]
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2)
    for name in MODELS:
        folder = tempfile.mkdtemp()
        save(name, folder)
        for tp, dp in LAYOUTS:
            llm = LLM(folder, dtype="float32", max_model_len=128, max_num_seqs=4,
                      max_num_batched_tokens=64,
                      tensor_parallel_size=tp, data_parallel_size=dp,
                      compilation_cache_dir=None,
                      min_token_bucket=None if (tp, dp) == DEFAULT_BUCKETS else 16)  # fmt: skip
            outs = llm.generate(prompts, params, use_tqdm=False)
            m = llm.get_metrics()
            replicas = m.get("replicas", [m])
            results[f"{name}/tp{tp}/dp{dp}"] = {
                "tokens": [o.outputs[0].token_ids for o in outs],
                "logprobs": [
                    [p[t].logprob for p, t in zip(c.logprobs, c.token_ids, strict=True)]
                    for c in (o.outputs[0] for o in outs)
                ],
                "compiles_after_warmup": m["compiles_after_warmup"],
                "pages_back": m["kv_pages_free"] == m["kv_pages_total"],
                "replica_queries": [r["prefix_cache_queries"] for r in replicas],
            }
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
