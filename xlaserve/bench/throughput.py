"""Offline throughput of xlaserve vs HF transformers `generate`, side by side in one run, with
the roofline each run is measured against.

Workloads (`--workload`):
  text          32 short English prompts (issue 3's CPU comparison; default)
  fixed:IN/OUT  random token-id prompts of IN tokens, exactly OUT new tokens each
  sharegpt      a long-tailed synthetic mix (~200 in / ~180 out on average)

Every request generates exactly its output length (ignore_eos on both sides). transformers runs
at each dtype of --hf-dtypes (default float32 and bfloat16), so the table shows the ratio against
its default (float32) and at matched precision. Roofline (roofline.py): each step must read the
weights plus the live KV cache (bytes / measured read bandwidth) and do 2 * params FLOPs per
token (FLOPs / measured matmul throughput); the ideal time of a run is the sum over its steps of
the larger of the two. Batch-1 decode (as `xlaserve bench latency` measures it) is reported in
ms/token against its roofline. Start-up (warm-up with an empty and with a filled compilation
cache, each in a fresh process) is measured with --startup.

    xlaserve bench throughput --startup                                 # issue 3, CPU
    xlaserve bench throughput --model llama-3-8b --load-format dummy --dtype bfloat16 \\
        --workload sharegpt --num-prompts 1000 --max-num-seqs 256 \\
        --max-num-batched-tokens 2048 --max-model-len 4096              # issue 8, one GPU

Writes OUT/throughput-MODEL-WORKLOAD-DTYPE-DEVICE-DATE.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from xlaserve.bench.common import (
    add_out_argument,
    build_llm,
    recording,
    slug,
    today,
    validated_main,
    write_results,
)
from xlaserve.bench.latency import measure_batch, measured_roofline, resolved_dtype
from xlaserve.bench.roofline import Roofline, device_name
from xlaserve.cli_args import add_engine_args, engine_args_from
from xlaserve.config import EngineArgs

ENGINE_DEFAULTS = dict(max_model_len=512, max_num_seqs=32, max_num_batched_tokens=256)
BATCH1_INPUT_LEN = BATCH1_OUTPUT_LEN = 128
TOPICS = [
    "the history of the printing press", "how volcanoes form", "the rules of chess",
    "why the sky is blue", "the life cycle of a butterfly", "how vaccines work",
    "the causes of the French Revolution", "how a transistor works", "the water cycle",
    "the plot of Hamlet", "how to bake bread", "the theory of evolution",
    "how airplanes fly", "the Roman Empire", "how the internet routes packets",
    "photosynthesis", "black holes", "the game of cricket", "how batteries store energy",
    "the Great Wall of China", "how compilers work", "the migration of birds",
    "the invention of the telephone", "plate tectonics", "how coffee is grown",
    "the Apollo program", "how a bill becomes law", "the structure of DNA",
    "how glaciers move", "the origins of jazz", "how bees make honey", "the Silk Road",
]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="text", help="text, fixed:IN/OUT or sharegpt")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64, help="for the text workload")
    parser.add_argument("--repeats", type=int, default=3, help="runs; the median is reported")
    parser.add_argument("--hf-dtypes", default="float32,bfloat16", help="comma-separated")
    parser.add_argument("--hf-batch", type=int, default=32, help="prompts per HF generate call")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers runs")
    parser.add_argument("--no-batch1", action="store_true", help="skip batch-1 decode")
    parser.add_argument("--startup", action="store_true", help="measure cold and warm start-up")
    add_out_argument(parser)
    add_engine_args(parser, defaults=ENGINE_DEFAULTS)


def validate(args: argparse.Namespace) -> None:
    engine_args_from(args)  # the engine options themselves
    if args.num_prompts < 1 or args.repeats < 1 or args.output_len < 1 or args.hf_batch < 1:
        raise ValueError(f"--num-prompts, --repeats, --output-len and --hf-batch must be "
                         f">= 1, got {args.num_prompts}, {args.repeats}, {args.output_len} and "
                         f"{args.hf_batch}")  # fmt: skip
    if not args.no_hf:
        bad = set(args.hf_dtypes.split(",")) - {"float32", "bfloat16"}
        if bad:
            raise ValueError(f"--hf-dtypes takes float32 and/or bfloat16, got {sorted(bad)}")
    spec = args.workload
    if spec not in ("text", "sharegpt") and not spec.startswith("fixed:"):
        raise ValueError(f"unknown workload {spec!r}: use text, fixed:IN/OUT or sharegpt")


def workload(spec: str, n: int, vocab: int, tokenizer, output_len: int, seed: int = 0):
    """(prompt token ids, output length of each) for the workload spec."""
    rng = np.random.default_rng(seed)
    if spec == "text":
        if tokenizer is None:
            raise ValueError("the text workload needs a model with a tokenizer")
        texts = [f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}." for i in range(n)]
        return [tokenizer(t)["input_ids"] for t in texts], [output_len] * n
    if spec.startswith("fixed:"):
        try:
            inp, out = (int(x) for x in spec.split(":", 1)[1].split("/"))
        except ValueError:
            raise ValueError(f"workload {spec!r}: expected fixed:IN/OUT") from None
        return [rng.integers(10, vocab, inp).tolist() for _ in range(n)], [out] * n
    if spec == "sharegpt":
        ins = np.clip(rng.lognormal(np.log(140), 0.8, n), 4, 1024).astype(int)
        outs = np.clip(rng.lognormal(np.log(130), 0.8, n), 4, 1024).astype(int)
        return [rng.integers(10, vocab, k).tolist() for k in ins], outs.tolist()
    raise ValueError(f"unknown workload {spec!r}: use text, fixed:IN/OUT or sharegpt")


# ---- xlaserve ------------------------------------------------------------------------------
def run_xlaserve(llm, prompts, out_lens, repeats: int, roofline: Roofline) -> dict:
    """Drives the engine step by step `repeats` times, recording every step's shape; the
    median run is reported, against the roofline of its steps."""
    from xlaserve import SamplingParams

    engine = llm.engine
    runs = []
    for _ in range(repeats):
        with recording(engine) as recorders:
            start = time.perf_counter()
            for ids, n in zip(prompts, out_lens, strict=True):
                params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                engine.add_request(None, {"prompt_token_ids": ids}, params)
            generated = 0
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        generated += sum(len(c.token_ids) for c in out.outputs)
            seconds = time.perf_counter() - start
        # Replicas run side by side: the run's ideal time is the slowest replica's.
        ideal = max(roofline.seconds(r.steps) for r in recorders)
        runs.append((seconds, generated, ideal))
    seconds, generated, ideal = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    m = llm.get_metrics()
    return {
        "seconds": seconds,
        "all_seconds": [r[0] for r in runs],
        "output_tokens": generated,
        "output_tokens_per_s": generated / seconds,
        "requests_per_s": len(prompts) / seconds,
        "compiles": m["compiles"],
        "compiles_after_warmup": m["compiles_after_warmup"],
        "warmup_seconds": m["warmup_seconds"],
        "roofline_seconds": ideal,
        "percent_of_roofline": 100 * ideal / seconds,
    }


def batch1_decode(llm, roofline: Roofline, seed: int = 0) -> dict:
    """Batch-1 decode of a 128-token prompt to 128 tokens (one run of `bench latency`)."""
    b = measure_batch(llm.engine, roofline, batch_size=1, input_len=BATCH1_INPUT_LEN,
                      output_len=BATCH1_OUTPUT_LEN, num_iters=1, seed=seed)  # fmt: skip
    return {"ms_per_token": b["ms_per_output_token"], "context": b["context"],
            "roofline_ms_per_token": b["roofline_ms_per_token"],
            "percent_of_roofline": b["percent_of_roofline"],
            "ttft_ms": b["ttft_ms"]["mean"]}  # fmt: skip


def startup(engine_args: EngineArgs, cache_dir: str) -> dict:
    """Start-up of the engine in a fresh process with this compilation cache folder."""
    options = dataclasses.asdict(dataclasses.replace(engine_args, compilation_cache_dir=cache_dir))
    code = (
        "import json, sys, time; t = time.perf_counter()\n"
        "from xlaserve import LLM\n"
        "llm = LLM(**json.loads(sys.argv[1]))\n"
        "m = llm.get_metrics()\n"
        "print(json.dumps({'ready_seconds': time.perf_counter() - t, "
        "'warmup_seconds': m['warmup_seconds'], 'compiles': m['compiles']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(options)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- transformers --------------------------------------------------------------------------
def run_transformers(engine_args: EngineArgs, prompts, out_lens, dtype_name: str,
                     hf_batch: int) -> dict:  # fmt: skip
    """HF generate on the same prompts (left-padded batches of `hf_batch`), greedy."""
    import torch
    from transformers import AutoModelForCausalLM

    from xlaserve.checkpoints.presets import resolve_bundled

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if engine_args.load_format == "dummy":
        model = hf_dummy(engine_args.model, dtype).to(device)
    else:
        path = resolve_bundled(engine_args.model)
        kw = dict(gguf_file=path.name) if path else {}
        folder = str(path.parent) if path else engine_args.model
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).to(device).eval()
    cache = "static" if device == "cuda" else None
    with torch.no_grad():
        start = time.perf_counter()
        generated = 0
        for i in range(0, len(prompts), hf_batch):
            batch, outs = prompts[i : i + hf_batch], out_lens[i : i + hf_batch]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch],
                                device=device)  # fmt: skip
            n = max(outs)
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, cache_implementation=cache,
                           pad_token_id=0)  # fmt: skip
            generated += sum(outs)  # tokens the requests asked for (HF pads shorter ones)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tokens": generated, "dtype": dtype_name,
            "output_tokens_per_s": generated / seconds, "device": device,
            "cache_implementation": cache or "dynamic"}  # fmt: skip


def hf_dummy(preset: str, dtype):
    """A transformers Llama with random weights of a dummy preset's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from xlaserve.models.registry import preset_config

    _, c = preset_config(preset)
    if c.architecture != "LlamaForCausalLM":
        raise ValueError("HF comparison with dummy weights supports Llama presets")
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                         intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                         num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                         head_dim=c.head_dim, rope_theta=c.rope_theta,
                         max_position_embeddings=c.max_position_embeddings,
                         tie_word_embeddings=c.tie_word_embeddings)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


