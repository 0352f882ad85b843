"""Run as a script with 8 fake CPU devices (XLA_FLAGS set before jax loads); prints JSON.

Greedy tokens of tiny random Mixtral and Qwen3-MoE models (8 experts) under expert parallel
1, 2, 8 and expert x tensor parallel 2 x 2 and 4 x 2, and the bytes of expert weights each
device holds when the checkpoint is loaded onto an expert-parallel mesh; a tiny Gemma 3
(sliding and global layers) under tensor parallel 1 and 2.
"""

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.models.tiny_configs import save_tiny_model  # noqa: E402
from xlaserve import LLM, SamplingParams  # noqa: E402
from xlaserve.checkpoints.loader import load_model  # noqa: E402
from xlaserve.sharding.mesh import make_mesh  # noqa: E402

LAYOUTS = [(1, 1), (2, 1), (8, 1), (2, 2), (4, 2)]  # (expert, tensor)
EXPERT_PARAMS = ("we_gate", "we_up", "we_down")


def expert_bytes(folder: str, ep: int) -> dict:
    loaded = load_model(folder, dtype="float32", with_tokenizer=False,
                        mesh=make_mesh(1, expert_parallel_size=ep))  # fmt: skip
    arrays = [getattr(loaded.model.layers, name)[...] for name in EXPERT_PARAMS]
    total = sum(a.nbytes for a in arrays)
    per_device = {}
    for a in arrays:
        for shard in a.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    return {"total": total, "per_device": sorted(per_device.values())}


def main() -> None:
    results = {}
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 17, 33, 2)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    for name in ("mixtral", "qwen3_moe", "gemma3"):
        folder = tempfile.mkdtemp()
        save_tiny_model(name, folder)
        for ep, tp in LAYOUTS if name != "gemma3" else [(1, 1), (1, 2)]:
            llm = LLM(folder, dtype="float32", max_model_len=128, max_num_seqs=4,
                      max_num_batched_tokens=64, tensor_parallel_size=tp,
                      expert_parallel_size=ep, compilation_cache_dir=None,
                      min_token_bucket=16)  # fmt: skip
            outs = llm.generate(prompts, params, use_tqdm=False)
            results[f"{name}/ep{ep}/tp{tp}"] = {
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
                "compiles_after_warmup": llm.get_metrics()["compiles_after_warmup"],
            }
            del llm
        if name == "gemma3":
            continue
        results[f"{name}/bytes"] = {ep: expert_bytes(folder, ep) for ep in (2, 4, 8)}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
