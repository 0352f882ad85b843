"""Run as a script with 4 fake CPU devices (XLA_FLAGS set before jax loads); prints JSON.

Greedy tokens of a tiny random Llama (8 query heads, 2 KV heads) under each quantized mode at
tensor parallel 1, 2 and 4: int8, w8a8 and fp8 weights from an HF folder, and a GGUF file of
the same model (Q4_1 projections, Q8_0 embedding) kept packed, and a compressed-tensors W8A8
checkpoint (its stored int8 weights); int8 and fp8 KV caches ride along. Then the engine with
LoRA adapters on an int8 base, at tensor parallel 1 and 2.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tests.checkpoints.compressed_tensors_writer import write_checkpoint  # noqa: E402
from tests.lora.peft_adapters import ATTN, MLP, AdapterSpec, make_adapters  # noqa: E402
from xlaserve import LLM, LoRARequest, SamplingParams  # noqa: E402
from xlaserve.checkpoints.loader import load_model  # noqa: E402
from xlaserve.models.generate import PagedModelRunner  # noqa: E402
from xlaserve.sharding.mesh import make_mesh  # noqa: E402

D, F, N, K, L, V = 128, 256, 8, 2, 2, 256
PROMPTS = [list(range(3, 3 + n)) for n in (5, 17, 9)]
MODES = [("int8", "int8"), ("w8a8", "fp8"), ("fp8", "auto"), ("gguf", "int8"), ("gguf_a8", "auto"),
         (None, "auto"), ("compressed-tensors", "auto")]  # fmt: skip
NEW_TOKENS = 8


def save_llama(folder: Path) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                         num_attention_heads=N, num_key_value_heads=K,
                         max_position_embeddings=256, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def save_gguf(model: LlamaForCausalLM, path: Path) -> None:
    """The same weights as llama.cpp writes them: Q4_1 projections, a Q8_0 embedding."""
    Q = gguf.GGMLQuantizationType
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in [
        (writer.add_context_length, 256),
        (writer.add_embedding_length, D),
        (writer.add_feed_forward_length, F),
        (writer.add_block_count, L),
        (writer.add_head_count, N),
        (writer.add_head_count_kv, K),
        (writer.add_layer_norm_rms_eps, 1e-6),
        (writer.add_rope_freq_base, 1e4),
    ]:
        add(value)  # fmt: skip
    embed = gguf.quants.quantize(sd["model.embed_tokens.weight"], Q.Q8_0)
    writer.add_tensor("token_embd.weight", embed, raw_dtype=Q.Q8_0)
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }  # fmt: skip
    for i in range(L):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for g, h in names.items():
            w = sd[f"{p}{h}.weight"]
            if g in ("attn_q", "attn_k"):
                w = llama_cpp_permute(w, N if g == "attn_q" else K)
            packed = gguf.quants.quantize(w, Q.Q4_1)
            writer.add_tensor(f"blk.{i}.{g}.weight", packed, raw_dtype=Q.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def model_greedy(path: Path, quantization, kv_cache_dtype: str, tp: int) -> list[list[int]]:
    mesh = None if tp == 1 else make_mesh(tp)
    if quantization == "compressed-tensors":
        quantization = None  # the checkpoint says how it runs
    model = load_model(str(path), dtype="float32", with_tokenizer=False, mesh=mesh,
                       quantization=quantization).model  # fmt: skip
    runner = PagedModelRunner(model, num_seqs=len(PROMPTS), max_len=64,
                              kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    outs, feed = [[] for _ in PROMPTS], PROMPTS
    for _ in range(NEW_TOKENS):
        ids = runner.step(feed).logits.argmax(-1).tolist()
        for out, token in zip(outs, ids, strict=True):
            out.append(token)
        feed = [[t] for t in ids]
    return outs


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    model = save_llama(folder / "base")
    save_gguf(model, folder / "tiny.gguf")
    write_checkpoint(folder / "compressed-tensors", "W8A8")
    paths = {"gguf": folder / "tiny.gguf", "gguf_a8": folder / "tiny.gguf",
             "compressed-tensors": folder / "compressed-tensors"}  # fmt: skip
    results = {}
    for quantization, kv in MODES:
        path = paths.get(quantization, folder / "base")
        for tp in (1, 2, 4):
            results[f"{quantization}/{kv}/tp{tp}"] = model_greedy(path, quantization, kv, tp)
    # The engine: LoRA adapters (16/32-bit) on an int8 base with an int8 KV cache.
    specs = {"all4": AdapterSpec(r=4, alpha=8, targets=ATTN + MLP, seed=1, scale=0.3)}
    made = make_adapters(model, specs, folder, PROMPTS, NEW_TOKENS, PROMPTS[0])
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    for tp in (1, 2):
        llm = LLM(str(folder / "base"), dtype="float32", max_model_len=128, max_num_seqs=4,
                  max_num_batched_tokens=32, tensor_parallel_size=tp, enable_lora=True,
                  max_loras=1, max_lora_rank=8, quantization="int8", kv_cache_dtype="int8",
                  compilation_cache_dir=None, min_token_bucket=16)  # fmt: skip
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        lora = LoRARequest("all4", 1, made["all4"].path)
        with_lora = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
        base = llm.generate(prompts, params, use_tqdm=False)
        results[f"engine-lora/tp{tp}"] = [o.outputs[0].token_ids for o in with_lora]
        results[f"engine-base/tp{tp}"] = [o.outputs[0].token_ids for o in base]
    results["peft"] = made["all4"].greedy
    print(json.dumps(results))


if __name__ == "__main__":
    main()
