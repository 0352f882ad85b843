"""Online serving benchmark: requests arrive as a Poisson process at each --request-rate (req/s;
`inf` sends them all at once), or --concurrency N keeps N in flight, against xlaserve's gRPC API
(our asyncio client) or its OpenAI HTTP API (streaming /v1/completions over httpx).

Every request is greedy and asks for exactly --output-len tokens (ignore_eos: gRPC
SamplingParams and the HTTP server's vLLM extras both take it). Prompts are random token ids of
--input-len tokens (fresh ones for every run, so no run hits the prefix cache of another), or
short text prompts (--prompt-kind text; their lengths are whatever the tokenizer makes).

Per request, timed on the client from just before the call: TTFT (first streamed message with
an output token), TPOT ((e2e - ttft) / (tokens - 1)), inter-token latencies (the gap before each
later message; a gRPC message carrying k tokens counts k gaps of gap/k; an HTTP chunk carries no
token count, so it counts one) and end-to-end latency. Reported: mean/p50/p90/p99 of each,
request and output-token throughput over the run (first send to last completion), and the CPU
cores kept busy meanwhile (by the machine and by this process: other jobs show up there).
Protocols alternate within each load, with the same arrival times, so both see the same
background load.

Engine, per run (counter differences): steps, step seconds and device seconds (a step's first
dispatch until its sampled tokens reach the host); host overhead share = (step - device) / step.
Served in-process, the engine loop is also timed around each step: the gaps between back-to-back
steps while requests remain (the serving loop's own work: delivering outputs, adding requests)
and the idle time with nothing to run. From a remote server only the time outside steps
(run time - step time) is measurable, not its split into idle and loop work.

Targets: a running server (--grpc-target / --http-url, --api-key; engine counters are scraped
from --metrics-url, default the HTTP URL's /metrics), or one started in this process on --model
(the client then shares this process's cores and GIL with the server).

    .venv/bin/python benchmarks/serving.py --model smollm2-135m-instruct --dtype float32 \\
        --max-model-len 512 --num-prompts 32 --input-len 64 --output-len 32 \\
        --request-rate 2,8,inf --concurrency 8 --protocol grpc,http
    .venv/bin/python benchmarks/serving.py --grpc-target 127.0.0.1:50051 \\
        --http-url http://127.0.0.1:8000 --api-key secret --request-rate 1,2,4,inf

Writes benchmarks/results/serving-MODEL-...-DEVICE-DATE.{json,md,png} (--out to change).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

RESULTS = Path(__file__).parent / "results"
TOPICS = ("the printing press", "volcanoes", "chess", "the blue sky", "butterflies", "vaccines",
          "transistors", "the water cycle", "bread", "airplanes", "glaciers")  # fmt: skip
PERCENTILES = (50, 90, 99)


# ---- per request ---------------------------------------------------------------------------
@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    messages: int = 0  # streamed messages that carried output tokens
    ttft: float = 0.0  # seconds
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


class _Timer:
    """Times one request's streamed messages into a RequestResult."""

    def __init__(self) -> None:
        self.result = RequestResult()
        self.start = self.last = time.perf_counter()

    def message(self, num_tokens: int) -> None:
        now, r = time.perf_counter(), self.result
        if num_tokens <= 0:
            return
        if r.messages == 0:
            r.ttft = now - self.start
        else:
            r.itl.extend([(now - self.last) / num_tokens] * num_tokens)
        r.messages += 1
        self.last = now
        r.e2e = now - self.start

    def done(self, output_tokens: int, prompt_tokens: int) -> RequestResult:
        self.result.ok = True
        self.result.output_tokens = output_tokens
        self.result.prompt_tokens = prompt_tokens
        return self.result


