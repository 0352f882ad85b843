"""Structured outputs: what a constraint costs the engine.

1. Decode step time with --batch-size constrained rows (a JSON schema) against the same number of
   unconstrained rows, in one run, alternating --repeats times: only steps in which every row
   decodes are timed (the ratio the constraint costs; target <= 1.10x), plus the host time spent
   filling bitmask rows and how much of it hid behind the forward pass.
2. Grammar compile time, cold (first request with a new schema) vs cached (the same schema).
3. Time to first token of one constrained request with a new schema arriving while
   --batch-size - 1 unconstrained requests decode, against the same request unconstrained.

    xlaserve bench structured --batch-size 32 --output-len 48
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

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

DEFAULTS = dict(max_model_len=512, max_num_seqs=32, max_num_batched_tokens=512)
# Open-ended enough that rows keep decoding for --output-len tokens (an array of records).
SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "city": {"type": "string", "maxLength": 24},
                },
                "required": ["name", "age", "city"],
            },
            "minItems": 8,
        }
    },
    "required": ["people"],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, defaults=DEFAULTS)
    p.add_argument("--batch-size", type=int, default=32, help="rows decoding together")
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens (random ids)")
    p.add_argument("--output-len", type=int, default=48, help="tokens per request")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds")
    add_out_argument(p)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(10, vocab, length).tolist()} for _ in range(n)]


def compile_seconds(llm, schema: dict) -> tuple[float, float]:
    """(cold, cached) seconds from submitting a request with `schema` until it may run."""
    manager = llm.engine.structured
    params = SamplingParams(structured_outputs={"json": schema}).structured_outputs
    results = []
    for i in range(2):
        start = time.perf_counter()
        manager.submit(f"bench-compile-{i}", params, [])
        while True:
            ready, failed = manager.poll()
            if ready or failed:
                break
            manager.wait(0.001)
        results.append(time.perf_counter() - start)
    return results[0], results[1]


def ttft_seconds(llm, prompts: list[dict], constrained: SamplingParams, free: SamplingParams):
    """Time to the first token of one request (`constrained`) that arrives while the other
    prompts decode (`free`)."""
    engine = llm.engine
    for prompt in prompts[1:]:
        engine.add_request(None, prompt, free)
    for _ in range(3):  # the others are decoding
        engine.step()
    start = time.perf_counter()
    rid = engine.add_request(None, prompts[0], constrained)
    first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None and out.request_id == rid and out.outputs[0].token_ids:
                first = time.perf_counter() - start
        if first is not None:
            for request_id in list(engine.requests):
                engine.abort_request(request_id)
    return first


def run(a: argparse.Namespace) -> int:
    args = engine_args_from(a)
    llm = build_llm(args)
    vocab = llm.engine.vocab_size
    n = a.batch_size
    free = SamplingParams(temperature=0.8, seed=1, max_tokens=a.output_len, ignore_eos=True)
    json_params = SamplingParams(
        temperature=0.8, seed=1, max_tokens=a.output_len, structured_outputs={"json": SCHEMA}
    )
    rounds = {"unconstrained": [], "json_schema": []}
    manager = llm.engine.structured
    fill0, wait0 = manager.stats.bitmask_seconds, manager.stats.bitmask_wait_seconds
    for r in range(a.repeats):
        for name, params in (("unconstrained", free), ("json_schema", json_params)):
            prompts = _prompts(n, a.input_len, vocab, seed=100 * r + len(name))
            rounds[name] += decode_step_seconds(llm, prompts, params)
    fill = manager.stats.bitmask_seconds - fill0
    wait = manager.stats.bitmask_wait_seconds - wait0
    medians = {k: statistics.median(v) for k, v in rounds.items()}
    cold, cached = compile_seconds(llm, {**SCHEMA, "title": f"cold-{time.time_ns()}"})
    prompts = _prompts(n, a.input_len, vocab, seed=7)
    first = SamplingParams(temperature=0, max_tokens=8)
    ttft_seconds(llm, prompts, first, free)  # unmeasured: every shape of this step runs once
    ttft_json, ttft_free = [], []
    for r in range(a.repeats):
        schema = {**SCHEMA, "title": f"ttft-{r}-{time.time_ns()}"}  # a grammar never seen
        json_first = SamplingParams(
            temperature=0, max_tokens=8, structured_outputs={"json": schema}
        )
        ttft_json.append(ttft_seconds(llm, prompts, json_first, free))
        ttft_free.append(ttft_seconds(llm, prompts, first, free))
    ttft_json, ttft_free = statistics.median(ttft_json), statistics.median(ttft_free)
    metrics = llm.get_metrics()
    result = {
        "benchmark": "structured outputs",
        "date": today(),
        "device": device_name(),
        "model": args.model,
        "grammar_backend": llm.engine.structured_outputs_backend,
        "batch_size": n,
        "input_len": a.input_len,
        "output_len": a.output_len,
        "decode_step_ms": {k: 1e3 * v for k, v in medians.items()},
        "decode_steps_timed": {k: len(v) for k, v in rounds.items()},
        "step_ratio": medians["json_schema"] / medians["unconstrained"],
        "bitmask_fill_ms_per_step": 1e3 * fill / max(1, len(rounds["json_schema"])),
        # Host time filling rows (mask thread) / time the step then waited for them after
        # dispatching the forward (the rest ran while the forward did).
        "bitmask_wait_ms_per_step": 1e3 * wait / max(1, len(rounds["json_schema"])),
        "compile_ms": {"cold": 1e3 * cold, "cached": 1e3 * cached},
        "ttft_ms": {"json_schema_new": 1e3 * ttft_json, "unconstrained": 1e3 * ttft_free},
        "compiles_after_warmup": metrics["compiles_after_warmup"],
    }
    stem = f"structured-{slug(args.model.split('/')[-1])}-bs{n}-{slug(result['device'])}-{today()}"
    path = write_results(a.out, stem, result, markdown(result))
    print(json.dumps(result, indent=2))
    print(f"wrote {path.with_suffix('')}.{{json,md}}")
    return 0


def markdown(r: dict) -> str:
    d, c, t = r["decode_step_ms"], r["compile_ms"], r["ttft_ms"]
    return "\n".join(
        [
            f"# Structured outputs: {r['model']} on {r['device']}, {r['date']}",
            "",
            f"{r['batch_size']} rows decoding together ({r['input_len']} prompt tokens, up to "
            f"{r['output_len']} output tokens), grammar backend {r['grammar_backend']}; medians "
            f"over {r['decode_steps_timed']['json_schema']} constrained and "
            f"{r['decode_steps_timed']['unconstrained']} unconstrained all-decode steps.",
            "",
            "| measure | unconstrained | JSON schema | ratio |",
            "|---|---|---|---|",
            f"| decode step ms | {d['unconstrained']:.1f} | {d['json_schema']:.1f} | "
            f"{r['step_ratio']:.2f}x |",
            f"| TTFT ms (one request joining {r['batch_size'] - 1} decoding) | "
            f"{t['unconstrained']:.1f} | {t['json_schema_new']:.1f} (new schema) | "
            f"{t['json_schema_new'] / t['unconstrained']:.2f}x |",
            "",
            f"Bitmask filling: {r['bitmask_fill_ms_per_step']:.2f} ms of host time per "
            f"constrained step on the mask thread; the step waited "
            f"{r['bitmask_wait_ms_per_step']:.2f} ms for it after dispatching the forward.",
            f"Grammar compile: {c['cold']:.2f} ms cold, {c['cached']:.3f} ms cached.",
            f"Compiles after warm-up: {r['compiles_after_warmup']}.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xlaserve bench structured", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(p)
    return run(p.parse_args(argv))
