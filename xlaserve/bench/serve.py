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

    xlaserve bench serve --model smollm2-135m-instruct --dtype float32 \\
        --max-model-len 512 --num-prompts 32 --input-len 64 --output-len 32 \\
        --request-rate 2,8,inf --concurrency 8 --protocol grpc,http
    xlaserve bench serve --grpc-target 127.0.0.1:50051 \\
        --http-url http://127.0.0.1:8000 --api-key secret --request-rate 1,2,4,inf

Prompts are seeded by --seed (the engine's seed flag). Writes
OUT/serving-MODEL-PROTOCOLS-{inproc,remote}-inINoutOUT-DEVICE-DATE.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from xlaserve.bench.common import (
    add_out_argument,
    dist,
    slug,
    today,
    validated_main,
    write_results,
)
from xlaserve.bench.serve_report import markdown, one_line, plot
from xlaserve.cli_args import add_engine_args, engine_args_from

TOPICS = ("the printing press", "volcanoes", "chess", "the blue sky", "butterflies", "vaccines",
          "transistors", "the water cycle", "bread", "airplanes", "glaciers")  # fmt: skip
PROTOCOLS = ("grpc", "http")


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
@dataclass(frozen=True)
class Load:
    """What the client sends: every scenario (request rate, concurrency) over every protocol."""

    protocols: tuple[str, ...]
    scenarios: tuple[tuple[float, int | None], ...]  # (req/s or inf, in-flight cap or None)
    num_prompts: int
    input_len: int
    output_len: int
    prompt_kind: str  # "ids" or "text"
    warmup_requests: int
    seed: int
    api_key: str | None = None
    metrics_url: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Load:
        rates = args.request_rate or ([] if args.concurrency else [math.inf])
        scenarios = [(rate, None) for rate in rates]
        scenarios += [(math.inf, c) for c in args.concurrency or []]
        return cls(protocols=tuple(args.protocol), scenarios=tuple(scenarios),
                   num_prompts=args.num_prompts, input_len=args.input_len,
                   output_len=args.output_len, prompt_kind=args.prompt_kind,
                   warmup_requests=args.warmup_requests, seed=engine_args_from(args).seed,
                   api_key=args.api_key, metrics_url=args.metrics_url)  # fmt: skip

    def workload(self) -> dict:
        keys = ("num_prompts", "input_len", "output_len", "prompt_kind", "seed",
                "warmup_requests")  # fmt: skip
        return {k: getattr(self, k) for k in keys}


def make_prompts(load: Load, vocab_size: int | None, n: int, stream: int, tag: str) -> list:
    if load.prompt_kind == "text":  # the tag first: no two prompts share a full KV page
        return [f"[{tag}-{i}] Write a short paragraph about {TOPICS[i % len(TOPICS)]}."
                for i in range(n)]  # fmt: skip
    if not vocab_size:
        raise ValueError("token-id prompts need the vocabulary size: pass --vocab-size")
    rng = np.random.default_rng([load.seed, stream])
    return [rng.integers(10, vocab_size, load.input_len).tolist() for _ in range(n)]


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


async def benchmark(load: Load, endpoints: dict, clock: StepClock | None, read_local,
                    vocab_size: int | None = None) -> dict:  # fmt: skip
    """Warm-up, then every scenario over every protocol in turn; {"server", "runs"}. Token-id
    prompts draw from `vocab_size` (default: the gRPC server's model info)."""
    from xlaserve.serving.client import AsyncXlaServeClient

    headers = {"Authorization": f"Bearer {load.api_key}"} if load.api_key else {}
    http = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None))
    grpc_client = info = None
    if endpoints.get("grpc"):
        grpc_client = AsyncXlaServeClient(endpoints["grpc"], api_key=load.api_key)
        mi = await grpc_client.model_info()
        info = {"model": mi.model_name, "vocab_size": mi.vocab_size, "platform": mi.platform,
                "max_num_seqs": mi.max_num_seqs, "num_kv_pages": mi.num_kv_pages}  # fmt: skip
        vocab_size = vocab_size or mi.vocab_size
    metrics_url = load.metrics_url or (endpoints.get("http") and f"{endpoints['http']}/metrics")
    read = read_local
    if read is None and metrics_url:

        async def read():
            return await scrape(http, metrics_url, headers)

    senders = {
        "grpc": lambda p: grpc_request(grpc_client, p, load.output_len),
        "http": lambda p: http_request(http, endpoints.get("http"), p, load.output_len, headers),
    }
    runs = []
    try:
        for protocol in load.protocols:
            warm = make_prompts(load, vocab_size, load.warmup_requests, 1 << 20,
                                f"warm-{protocol}")  # fmt: skip
            for r in await asyncio.gather(*(guarded(senders[protocol], p) for p in warm)):
                if not r.ok:
                    raise RuntimeError(f"warm-up request failed over {protocol}: {r.error}")
        # Protocols alternate within each load (same arrival times), so that both see the same
        # background load on a shared machine.
        for i, (rate, concurrency) in enumerate(load.scenarios):
            for j, protocol in enumerate(load.protocols):
                # fresh prompts every run: none finds another run's prompt in the prefix cache
                prompts = make_prompts(load, vocab_size, load.num_prompts, 2 * i + j,
                                       f"{protocol}-{i}")  # fmt: skip
                before = await settled(read) if read else {}
                if clock is not None:
                    clock.reset()
                cpu = cpu_sample()
                results, duration = await drive(
                    senders[protocol], prompts, rate=rate, concurrency=concurrency,
                    seed=(load.seed, i),
                )  # fmt: skip
                cpu = cpu_usage(cpu, cpu_sample())
                after = await settled(read) if read else {}
                run = {"protocol": protocol, "request_rate": "inf" if rate == math.inf else rate,
                       "concurrency": concurrency, "num_requests": len(prompts),
                       **summarize(results, duration, load.output_len), "cpu": cpu}  # fmt: skip
                run["engine"] = (engine_summary(before, after, duration, clock) if read
                                 else {"available": False, "why": "no --metrics-url"})  # fmt: skip
                runs.append(run)
                print(one_line(run), flush=True)
    finally:
        await http.aclose()
        if grpc_client is not None:
            await grpc_client.close()
    return {"server": info or {}, "runs": runs}