async def grpc_request(client, prompt, output_len: int) -> RequestResult:
    timer, tokens, prompt_tokens = _Timer(), 0, 0
    params = dict(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    async for response in client.generate_stream(prompt, **params):
        k = sum(len(s.token_ids) for s in response.samples)
        timer.message(k)
        tokens += k
        prompt_tokens = response.usage.prompt_tokens or prompt_tokens
    return timer.done(tokens, prompt_tokens)


async def http_request(http: httpx.AsyncClient, url: str, prompt, output_len: int,
                       headers: dict) -> RequestResult:  # fmt: skip
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    timer, usage = _Timer(), None
    async with http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            usage = chunk.get("usage") or usage
            if chunk["choices"]:  # every choice chunk carries >= 1 new token
                timer.message(1)
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return timer.done(usage["completion_tokens"], usage["prompt_tokens"])


async def guarded(send, prompt) -> RequestResult:
    try:
        return await send(prompt)
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        return RequestResult(error=f"{type(e).__name__}: {e}"[:300])


# ---- load ----------------------------------------------------------------------------------
def make_prompts(args, n: int, stream: int, tag: str) -> list:
    if args.prompt_kind == "text":  # the tag first: no two prompts share a full KV page
        return [f"[{tag}-{i}] Write a short paragraph about {TOPICS[i % len(TOPICS)]}."
                for i in range(n)]  # fmt: skip
    if not args.vocab_size:
        raise ValueError("token-id prompts need the vocabulary size: pass --vocab-size")
    rng = np.random.default_rng([args.seed, stream])
    return [rng.integers(10, args.vocab_size, args.input_len).tolist() for _ in range(n)]


async def drive(send, prompts: list, *, rate: float, concurrency: int | None,
                seed) -> tuple[list[RequestResult], float]:  # fmt: skip
    """Sends the prompts at Poisson arrival times (rate req/s; inf: all at once), at most
    `concurrency` in flight; returns the results and the run's duration in seconds."""
    n = len(prompts)
    gaps = np.random.default_rng(seed).exponential(1 / rate, n) if rate < math.inf else np.zeros(n)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    limit = asyncio.Semaphore(concurrency) if concurrency else None

    async def one(prompt):
        if limit is None:
            return await guarded(send, prompt)
        async with limit:  # timed from when it is sent, not from when it queued here
            return await guarded(send, prompt)

    start = time.perf_counter()
    tasks = []
    for prompt, at in zip(prompts, arrivals, strict=True):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(prompt)))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


# ---- engine counters -----------------------------------------------------------------------
class StepClock:
    """Stands in for the engine an in-process AsyncEngine drives: times every step() on the
    engine thread, and the gaps between steps while requests remain (the loop's own work)."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.reset()

    def reset(self) -> None:
        self.steps, self.step_seconds, self.busy_gap_seconds = 0, 0.0, 0.0
        self._busy_since: float | None = None  # end of the last step, if work remained

    def step(self):
        start = time.perf_counter()
        if self._busy_since is not None:
            self.busy_gap_seconds += start - self._busy_since
        try:
            return self._engine.step()
        finally:
            end = time.perf_counter()
            self.steps += 1
            self.step_seconds += end - start
            self._busy_since = end if self._engine.has_unfinished_requests() else None

    def __getattr__(self, name):
        return getattr(self._engine, name)


_SCRAPED = {"xlaserve_engine_steps_total": "steps",
            "xlaserve_engine_step_seconds_total": "step_seconds",
            "xlaserve_engine_device_seconds_total": "device_seconds",
            "xlaserve_compiles_after_warmup_total": "compiles_after_warmup",
            "xlaserve_num_requests_running": "num_running",
            "xlaserve_num_requests_waiting": "num_waiting"}  # fmt: skip


async def scrape(http: httpx.AsyncClient, url: str, headers: dict) -> dict:
    """The engine counters in a server's Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    resp = await http.get(url, headers=headers)
    resp.raise_for_status()
    families = text_string_to_metric_families(resp.text)
    return {_SCRAPED[s.name]: s.value for f in families for s in f.samples if s.name in _SCRAPED}


async def settled(read) -> dict:
    """Counters once the engine has nothing running or waiting (its last step is counted)."""
    deadline = time.monotonic() + 30
    while True:
        m = await read()
        if (not m.get("num_running") and not m.get("num_waiting")) or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.01)


