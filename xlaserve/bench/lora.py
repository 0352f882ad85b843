"""Multi-LoRA: what serving adapters costs the engine.

1. Decode step time with --batch-size rows spread over --num-adapters distinct adapters of rank
   --rank (all seven target modules), against the same rows on the base model in an engine
   without LoRA, in one run, alternating --repeats times; also the base rows in the LoRA
   engine (the adapter path with every token on the empty slot). Only steps in which every row
   decodes are timed. Target: adapters <= 1.3x the engine without LoRA.
2. Adapter load time: PEFT folder on disk -> the engine's host form (read, validate, pad,
   hash), and host -> a device slot (the jitted slot write).

Adapters are PEFT folders with random weights written to a temporary folder (SmolLM2's shapes
come from the model), so nothing is downloaded.

    xlaserve bench lora --batch-size 32 --num-adapters 8 --rank 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from xlaserve.bench.common import (
    add_out_argument,
    build_llm,
    decode_step_seconds,
    slug,
    today,
    write_results,
)
from xlaserve.bench.roofline import device_name
from xlaserve.cli_args import add_engine_args, engine_args_from
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.lora.adapter import TARGET_MODULES, module_shapes
from xlaserve.lora.request import LoRARequest

DEFAULTS = dict(max_model_len=512, max_num_seqs=32, max_num_batched_tokens=512, max_loras=8)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, defaults=DEFAULTS)  # the LoRA engine gets enable_lora and room below
    p.add_argument("--batch-size", type=int, default=32, help="rows decoding together")
    p.add_argument("--num-adapters", type=int, default=8, help="distinct adapters in the batch")
    p.add_argument("--rank", type=int, default=16, help="rank of every adapter")
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens (random ids)")
    p.add_argument("--output-len", type=int, default=32, help="tokens per request")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds")
    add_out_argument(p)


def write_peft_folder(folder: Path, config, rank: int, seed: int) -> None:
    """A PEFT adapter folder with random A and B on all seven modules of every layer."""
    rng = np.random.default_rng(seed)
    shapes = module_shapes(config)
    tensors = {}
    for ours, (module, block) in TARGET_MODULES.items():
        d_in, d_out = shapes[ours]
        for layer in range(config.num_layers):
            key = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{key}.lora_A.weight"] = 0.02 * rng.standard_normal((rank, d_in), np.float32)
            tensors[f"{key}.lora_B.weight"] = 0.02 * rng.standard_normal((d_out, rank), np.float32)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config_json = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                   "target_modules": [m for m, _ in TARGET_MODULES.values()]}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config_json))


def load_seconds(llm, requests: list[LoRARequest]) -> tuple[list[float], list[float]]:
    """(disk -> host, host -> device slot) seconds per adapter."""
    engine, disk, device = llm.engine, [], []
    steps = engine.runner.steps
    for i, request in enumerate(requests):
        start = time.perf_counter()
        engine.add_lora(request)
        disk.append(time.perf_counter() - start)
        adapter = engine.lora.get(request.lora_name)
        slot = 1 + i % engine.runner.config.max_loras
        start = time.perf_counter()
        steps.write_lora_slot(slot, adapter)
        jax.block_until_ready(steps.lora_weights)
        device.append(time.perf_counter() - start)
    return disk, device


def run(a: argparse.Namespace) -> int:
    args = engine_args_from(a)
    n, k = a.batch_size, a.num_adapters
    plain = build_llm(dataclasses.replace(args, enable_lora=False))
    max_loras = max(args.max_loras, k)
    lora_args = dataclasses.replace(args, enable_lora=True, max_loras=max_loras,
                                    max_lora_rank=max(args.max_lora_rank, a.rank),
                                    max_cpu_loras=max(args.max_cpu_loras or 0, 2 * k))  # fmt: skip
    lora = build_llm(lora_args)
    config = lora.engine.runner.steps.lora.config
    folder = Path(tempfile.mkdtemp(prefix="xlaserve-lora-bench-"))
    requests = []
    for i in range(2 * k):  # k served in the batch, k more only loaded (load time)
        write_peft_folder(folder / f"a{i}", config, a.rank, seed=i)
        requests.append(LoRARequest(f"a{i}", i + 1, str(folder / f"a{i}")))
    disk, device = load_seconds(lora, requests[k:])
    vocab = lora.engine.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True)
    rng = np.random.default_rng(0)
    rounds = {"base_no_lora_engine": [], "base_in_lora_engine": [], "adapters": []}
    for _ in range(a.repeats):
        prompts = [{"prompt_token_ids": rng.integers(10, vocab, a.input_len).tolist()}
                   for _prompt in range(n)]  # fmt: skip
        rounds["base_no_lora_engine"] += decode_step_seconds(plain, prompts, params, [None] * n)
        rounds["base_in_lora_engine"] += decode_step_seconds(lora, prompts, params, [None] * n)
        loras = [requests[i % k] for i in range(n)]
        rounds["adapters"] += decode_step_seconds(lora, prompts, params, loras)
    medians = {name: statistics.median(v) for name, v in rounds.items()}
    base = medians["base_no_lora_engine"]
    result = {
        "benchmark": "multi-LoRA",
        "date": today(),
        "device": device_name(),
        "model": args.model,
        "dtype": lora.engine.dtype,
        "batch_size": n,
        "num_adapters": k,
        "rank": a.rank,
        "max_loras": max_loras,
        "decode_step_ms": {name: 1e3 * v for name, v in medians.items()},
        "decode_steps_timed": {name: len(v) for name, v in rounds.items()},
        "step_ratio_adapters_vs_no_lora": medians["adapters"] / base,
        "step_ratio_lora_engine_base_vs_no_lora": medians["base_in_lora_engine"] / base,
        "load_ms_disk_to_host": {
            "median": 1e3 * statistics.median(disk),
            "max": 1e3 * max(disk),
        },  # fmt: skip
        "load_ms_host_to_device_slot": {
            "median": 1e3 * statistics.median(device),
            "max": 1e3 * max(device),
        },  # fmt: skip
        "adapter_bytes_on_disk": sum(f.stat().st_size for f in (folder / "a0").iterdir()),
        "compiles_after_warmup": lora.get_metrics()["compiles_after_warmup"],
        "note": "The CPU is shared with other work while this runs: ratios are measured "
        "within one run, alternating rounds",
    }
    model = slug(args.model.split("/")[-1])
    stem = f"lora-{model}-bs{n}-{k}x-r{a.rank}-{slug(result['device'])}-{today()}"
    path = write_results(a.out, stem, result, markdown(result))
    print(json.dumps(result, indent=2))
    print(f"wrote {path.with_suffix('')}.{{json,md}}")
    return 0


def markdown(r: dict) -> str:
    d = r["decode_step_ms"]
    disk, dev = r["load_ms_disk_to_host"], r["load_ms_host_to_device_slot"]
    return "\n".join(
        [
            f"# Multi-LoRA: {r['model']} ({r['dtype']}) on {r['device']}, {r['date']}",
            "",
            f"{r['batch_size']} rows decoding together, {r['num_adapters']} distinct adapters "
            f"of rank {r['rank']} on all seven target modules (max_loras {r['max_loras']}); "
            f"medians over {r['decode_steps_timed']['adapters']} all-decode steps each. "
            f"{r['note']}.",
            "",
            "| decode step | ms | vs engine without LoRA |",
            "|---|---|---|",
            f"| base model, engine without LoRA | {d['base_no_lora_engine']:.1f} | 1.00x |",
            f"| base model, LoRA engine | {d['base_in_lora_engine']:.1f} | "
            f"{r['step_ratio_lora_engine_base_vs_no_lora']:.2f}x |",
            f"| {r['num_adapters']} adapters | {d['adapters']:.1f} | "
            f"{r['step_ratio_adapters_vs_no_lora']:.2f}x |",
            "",
            f"Adapter load ({r['adapter_bytes_on_disk'] / 1e6:.1f} MB safetensors): disk -> host "
            f"{disk['median']:.0f} ms median (max {disk['max']:.0f}); host -> device slot "
            f"{dev['median']:.1f} ms median (max {dev['max']:.1f}). Compiles after warm-up: "
            f"{r['compiles_after_warmup']}.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xlaserve bench lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(p)
    return run(p.parse_args(argv))
