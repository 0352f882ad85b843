"""Quantization on one device: weight bytes, decode tokens/s at batch 1 and 32, KV pages per GB.

Each mode (bfloat16 weights, int8, w8a8, fp8, the GGUF file's packed blocks, and int8 / fp8
KV caches under bfloat16 weights) gets its own engine in the same run; decode steps (every
row decoding one token) are timed after warm-up, and the median step gives tokens/s.

    PYTHONPATH=. python benchmarks/quantization.py --model smollm2-135m-instruct
    # on a GPU: Llama-3-8B with random weights, batch-1 decode per mode (issue target: int8
    # and fp8 at least 1.6x bfloat16)
    PYTHONPATH=. python benchmarks/quantization.py --model llama-3-8b --load-format dummy \
        --modes bf16,int8,fp8 --batch-sizes 1
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from xlaserve import LLM, SamplingParams
from xlaserve.bench.common import decode_step_seconds, slug, today, write_results
from xlaserve.bench.roofline import device_name

# (label, quantization, kv_cache_dtype)
MODES = [
    ("bf16", None, "auto"),
    ("int8", "int8", "auto"),
    ("w8a8", "w8a8", "auto"),
    ("fp8", "fp8", "auto"),
    ("gguf", "gguf", "auto"),
    ("gguf_a8", "gguf_a8", "auto"),
    ("bf16+kv-int8", None, "int8"),
    ("bf16+kv-fp8", None, "fp8"),
]
GB = 10**9


def measure(model: str, quantization, kv_cache_dtype: str, args) -> dict:
    llm = LLM(model, dtype="bfloat16", quantization=quantization, kv_cache_dtype=kv_cache_dtype,
              load_format=args.load_format, max_model_len=256, max_num_seqs=max(args.batch_sizes),
              max_num_batched_tokens=64, compilation_cache_dir=None)  # fmt: skip
    info = llm.engine.runner.device_info()
    spec = llm.engine.runner.kv_cache_spec
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    rng = np.random.default_rng(0)
    out = {"weight_bytes": info.parameter_bytes, "kv_page_bytes": spec.page_bytes,
           "kv_pages_per_gb": GB // spec.page_bytes, "kv_dtype": spec.dtype}  # fmt: skip
    for batch in args.batch_sizes:
        prompts = [{"prompt_token_ids": rng.integers(100, 20000, args.input_len).tolist()}
                   for _ in range(batch)]  # fmt: skip
        times = decode_step_seconds(llm, prompts, params)
        if not times:
            raise ValueError(f"no step decoded all {batch} rows; raise --output-len")
        step = statistics.median(times)
        out[f"decode_step_ms_b{batch}"] = round(1e3 * step, 3)
        out[f"decode_tok_s_b{batch}"] = round(batch / step, 1)
    del llm
    gc.collect()
    return out


def markdown(result: dict) -> str:
    modes = result["modes"]
    base = modes.get("bf16")  # ratios against bfloat16 weights when it was measured
    batches = sorted({int(k.removeprefix("decode_tok_s_b")) for m in modes.values() for k in m
                      if k.startswith("decode_tok_s_b")})  # fmt: skip

    def ratio(m: dict, key: str) -> str:
        return f"{m[key] / base[key]:.2f}" if base and key in base and key in m else "-"

    head = ["mode", "weight MB", "vs bf16", "KV pages / GB"]
    for b in batches:
        head += [f"tok/s b{b}", "vs bf16"]
    lines = [
        f"# Quantization: {result['model']} on {result['device']} ({result['date']})", "",
        "One process, one engine per mode, modes measured one after another; compare ratios "
        "within this run. Weights bfloat16 unless quantized; int8/w8a8/fp8 quantize the "
        "embedding and LM head per vocabulary row, gguf keeps the file's packed LM head (a "
        "tied one serves the lookup too); weight MB counts what the model holds. KV cache: "
        "the engine's default dtype (float32 on the CPU) unless int8/fp8. "
        f"Prompts {result['input_len']} tokens, {result['output_len']} generated; only steps "
        "in which every row decodes are timed (median).",
        *([f"Machine state: {result['note']}."] if result.get("note") else []), "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]  # fmt: skip
    for label, m in modes.items():
        row = [label, f"{m['weight_bytes'] / 1e6:.1f}", ratio(m, "weight_bytes"),
               str(m["kv_pages_per_gb"])]  # fmt: skip
        for b in batches:
            row += [str(m.get(f"decode_tok_s_b{b}", "-")), ratio(m, f"decode_tok_s_b{b}")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--load-format", default="auto", help="dummy: random weights (presets)")
    p.add_argument("--modes", default=",".join(m[0] for m in MODES))
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--input-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=24)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--note", default="", help="the machine's state while measuring")
    p.add_argument("--rewrite-md", help="only rewrite the .md of this results .json")
    args = p.parse_args(argv)
    if args.rewrite_md:
        result = json.loads(Path(args.rewrite_md).read_text())
        Path(args.rewrite_md).with_suffix(".md").write_text(markdown(result))
        return 0
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    wanted = args.modes.split(",")
    result = {"model": args.model, "device": device_name(), "date": today(), "note": args.note,
              "input_len": args.input_len, "output_len": args.output_len, "modes": {}}  # fmt: skip
    for label, quantization, kv in MODES:
        if label in wanted:
            result["modes"][label] = measure(args.model, quantization, kv, args)
            print(label, result["modes"][label], flush=True)
    stem = f"quantization-{args.model}-{slug(result['device'])}-{result['date']}"
    print(write_results(args.out, stem, result, markdown(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