def engine_summary(before: dict, after: dict, duration: float, clock: StepClock | None) -> dict:
    if "step_seconds" not in after:
        return {"available": False, "why": "the server exposes no xlaserve_engine_* counters"}
    d = {k: after.get(k, 0) - before.get(k, 0) for k in _SCRAPED.values()}
    steps, step_s, device_s = int(d["steps"]), d["step_seconds"], d["device_seconds"]
    host_s = step_s - device_s
    out = {"available": True, "steps": steps, "step_seconds": step_s, "device_seconds": device_s,
           "host_seconds": host_s, "host_overhead_share": host_s / step_s if step_s else None,
           "mean_step_ms": 1e3 * step_s / steps if steps else None,
           "mean_host_ms": 1e3 * host_s / steps if steps else None,
           "outside_step_seconds": max(duration - step_s, 0.0),
           "compiles_after_warmup": int(d["compiles_after_warmup"])}  # fmt: skip
    if clock is not None:  # in-process: the loop's gaps between steps, and its idle time
        gaps, n, step_s = clock.busy_gap_seconds, clock.steps, clock.step_seconds
        idle = max(duration - step_s - gaps, 0.0)
        out["loop"] = {"steps": n, "step_seconds": step_s, "busy_gap_seconds": gaps,
                       "mean_busy_gap_ms": 1e3 * gaps / n if n else None,
                       "busy_gap_share": gaps / (gaps + step_s) if step_s else None,
                       "idle_seconds": idle, "idle_share": idle / duration}  # fmt: skip
    return out


def cpu_sample() -> tuple | None:
    """(machine busy jiffies, machine total jiffies, this process's CPU seconds, time)."""
    try:
        jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    t = os.times()
    return sum(jiffies) - jiffies[3] - jiffies[4], sum(jiffies), t.user + t.system, time.time()


def cpu_usage(a: tuple | None, b: tuple | None) -> dict | None:
    """Cores kept busy during a run: by the whole machine, and by this process alone."""
    if a is None or b is None or b[1] == a[1]:
        return None
    cores = os.cpu_count() or 1
    return {"cores": cores, "machine_busy_cores": cores * (b[0] - a[0]) / (b[1] - a[1]),
            "this_process_cores": (b[2] - a[2]) / (b[3] - a[3])}  # fmt: skip


# ---- runs ----------------------------------------------------------------------------------
def dist(values: list[float]) -> dict | None:
    """mean / p50 / p90 / p99 in milliseconds."""
    if not values:
        return None
    ms = 1e3 * np.asarray(values)
    return {"mean": float(ms.mean()), **{f"p{q}": float(np.percentile(ms, q)) for q in PERCENTILES}}


