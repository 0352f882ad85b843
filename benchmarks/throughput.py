"""Offline throughput of xlaserve vs HF transformers `generate`, side by side in one run.

Default (issue 3): SmolLM2-135M-Instruct on this machine's CPU, 32 prompts x 64 new tokens,
greedy, every request generating exactly `--output-len` tokens (ignore_eos on both sides).
Also measures start-up: warm-up (compile) time with an empty persistent compilation cache
(cold) and again with the cache filled (warm), each in a fresh process.

    .venv/bin/python benchmarks/throughput.py                       # CPU defaults
    .venv/bin/python benchmarks/throughput.py --num-prompts 8 --output-len 16 --no-startup

Results go to benchmarks/results/throughput-<model>-<device>-<date>.json (and a .md table).
"""

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
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


def device_name() -> str:
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        cpu = "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        import os

        return f"{cpu} ({os.cpu_count()} cores)"
    return getattr(dev, "device_kind", dev.platform)


def make_prompts(n: int) -> list[str]:
    return [f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def startup(model: str, dtype: str, cache_dir: str, engine_kw: dict) -> dict:
    """Start-up of a fresh process: total seconds to a ready engine, warm-up seconds, compiles."""
    code = (
        "import json, time; t = time.perf_counter()\n"
        "from xlaserve import LLM\n"
        f"llm = LLM({model!r}, dtype={dtype!r}, compilation_cache_dir={cache_dir!r}, "
        f"**{engine_kw!r})\n"
        "m = llm.get_metrics()\n"
        "print(json.dumps({'ready_seconds': time.perf_counter() - t, "
        "'warmup_seconds': m['warmup_seconds'], 'compiles': m['compiles']}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_xlaserve(args, prompts, engine_kw) -> dict:
    from xlaserve import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, **engine_kw)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # touch every path
    times, tokens = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
        tokens = [o.outputs[0].token_ids for o in outs]
    m = llm.get_metrics()
    seconds = statistics.median(times)
    n_out = sum(len(t) for t in tokens)
    return {
        "seconds": seconds,
        "all_seconds": times,
        "output_tokens": n_out,
        "output_tokens_per_s": n_out / seconds,
        "requests_per_s": len(prompts) / seconds,
        "compiles": m["compiles"],
        "compiles_after_warmup": m["compiles_after_warmup"],
        "warmup_seconds": m["warmup_seconds"],
        "tokens": tokens,
    }


def run_transformers(args, prompts) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xlaserve.checkpoints.presets import resolve_bundled

    path = resolve_bundled(args.model)
    if path is not None:
        kw = dict(gguf_file=path.name)
        folder = str(path.parent)
    else:
        kw, folder = {}, args.model
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True)
    gen = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=2, do_sample=False)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = model.generate(**enc, **gen)
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    n_out = (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts)
    return {
        "seconds": seconds,
        "all_seconds": times,
        "output_tokens": n_out,
        "output_tokens_per_s": n_out / seconds,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--no-startup", action="store_true", help="skip the cold/warm start-up runs")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    args = p.parse_args()

    engine_kw = dict(
        max_model_len=args.max_model_len,
        max_num_seqs=args.num_prompts,
        max_num_batched_tokens=max(256, args.num_prompts),
    )
    prompts = make_prompts(args.num_prompts)
    result = {
        "benchmark": "offline throughput",
        "date": datetime.date.today().isoformat(),
        "device": device_name(),
        "python": platform.python_version(),
        "model": args.model,
        "dtype": args.dtype,
        "num_prompts": args.num_prompts,
        "output_len": args.output_len,
        "engine": engine_kw,
    }
    if not args.no_startup:
        with tempfile.TemporaryDirectory() as cache:
            result["startup_cold"] = startup(args.model, args.dtype, cache, engine_kw)
            result["startup_warm"] = startup(args.model, args.dtype, cache, engine_kw)
    ours = run_xlaserve(args, prompts, engine_kw)
    result["xlaserve"] = {k: v for k, v in ours.items() if k != "tokens"}
    if not args.no_hf:
        hf = run_transformers(args, prompts)
        result["transformers"] = hf
        result["ratio_output_tokens_per_s"] = (
            ours["output_tokens_per_s"] / hf["output_tokens_per_s"]
        )
    RESULTS.mkdir(exist_ok=True)
    device_slug = "cpu" if "cores" in result["device"] else result["device"].replace(" ", "-")
    stem = f"throughput-{args.model}-{device_slug}-{result['date']}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    x = r["xlaserve"]
    lines = [
        f"# Offline throughput: {r['model']} ({r['dtype']}) on {r['device']}, {r['date']}",
        "",
        f"{r['num_prompts']} prompts x {r['output_len']} new tokens, greedy, median of runs.",
        "",
        "| engine | seconds | output tok/s | ratio |",
        "|---|---|---|---|",
    ]
    hf = r.get("transformers")
    ratio = r.get("ratio_output_tokens_per_s")
    lines.append(
        f"| xlaserve | {x['seconds']:.2f} | {x['output_tokens_per_s']:.1f} | "
        f"{ratio:.2f}x |" if ratio else
        f"| xlaserve | {x['seconds']:.2f} | {x['output_tokens_per_s']:.1f} | - |"
    )  # fmt: skip
    if hf:
        lines.append(
            f"| transformers generate | {hf['seconds']:.2f} | {hf['output_tokens_per_s']:.1f} "
            "| 1.00x |"
        )
    lines += [
        "",
        f"Compiles: {x['compiles']} at warm-up, {x['compiles_after_warmup']} after warm-up.",
    ]
    for key in ("startup_cold", "startup_warm"):
        if key in r:
            s = r[key]
            lines.append(
                f"Start-up ({key.split('_')[1]} compilation cache): ready in "
                f"{s['ready_seconds']:.1f}s, of which warm-up {s['warmup_seconds']:.1f}s "
                f"({s['compiles']} compiles)."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