# ---- entry points --------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", default="grpc", type=lambda s: s.split(","),
                        help="grpc, http or grpc,http")  # fmt: skip
    parser.add_argument("--request-rate", type=_floats,
                        help="req/s, comma-separated; inf: all at once")  # fmt: skip
    parser.add_argument("--concurrency", type=_ints,
                        help="requests kept in flight, comma-separated")  # fmt: skip
    parser.add_argument("--num-prompts", type=int, default=32, help="requests per run")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--prompt-kind", choices=("ids", "text"), default="ids")
    parser.add_argument("--warmup-requests", type=int, default=2,
                        help="per protocol, not measured")  # fmt: skip
    parser.add_argument("--grpc-target", help="HOST:PORT of a running server")
    parser.add_argument("--http-url", help="http://HOST:PORT of a running server")
    parser.add_argument("--metrics-url",
                        help="Prometheus endpoint (default: the HTTP URL's /metrics)")  # fmt: skip
    parser.add_argument("--api-key")
    parser.add_argument("--vocab-size", type=int,
                        help="for id prompts to a remote HTTP-only server")  # fmt: skip
    parser.add_argument("--device", help="device name for the results (default: this machine's)")
    add_out_argument(parser)
    # The in-process server's engine (and --seed, which also seeds the prompts).
    add_engine_args(parser)