def summarize(results: list[RequestResult], duration: float, output_len: int) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens, messages = sum(r.output_tokens for r in ok), sum(r.messages for r in ok)
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5], "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "output_tokens_exact": all(r.output_tokens == output_len for r in ok),
        "tokens_per_message": out_tokens / messages if messages else None,
        "ttft_ms": dist([r.ttft for r in ok]),
        "tpot_ms": dist([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": dist([x for r in ok for x in r.itl]),
        "e2e_ms": dist([r.e2e for r in ok]),
        "requests": [{k: v for k, v in asdict(r).items() if k != "itl"} | {"tpot": r.tpot}
                     for r in results],
    }  # fmt: skip


async def benchmark(args, endpoints: dict, clock: StepClock | None, read_local) -> dict:
    """Warm-up, then every scenario over every protocol in turn; {"server", "runs"}."""
    from xlaserve.serving.client import AsyncXlaServeClient

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    http = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None))
    grpc_client = info = None
    if endpoints.get("grpc"):
        grpc_client = AsyncXlaServeClient(endpoints["grpc"], api_key=args.api_key)
        mi = await grpc_client.model_info()
        info = {"model": mi.model_name, "vocab_size": mi.vocab_size, "platform": mi.platform,
                "max_num_seqs": mi.max_num_seqs, "num_kv_pages": mi.num_kv_pages}  # fmt: skip
        args.vocab_size = args.vocab_size or mi.vocab_size
    metrics_url = args.metrics_url or (endpoints.get("http") and f"{endpoints['http']}/metrics")
    read = read_local
    if read is None and metrics_url:

        async def read():
            return await scrape(http, metrics_url, headers)

    senders = {
        "grpc": lambda p: grpc_request(grpc_client, p, args.output_len),
        "http": lambda p: http_request(http, endpoints.get("http"), p, args.output_len, headers),
    }
    scenarios = [(rate, None) for rate in args.request_rate or []]
    scenarios += [(math.inf, c) for c in args.concurrency or []]
    runs = []
    try:
        for protocol in args.protocol:
            warm = make_prompts(args, args.warmup_requests, 1 << 20, f"warm-{protocol}")
            for r in await asyncio.gather(*(guarded(senders[protocol], p) for p in warm)):
                if not r.ok:
                    raise RuntimeError(f"warm-up request failed over {protocol}: {r.error}")
        # Protocols alternate within each load (same arrival times), so that both see the same
        # background load on a shared machine.
        for i, (rate, concurrency) in enumerate(scenarios):
            for j, protocol in enumerate(args.protocol):
                # fresh prompts every run: none finds another run's prompt in the prefix cache
                prompts = make_prompts(args, args.num_prompts, 2 * i + j, f"{protocol}-{i}")
                before = await settled(read) if read else {}
                if clock is not None:
                    clock.reset()
                cpu = cpu_sample()
                results, duration = await drive(
                    senders[protocol], prompts, rate=rate, concurrency=concurrency,
                    seed=(args.seed, i),
                )  # fmt: skip
                cpu = cpu_usage(cpu, cpu_sample())
                after = await settled(read) if read else {}
                run = {"protocol": protocol, "request_rate": "inf" if rate == math.inf else rate,
                       "concurrency": concurrency, "num_requests": len(prompts),
                       **summarize(results, duration, args.output_len), "cpu": cpu}  # fmt: skip
                run["engine"] = (engine_summary(before, after, duration, clock) if read
                                 else {"available": False, "why": "no --metrics-url"})  # fmt: skip
                runs.append(run)
                print(one_line(run), flush=True)
    finally:
        await http.aclose()
        if grpc_client is not None:
            await grpc_client.close()
    return {"server": info or {}, "runs": runs}


# ---- reporting -----------------------------------------------------------------------------
def scenario_label(run: dict) -> str:
    if run["concurrency"]:
        return f"c={run['concurrency']}"
    return "inf" if run["request_rate"] == "inf" else f"{run['request_rate']:g}/s"


def ppp(d: dict | None) -> str:
    return "/".join(f"{d[f'p{q}']:.1f}" for q in PERCENTILES) if d else "-"


def one_line(run: dict) -> str:
    host = run["engine"].get("host_overhead_share")
    return (f"{run['protocol']:>4} {scenario_label(run):>6}: {run['completed']}/"
            f"{run['num_requests']} ok, {run['request_throughput']:.2f} req/s, "
            f"{run['output_token_throughput']:.1f} tok/s, TTFT {ppp(run['ttft_ms'])} ms, "
            f"TPOT {ppp(run['tpot_ms'])} ms"
            + (f", host share {100 * host:.1f}%" if host is not None else ""))  # fmt: skip