# ---- entry points --------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    validate(args)
    engine_args = engine_args_from(args)
    dtype = resolved_dtype(engine_args.dtype)
    result = {"benchmark": "offline throughput", "date": today(), "device": device_name(),
              "model": engine_args.model, "load_format": engine_args.load_format,
              "dtype": dtype, "workload": args.workload, "num_prompts": args.num_prompts,
              "engine": dataclasses.asdict(engine_args)}  # fmt: skip
    if args.startup:
        with tempfile.TemporaryDirectory() as cache:
            result["startup_cold"] = startup(engine_args, cache)
            result["startup_warm"] = startup(engine_args, cache)
    llm = build_llm(engine_args)
    vocab, tokenizer = llm.engine.vocab_size, llm.get_tokenizer()
    prompts, out_lens = workload(args.workload, args.num_prompts, vocab, tokenizer,
                                 args.output_len, engine_args.seed)  # fmt: skip
    roofline, result["measured"] = measured_roofline(llm, dtype)
    ours = run_xlaserve(llm, prompts, out_lens, args.repeats, roofline)
    result["xlaserve"] = ours
    if not args.no_batch1:
        result["batch1_decode"] = batch1_decode(llm, roofline, engine_args.seed)
    if not args.no_hf:
        del llm  # free the engine's memory for transformers
        for hf_dtype in args.hf_dtypes.split(","):
            hf = run_transformers(engine_args, prompts, out_lens, hf_dtype, args.hf_batch)
            hf["ratio"] = ours["output_tokens_per_s"] / hf["output_tokens_per_s"]
            result.setdefault("transformers", []).append(hf)
    name = args.workload.replace(":", "").replace("/", "x")
    stem = (f"throughput-{Path(engine_args.model).name}-{name}-{dtype}-"
            f"{slug(result['device'])}-{result['date']}")  # fmt: skip
    path = write_results(args.out, stem, result, markdown(result))
    print(markdown(result))
    print(f"wrote {path.with_suffix('')}.{{json,md}}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return validated_main(add_arguments, validate, run, prog="xlaserve bench throughput",
                          doc=__doc__, argv=argv)  # fmt: skip


