"""Speculative decoding: output tokens/s with and without drafts, in one run.

Three engines on the same model and options: plain decoding, n-gram drafts and (with
--draft-model) a draft model. Each workload's 8 prompts run on each engine alternately,
--repeats times, greedy, at each --batch-sizes (batch b: 8 / b rounds of b concurrent
requests, so every batch size sees the same prompts); the best time of each is kept (the least
disturbed). Workloads:
"repetitive" (copying lists, editing code: text that repeats its context, where prompt lookup
shines) and "chat" (ordinary chat questions under the chat template). Acceptance rates come from
the engines' counters over the timed runs.

    xlaserve bench spec --batch-sizes 1,8 --output-len 96 --draft-model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import time

from xlaserve.bench.common import add_out_argument, build_llm, slug, today, write_results
from xlaserve.bench.roofline import device_name
from xlaserve.cli_args import add_engine_args, engine_args_from
from xlaserve.engine.sampling_params import SamplingParams

NUM_PROMPTS = 8  # per workload, at every batch size
DEFAULTS = dict(max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=512)
CODE = '''def moving_average(values, window):
    """Average of each window of values."""
    result = []
    total = 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        if index + 1 >= window:
            result.append(total / window)
    return result
'''
REPETITIVE = [
    f"Rename the variable `total` to `running_sum` in this code and print the whole "
    f"code again.\n\n{CODE}\nHere is the code with `total` renamed:\n\n",
    "Copy the list exactly.\nList: apple, banana, cherry, date, elderberry, fig, grape, "
    "honeydew, kiwi, lemon, mango, nectarine, orange, papaya, quince, raspberry.\nCopy:",
    f"Add type hints to this function and print the whole function.\n\n{CODE}\n"
    "With type hints:\n\n",
    "Count from 1 to 60, separated by commas: 1, 2, 3, 4, 5,",
    "Repeat this sentence five times: The quick brown fox jumps over the lazy dog.\n1.",
    f"Fix the indentation of this code and print it unchanged otherwise.\n\n{CODE}\n",
    "Write the alphabet in capital letters separated by spaces, twice: A B C D E",
    "Copy the table exactly.\n| name | age |\n| Ann | 31 |\n| Bob | 27 |\n| Cy | 45 |\n"
    "| Dee | 38 |\nCopy:\n| name | age |\n",
]
CHAT = [
    "What are three tips for staying focused while studying?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a short poem about the sea.",
    "What is the difference between a list and a tuple in Python?",
    "Give me a recipe idea for a quick vegetarian dinner.",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot and explain why.",
    "How do I politely decline a meeting invitation?",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, defaults=DEFAULTS, skip=("speculative_config",))
    p.add_argument("--batch-sizes", default="1,8", help="concurrent requests per run")
    p.add_argument("--output-len", type=int, default=96, help="tokens generated per request")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="k for every method")
    p.add_argument("--draft-model", default=None, help="a draft checkpoint sharing the tokenizer")
    p.add_argument("--draft-batch-sizes", default="1", help="batch sizes for the draft model")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per engine and workload")
    add_out_argument(p)


def _prompts(llm, workload: str, n: int) -> list:
    texts = REPETITIVE if workload == "repetitive" else CHAT
    picked = [texts[i % len(texts)] for i in range(n)]
    if workload == "chat":
        tok = llm.get_tokenizer()
        return [{"prompt": tok.apply_chat_template([{"role": "user", "content": t}],
                                                    tokenize=False, add_generation_prompt=True)}
                for t in picked]  # fmt: skip
    return picked


def _timed(llm, prompts, params, size: int) -> tuple[float, int]:
    """All prompts, `size` at a time: (seconds, output tokens)."""
    begin, tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), size):
        outputs = llm.generate(prompts[i : i + size], params, use_tqdm=False)
        tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
    return time.perf_counter() - begin, tokens


def _counters(llm) -> tuple[int, int]:
    m = llm.get_metrics()
    return m.get("spec_decode_num_draft_tokens", 0), m.get("spec_decode_num_accepted_tokens", 0)


def run(a: argparse.Namespace) -> int:
    k = a.num_speculative_tokens
    model = engine_args_from(a).model
    engines = {"none": build_llm(engine_args_from(a))}
    engines["ngram"] = build_llm(engine_args_from(a, speculative_config={
        "method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2,
        "prompt_lookup_max": 5}))  # fmt: skip
    if a.draft_model:
        draft = {"method": "draft_model", "model": a.draft_model, "num_speculative_tokens": k}
        engines["draft_model"] = build_llm(engine_args_from(a, speculative_config=draft))
    params = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=False)
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    draft_sizes = [int(x) for x in a.draft_batch_sizes.split(",")]
    rows = []
    for workload in ("repetitive", "chat"):
        for size in sizes:
            prompts = _prompts(engines["none"], workload, max(size, NUM_PROMPTS))
            methods = [m for m in engines if m != "draft_model" or size in draft_sizes]
            for m in methods:  # warm the prefix cache and the detokenizer alike for all
                engines[m].generate(prompts, params, use_tqdm=False)
            best = {m: None for m in methods}
            before = {m: _counters(engines[m]) for m in methods}
            for _ in range(a.repeats):
                for m in methods:
                    seconds, tokens = _timed(engines[m], prompts, params, size)
                    if best[m] is None or seconds < best[m][0]:
                        best[m] = (seconds, tokens)
            for m in methods:
                drafted, accepted = (x - y for x, y in zip(_counters(engines[m]), before[m],
                                                           strict=True))  # fmt: skip
                seconds, tokens = best[m]
                rows.append({
                    "workload": workload, "batch_size": size, "method": m,
                    "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                    "draft_tokens": drafted, "accepted_tokens": accepted,
                    "acceptance_rate": accepted / drafted if drafted else None,
                })  # fmt: skip
    base = {(r["workload"], r["batch_size"]): r["tokens_per_s"] for r in rows
            if r["method"] == "none"}  # fmt: skip
    for r in rows:
        r["ratio_vs_none"] = r["tokens_per_s"] / base[(r["workload"], r["batch_size"])]
    device = device_name()
    result = {
        "benchmark": "spec_decode", "model": model, "device": device, "date": today(),
        "num_speculative_tokens": k, "output_len": a.output_len, "repeats": a.repeats,
        "draft_model": a.draft_model, "rows": rows,
        "compiles_after_warmup": {m: e.get_metrics()["compiles_after_warmup"]
                                  for m, e in engines.items()},
    }  # fmt: skip
    stem = f"spec-decode-{slug(model)}-{slug(device)}-{today()}"
    path = write_results(a.out, stem, result, markdown(result))
    print(markdown(result))
    print(f"results: {path}")
    return 0


def markdown(r: dict) -> str:
    lines = [
        f"# Speculative decoding: {r['model']} on {r['device']}, {r['date']}",
        "",
        f"Greedy, {r['output_len']} output tokens per request, k = {r['num_speculative_tokens']}"
        f" drafts; best of {r['repeats']} alternating runs per engine. Draft model: "
        f"{r['draft_model'] or 'none'}.",
        "",
        "| workload | batch | method | output tok/s | vs no speculation | acceptance |",
        "|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        acc = "-" if x["acceptance_rate"] is None else f"{x['acceptance_rate']:.2f}"
        lines.append(f"| {x['workload']} | {x['batch_size']} | {x['method']} | "
                     f"{x['tokens_per_s']:.1f} | {x['ratio_vs_none']:.2f}x | {acc} |")  # fmt: skip
    lines += ["", f"Compiles after warm-up: {r['compiles_after_warmup']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xlaserve bench spec", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(p)
    return run(p.parse_args(argv))