def markdown(r: dict) -> str:
    w = r["workload"]
    lines = [f"# Serving: {r['model']} on {r['device']}, {r['date']}", "",
             f"{r['setup']}. {w['num_prompts']} requests per run, {w['prompt_kind']} prompts of "
             f"{w['input_len']} tokens, exactly {w['output_len']} output tokens each (greedy, "
             "ignore_eos). Latencies p50/p90/p99 in ms.", "",
             "| protocol | load | ok | req/s | out tok/s | TTFT | TPOT | ITL | E2E | mean step ms "
             "| host share | idle share | CPU cores busy: all / this process |",
             "|---" * 13 + "|"]  # fmt: skip
    for run in r["runs"]:
        e = run["engine"]
        cells = [run["protocol"], scenario_label(run), f"{run['completed']}/{run['num_requests']}",
                 f"{run['request_throughput']:.2f}", f"{run['output_token_throughput']:.1f}",
                 *(ppp(run[k]) for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")),
                 f"{e['mean_step_ms']:.1f}" if e.get("mean_step_ms") else "-"]  # fmt: skip
        for share in (e.get("host_overhead_share"), e.get("loop", {}).get("idle_share")):
            cells.append("-" if share is None else f"{100 * share:.1f}%")
        cpu = run.get("cpu")
        cells.append(f"{cpu['machine_busy_cores']:.2f} / {cpu['this_process_cores']:.2f} of "
                     f"{cpu['cores']}" if cpu else "-")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", r["notes"]]) + "\n"


def plot(r: dict, path: Path) -> None:
    """Latency percentiles per load: rates joined by lines, fixed concurrencies as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    colors = {50: "tab:blue", 90: "tab:orange", 99: "tab:red"}
    styles = {"grpc": ("-", "o"), "http": ("--", "s")}
    labels = list(dict.fromkeys(scenario_label(run) for run in r["runs"]))
    titles = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "itl_ms": "inter-token latency",
              "e2e_ms": "end-to-end latency"}  # fmt: skip
    for ax, (key, title) in zip(axes.flat, titles.items(), strict=True):
        for protocol in dict.fromkeys(run["protocol"] for run in r["runs"]):
            line, marker = styles.get(protocol, ("-", "x"))
            runs = [run for run in r["runs"] if run["protocol"] == protocol and run[key]]
            rated = [x for x in runs if not x["concurrency"]]
            fixed = [x for x in runs if x["concurrency"]]
            for q in PERCENTILES:
                label = f"{protocol} p{q}"
                for group, ls in ((rated, line), (fixed, "none")):
                    if group:
                        xs = [labels.index(scenario_label(x)) for x in group]
                        ax.plot(xs, [x[key][f"p{q}"] for x in group], linestyle=ls,
                                marker=marker, color=colors[q], label=label)  # fmt: skip
                        label = None
        ax.set(title=title, xlabel="request rate (req/s) or concurrency (c=N)", ylabel="ms",
               yscale="log", xticks=range(len(labels)), xticklabels=labels)  # fmt: skip
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{r['model']} serving on {r['device']}, {r['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from xlaserve.cli import _memory, add_model_args

    def floats(s):
        return [float(x) for x in s.split(",")]

    def ints(s):
        return [int(x) for x in s.split(",")]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--protocol", default="grpc", type=lambda s: s.split(","),
                   help="grpc, http or grpc,http")  # fmt: skip
    p.add_argument("--request-rate", type=floats, help="req/s, comma-separated; inf: all at once")
    p.add_argument("--concurrency", type=ints, help="requests kept in flight, comma-separated")
    p.add_argument("--num-prompts", type=int, default=32, help="requests per run")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--prompt-kind", choices=("ids", "text"), default="ids")
    p.add_argument("--warmup-requests", type=int, default=2, help="per protocol, not measured")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grpc-target", help="HOST:PORT of a running server")
    p.add_argument("--http-url", help="http://HOST:PORT of a running server")
    p.add_argument("--metrics-url", help="Prometheus endpoint (default: the HTTP URL's /metrics)")
    p.add_argument("--api-key")
    p.add_argument("--vocab-size", type=int, help="for id prompts to a remote HTTP-only server")
    p.add_argument("--device", help="device name for the results (default: this machine's)")
    p.add_argument("--out", default=str(RESULTS))
    add_model_args(p)  # in-process server: --model, --dtype, --load-format and these
    for name in ("--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
                 "--tensor-parallel-size", "--data-parallel-size"):  # fmt: skip
        p.add_argument(name, type=int)
    p.add_argument("--kv-cache-memory", type=_memory)
    args = p.parse_args(argv)
    if set(args.protocol) - {"grpc", "http"}:
        p.error(f"--protocol takes grpc and/or http, got {','.join(args.protocol)}")
    if not args.request_rate and not args.concurrency:
        args.request_rate = [math.inf]
    if any(r <= 0 for r in args.request_rate or []) or any(c < 1 for c in args.concurrency or []):
        p.error("request rates must be > 0 and concurrencies >= 1")
    args.remote = bool(args.grpc_target or args.http_url)
    targets = {"grpc": args.grpc_target, "http": args.http_url}
    missing = [x for x in args.protocol if args.remote and not targets[x]]
    if missing:
        p.error(f"--protocol {','.join(missing)} needs its target (--grpc-target/--http-url)")
    return args


def start_server(args):
    """(ServerThread, StepClock, engine options): the model served on loopback ports."""
    from xlaserve.config import EngineArgs
    from xlaserve.engine.async_engine import AsyncEngine
    from xlaserve.engine.dp_engine import build_engine
    from xlaserve.serving.server import ServerConfig, ServerThread

    names = ("model", "dtype", "load_format", "max_model_len", "max_num_seqs",
             "max_num_batched_tokens", "kv_cache_memory", "tensor_parallel_size",
             "data_parallel_size")  # fmt: skip
    options = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    clock = StepClock(build_engine(EngineArgs(**options)))
    config = ServerConfig(host="127.0.0.1", api_key=args.api_key,
                          grpc_port=0 if "grpc" in args.protocol else None,
                          http_port=0 if "http" in args.protocol else None)  # fmt: skip
    server = ServerThread(AsyncEngine(clock), config)
    server.start(timeout=600)
    return server, clock, options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    date = datetime.date.today().isoformat()
    server = clock = read_local = engine_options = None
    if args.remote:
        endpoints = {"grpc": args.grpc_target, "http": args.http_url}
        setup = "Remote server, its engine counters scraped from /metrics"
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from roofline import device_name

        args.device = args.device or device_name()
        server, clock, engine_options = start_server(args)
        e, engine = server.endpoints, server.engine
        endpoints = {"grpc": e.grpc_port and e.grpc_target, "http": e.http_port and e.http_url}
        args.vocab_size = args.vocab_size or engine.vocab_size

        async def read_local():
            return dict(engine.metrics())

        setup = "In-process server (the client shares this process's cores and GIL with it)"
    try:
        out = asyncio.run(benchmark(args, endpoints, clock, read_local))
    finally:
        if server is not None:
            server.stop()
    model = out["server"].get("model") or args.model
    device = args.device or f"{out['server'].get('platform') or 'unknown'} (remote server)"
    result = {
        "benchmark": "serving", "date": date, "device": device, "model": model, "setup": setup,
        "engine_options": engine_options, "server": out["server"],
        "workload": {k: getattr(args, k) for k in ("num_prompts", "input_len", "output_len",
                     "prompt_kind", "seed", "warmup_requests")},
        "runs": out["runs"],
        "notes": "Host share: (step - device) / step seconds over the run's engine steps. Idle "
                 "share: time the engine loop had nothing to run, of the run's duration "
                 "(in-process only; a remote run reports only its time outside steps). CPU: "
                 "cores kept busy during the run by the whole machine and by this process.",
    }  # fmt: skip
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    slug = device.split(" (")[0].replace(" ", "-").replace("/", "-")
    stem = (f"serving-{Path(model).name}-{'-'.join(args.protocol)}-"
            f"{'remote' if args.remote else 'inproc'}-in{args.input_len}out{args.output_len}-"
            f"{slug}-{date}")  # fmt: skip
    (folder / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (folder / f"{stem}.md").write_text(markdown(result))
    plot(result, folder / f"{stem}.png")
    print(markdown(result))
    print(f"wrote {folder / stem}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