def validate(args: argparse.Namespace) -> None:
    """ValueErrors naming the flags that do not fit together."""
    engine_args_from(args)
    if set(args.protocol) - set(PROTOCOLS):
        raise ValueError(f"--protocol takes grpc and/or http, got {','.join(args.protocol)}")
    if any(r <= 0 for r in args.request_rate or []) or any(c < 1 for c in args.concurrency or []):
        raise ValueError("request rates must be > 0 and concurrencies >= 1")
    if args.num_prompts < 1 or args.output_len < 1 or args.input_len < 1:
        raise ValueError(f"--num-prompts, --input-len and --output-len must be >= 1, got "
                         f"{args.num_prompts}, {args.input_len} and {args.output_len}")  # fmt: skip
    targets = {"grpc": args.grpc_target, "http": args.http_url}
    missing = [x for x in args.protocol if _remote(args) and not targets[x]]
    if missing:
        raise ValueError(f"--protocol {','.join(missing)} needs its target "
                         "(--grpc-target/--http-url)")  # fmt: skip


def _remote(args: argparse.Namespace) -> bool:
    return bool(args.grpc_target or args.http_url)


def start_server(engine_args, protocols: tuple[str, ...], api_key: str | None):
    """(ServerThread, StepClock): the engine served on loopback ports."""
    from xlaserve.engine.async_engine import AsyncEngine
    from xlaserve.engine.builder import build_engine
    from xlaserve.serving.server import ServerConfig, ServerThread

    clock = StepClock(build_engine(engine_args))
    config = ServerConfig(host="127.0.0.1", api_key=api_key,
                          grpc_port=0 if "grpc" in protocols else None,
                          http_port=0 if "http" in protocols else None)  # fmt: skip
    server = ServerThread(AsyncEngine(clock), config)
    server.start(timeout=600)
    return server, clock


def run(args: argparse.Namespace) -> int:
    validate(args)
    load, remote = Load.from_args(args), _remote(args)
    date = today()
    server = clock = read_local = engine_options = None
    device, vocab_size = args.device, args.vocab_size
    if remote:
        endpoints = {"grpc": args.grpc_target, "http": args.http_url}
        setup = "Remote server, its engine counters scraped from /metrics"
    else:
        from xlaserve.bench.roofline import device_name

        engine_args = engine_args_from(args)
        engine_options = dataclasses.asdict(engine_args)
        device = device or device_name()
        server, clock = start_server(engine_args, load.protocols, load.api_key)
        e, engine = server.endpoints, server.engine
        endpoints = {"grpc": e.grpc_port and e.grpc_target, "http": e.http_port and e.http_url}
        vocab_size = vocab_size or engine.vocab_size

        async def read_local():
            return dict(engine.metrics())

        setup = "In-process server (the client shares this process's cores and GIL with it)"
    try:
        out = asyncio.run(benchmark(load, endpoints, clock, read_local, vocab_size))
    finally:
        if server is not None:
            server.stop()
    # In-process: the engine's model; remote: what the server reports, else --model if given.
    model = (engine_options or {}).get("model") or out["server"].get("model")
    model = model or vars(args).get("model") or "unknown"
    device = device or f"{out['server'].get('platform') or 'unknown'} (remote server)"
    result = {
        "benchmark": "serving", "date": date, "device": device, "model": model, "setup": setup,
        "engine_options": engine_options, "server": out["server"], "workload": load.workload(),
        "runs": out["runs"],
        "notes": "Host share: (step - device) / step seconds over the run's engine steps. Idle "
                 "share: time the engine loop had nothing to run, of the run's duration "
                 "(in-process only; a remote run reports only its time outside steps). CPU: "
                 "cores kept busy during the run by the whole machine and by this process.",
    }  # fmt: skip
    stem = (f"serving-{Path(model).name}-{'-'.join(load.protocols)}-"
            f"{'remote' if remote else 'inproc'}-in{load.input_len}out{load.output_len}-"
            f"{slug(device)}-{date}")  # fmt: skip
    path = write_results(args.out, stem, result, markdown(result))
    plot(result, path.with_suffix(".png"))
    print(markdown(result))
    print(f"wrote {path.with_suffix('')}.{{json,md,png}}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return validated_main(add_arguments, validate, run, prog="xlaserve bench serve",
                          doc=__doc__, argv=argv)  # fmt: skip
