"""Run as a script with 4 fake CPU devices (XLA_FLAGS set before jax loads); prints JSON:
greedy tokens of a tiny random Llama with n-gram speculation under tensor parallel 1 and 2
and data parallel 2, against plain decoding on one device."""

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.sharding.tp_dp_check import save  # noqa: E402
from xlaserve import LLM, SamplingParams  # noqa: E402

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
        "prompt_lookup_max": 3, "adaptive": False}  # fmt: skip


def main() -> None:
    folder = tempfile.mkdtemp()
    save("llama", folder)
    prompts = [{"prompt_token_ids": [3, 4, 5, 6] * k} for k in (1, 2, 5)] + [
        {"prompt_token_ids": list(range(10, 40))}
    ]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    results = {}
    for name, tp, dp, spec in (("plain", 1, 1, None), ("tp1", 1, 1, SPEC), ("tp2", 2, 1, SPEC),
                               ("dp2", 1, 2, SPEC)):  # fmt: skip
        llm = LLM(folder, dtype="float32", max_model_len=128, max_num_seqs=4,
                  max_num_batched_tokens=64, tensor_parallel_size=tp, data_parallel_size=dp,
                  compilation_cache_dir=None, speculative_config=spec,
                  min_token_bucket=16)  # fmt: skip
        outs = llm.generate(prompts, params, use_tqdm=False)
        m = llm.get_metrics()
        results[name] = {
            "tokens": [o.outputs[0].token_ids for o in outs],
            "draft_tokens": m.get("spec_decode_num_draft_tokens", 0),
            "accepted": m.get("spec_decode_num_accepted_tokens", 0),
            "compiles_after_warmup": m["compiles_after_warmup"],
        }
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