def markdown(r: dict) -> str:
    x, hfs = r["xlaserve"], r.get("transformers", [])
    ratios = " / ".join(f"{hf['ratio']:.2f}x {hf['dtype']}" for hf in hfs) or "-"
    lines = [
        f"# Throughput: {r['model']} ({r['dtype']}, {r['load_format']}) on {r['device']}, "
        f"{r['date']}", "",
        f"Workload {r['workload']}, {r['num_prompts']} prompts, greedy, every request runs to "
        f"its output length. Measured read bandwidth {r['measured']['read_bandwidth_GBps']:.1f} "
        f"GB/s, {r['dtype']} matmul {r['measured']['matmul_TFLOPs']:.3f} TFLOP/s.", "",
        "| engine | dtype | seconds | output tok/s | req/s | % of roofline | xlaserve ÷ this |",
        "|---|---|---|---|---|---|---|",
        f"| xlaserve | {r['dtype']} | {x['seconds']:.2f} | {x['output_tokens_per_s']:.1f} | "
        f"{x['requests_per_s']:.2f} | {x['percent_of_roofline']:.0f}% | {ratios} |",
    ]  # fmt: skip
    for hf in hfs:
        lines.append(
            f"| transformers generate ({hf['cache_implementation']} cache) | {hf['dtype']} | "
            f"{hf['seconds']:.2f} | {hf['output_tokens_per_s']:.1f} | - | - | "
            f"{hf['ratio']:.2f}x |"
        )
    lines += ["", f"Compiles: {x['compiles']} at warm-up, {x['compiles_after_warmup']} after."]
    if "batch1_decode" in r:
        b = r["batch1_decode"]
        lines.append(
            f"Batch-1 decode: {b['ms_per_token']:.2f} ms/token (roofline "
            f"{b['roofline_ms_per_token']:.2f} ms, {b['percent_of_roofline']:.0f}%; mean "
            f"context {b['context']:.0f} tokens)."
        )
    for key in ("startup_cold", "startup_warm"):
        if key in r:
            s = r[key]
            lines.append(f"Start-up ({key.split('_')[1]} compilation cache): ready in "
                         f"{s['ready_seconds']:.1f}s, warm-up {s['warmup_seconds']:.1f}s "
                         f"({s['compiles']} compiles).")  # fmt: skip
    return "\n".join(lines) + "\n"
