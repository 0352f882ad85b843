"""Run as a script with 4 fake CPU devices (XLA_FLAGS set before jax loads); prints JSON.

A tiny random Llama (8 query heads, 2 KV heads) with two peft adapters (all seven target
modules, rank 4; attention only, rank 2) and the base model mixed in one batch, under tensor
parallel 1, 2 and 4 and data parallel 2 x tensor parallel 2; plus peft's greedy tokens.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tests.lora.peft_adapters import ATTN, MLP, AdapterSpec, make_adapters  # noqa: E402
from xlaserve import LLM, LoRARequest, SamplingParams  # noqa: E402

LAYOUTS = [(1, 1), (2, 1), (4, 1), (2, 2)]  # (tensor, data)
PROMPTS = [list(range(3, 3 + n)) for n in (5, 17, 9)]
SPECS = {
    "all4": AdapterSpec(r=4, alpha=8, targets=ATTN + MLP, seed=1, scale=0.3),
    "attn2": AdapterSpec(r=2, alpha=2, targets=ATTN, seed=2, scale=0.3),
}


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=256)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(folder / "base")
    made = make_adapters(model, SPECS, folder, PROMPTS, 10, PROMPTS[0])
    names = ["all4", "attn2", None]
    loras = [None if n is None else LoRARequest(n, i + 1, made[n].path)
             for i, n in enumerate(names)]  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=1)
    results = {"peft": [made[n].greedy[i] for i, n in enumerate(names) if n is not None]}
    for tp, dp in LAYOUTS:
        llm = LLM(str(folder / "base"), dtype="float32", max_model_len=128, max_num_seqs=4,
                  max_num_batched_tokens=32, tensor_parallel_size=tp, data_parallel_size=dp,
                  enable_lora=True, max_loras=2, max_lora_rank=8,
                  compilation_cache_dir=None, min_token_bucket=16)  # fmt: skip
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
        m = llm.get_metrics()
        results[f"tp{tp}/dp{dp}"] = {
            "tokens": [o.outputs[0].token_ids for o in outs],
            "logprobs": [
                [p[t].logprob for p, t in zip(c.logprobs, c.token_ids, strict=True)]
                for c in (o.outputs[0] for o in outs)
            ],  # fmt: skip
            "compiles_after_warmup": m["compiles_after_warmup"],
        }
        if dp == 1 and tp > 1:
            # How the adapter slots are split (B of a column-parallel weight, A of a
            # row-parallel one), and the shape of the first device's slice of one buffer.
            buffers = llm.engine.runner.steps.lora.buffers
            results[f"tp{tp}/dp{dp}"]["specs"] = {
                f"{n}.{k}": str(tuple(buffers[n][k].sharding.spec)) for n in ("wq", "wo")
                for k in ("a", "b")}  # fmt: skip
            shard = buffers["w_up"]["b"].addressable_shards[0].data
            results[f"tp{tp}/dp{dp}"]["w_up_b_shard"] = list(shard.shape)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
