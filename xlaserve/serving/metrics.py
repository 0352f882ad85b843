"""Prometheus metrics: request outcomes and latencies (recorded as requests finish) and the
engine's gauges and counters (read from its snapshot at scrape time). One registry per server,
so several servers in one process never share counters.

The main series are also exported under vLLM's names, labelled `model_name` as vLLM does, so
dashboards built for vLLM work: vllm:num_requests_running / _waiting, vllm:kv_cache_usage_perc
(a fraction, 1 = full), vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds (one
observation per gap between output tokens; a request's gaps are taken as equal, its mean),
vllm:e2e_request_latency_seconds, vllm:prompt_tokens_total, vllm:generation_tokens_total and
vllm:num_preemptions_total."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from xlaserve.engine.async_engine import EngineObserver
from xlaserve.engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# stop / length / abort: how a request ended; error: the engine failed under it;
# invalid / overloaded / unauthenticated / unavailable: refused before it started.
OUTCOMES = ("stop", "length", "abort", "error", "invalid", "overloaded", "unauthenticated",
            "unavailable")  # fmt: skip
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def outcome_of(output: RequestOutput) -> str:
    reasons = {c.finish_reason for c in output.outputs}
    if "abort" in reasons:
        return "abort"
    return "length" if "length" in reasons else "stop"


class ServingMetrics(EngineObserver):
    """Records finished requests (as the engine's observer) and refusals; renders the text
    exposition format."""

    def __init__(
        self,
        engine_metrics: Callable[[], dict],
        healthy: Callable[[], bool],
        model_name: Callable[[], str] = lambda: "default",
    ):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r = self.registry
        self.requests = Counter("xlaserve_requests", "Requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.ttft = Histogram(
            "xlaserve_time_to_first_token_seconds",
            "Arrival to first output token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "xlaserve_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "xlaserve_e2e_request_latency_seconds",
            "Arrival to last output token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "xlaserve_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generation_tokens = Counter(
            "xlaserve_generation_tokens", "Output tokens of finished requests", registry=r
        )
        self.vllm = _VllmSeries(r)
        r.register(_EngineCollector(engine_metrics, healthy, model_name))

    # ---- observer hooks (engine thread) ------------------------------------------------------
    def on_request_finished(self, output: RequestOutput) -> None:
        if not isinstance(output, RequestOutput):  # a pooling request: no output tokens
            self.requests.labels("stop").inc()
            self.prompt_tokens.inc(len(output.prompt_token_ids))
            m = output.metrics
            self.e2e.observe(max(m.finished_time - m.arrival_time, 0.0))
            return
        self.requests.labels(outcome_of(output)).inc()
        m = output.metrics
        num_tokens = max((len(c.token_ids) for c in output.outputs), default=0)
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(sum(len(c.token_ids) for c in output.outputs))
        if m.first_token_time is not None:
            self.ttft.observe(max(m.first_token_time - m.arrival_time, 0.0))
            if m.finished_time is not None and num_tokens > 1:
                self.tpot.observe((m.finished_time - m.first_token_time) / (num_tokens - 1))
        if m.finished_time is not None:
            self.e2e.observe(max(m.finished_time - m.arrival_time, 0.0))
        self.vllm.on_request_finished(output, num_tokens, self.model_name())

    def on_requests_failed(self, count: int) -> None:
        self.requests.labels("error").inc(count)

    # ---- servers ------------------------------------------------------------------------------
    def refused(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _VllmSeries:
    """The per-request series under vLLM's names (recorded as requests finish)."""

    def __init__(self, r: CollectorRegistry) -> None:
        label = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Arrival to first output token",
                              label, buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Gaps between output tokens",
                             label, buckets=_TPOT_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last output token",
                             label, buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests",
                                     label, registry=r)  # fmt: skip
        self.generation_tokens = Counter("vllm:generation_tokens",
                                         "Output tokens of finished requests", label,
                                         registry=r)  # fmt: skip

    def on_request_finished(self, output: RequestOutput, num_tokens: int, model: str) -> None:
        m = output.metrics
        self.prompt_tokens.labels(model).inc(len(output.prompt_token_ids))
        self.generation_tokens.labels(model).inc(sum(len(c.token_ids) for c in output.outputs))
        if m.first_token_time is not None:
            self.ttft.labels(model).observe(max(m.first_token_time - m.arrival_time, 0.0))
            if m.finished_time is not None and num_tokens > 1:
                gap = max(m.finished_time - m.first_token_time, 0.0) / (num_tokens - 1)
                itl = self.itl.labels(model)
                for _ in range(num_tokens - 1):
                    itl.observe(gap)
        if m.finished_time is not None:
            self.e2e.labels(model).observe(max(m.finished_time - m.arrival_time, 0.0))


class _EngineCollector(Collector):
    def __init__(
        self,
        engine_metrics: Callable[[], dict],
        healthy: Callable[[], bool],
        model_name: Callable[[], str],
    ):
        self._engine_metrics = engine_metrics
        self._healthy = healthy
        self._model_name = model_name

    def collect(self):
        m = self._engine_metrics()

        def gauge(name, doc, value):
            return GaugeMetricFamily(f"xlaserve_{name}", doc, value=value)

        def counter(name, doc, value):
            return CounterMetricFamily(f"xlaserve_{name}", doc, value=value)

        total, free = m["kv_pages_total"], m["kv_pages_free"]
        queries, hits = m["prefix_cache_queries"], m["prefix_cache_hits"]
        yield gauge("healthy", "1 while the engine serves, 0 once it failed or drains",
                    float(self._healthy()))  # fmt: skip
        yield gauge("num_requests_running", "Sequences being decoded or prefilled",
                    m["num_running"])  # fmt: skip
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled", m["num_waiting"])
        yield gauge("kv_pages_total", "KV cache pages in the pool", total)
        yield gauge("kv_pages_free", "KV cache pages not held by any sequence", free)
        yield gauge("kv_cache_usage_ratio", "Share of KV pages held by sequences",
                    (total - free) / total if total else 0.0)  # fmt: skip
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                      queries)  # fmt: skip
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache", hits)
        yield gauge("prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries",
                    hits / queries if queries else 0.0)  # fmt: skip
        yield counter("compiles", "XLA compilations (warm-up included)", m["compiles"])
        yield counter("compiles_after_warmup", "XLA compilations after warm-up (should be 0)",
                      m["compiles_after_warmup"])  # fmt: skip
        yield counter("preemptions", "Sequences preempted for KV pages", m["preemptions"])
        yield from self._vllm(m, (total - free) / total if total else 0.0)
        if "spec_decode_num_drafts" in m:
            yield from self._spec_decode(m, counter, gauge)
        # The engine's own step counters (LLMEngine.get_metrics): steps that ran a batch, their
        # wall time, and the part spent waiting for the device's sampled tokens; the rest of
        # step_seconds is host work per step (scheduling, packing, postprocessing).
        yield counter("engine_steps", "Engine steps that ran a batch",
                      m.get("steps", m.get("num_steps", 0)))  # fmt: skip
        yield counter("engine_step_seconds", "Wall time inside engine steps, host and device",
                      m.get("step_seconds", 0.0))  # fmt: skip
        yield counter("engine_device_seconds",
                      "Time inside engine steps spent waiting for the device's sampled tokens",
                      m.get("device_seconds", 0.0))  # fmt: skip

    def _spec_decode(self, m: dict, counter, gauge):
        """Speculative decoding, under our names and vLLM's."""
        series = (
            ("num_drafts", "Verifications of at least one drafted token"),
            ("num_draft_tokens", "Drafted tokens verified"),
            ("num_accepted_tokens", "Drafted tokens accepted"),
        )
        labels = [self._model_name()]
        for name, doc in series:
            yield counter(f"spec_decode_{name}", doc, m[f"spec_decode_{name}"])
            family = CounterMetricFamily(f"vllm:spec_decode_{name}", doc, labels=["model_name"])
            family.add_metric(labels, m[f"spec_decode_{name}"])
            yield family
        rate = m["spec_decode_acceptance_rate"]
        yield gauge("spec_decode_acceptance_rate", "Accepted / drafted tokens so far",
                    0.0 if rate is None else rate)  # fmt: skip
        yield counter("spec_decode_disabled_steps",
                      "Steps in which the measured costs turned drafting off",
                      m["spec_decode_disabled_steps"])  # fmt: skip
        per_pos = "Drafts accepted at each draft position"
        ours = CounterMetricFamily("xlaserve_spec_decode_num_accepted_tokens_per_pos", per_pos,
                                   labels=["position"])  # fmt: skip
        theirs = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos", per_pos,
                                     labels=["model_name", "position"])  # fmt: skip
        for pos, count in enumerate(m["spec_decode_accepted_per_position"]):
            ours.add_metric([str(pos)], count)
            theirs.add_metric([*labels, str(pos)], count)
        yield ours
        yield theirs

    def _vllm(self, m: dict, usage: float):
        """The engine's series under vLLM's names."""
        labels = [self._model_name()]

        def family(kind, name, doc, value):
            metric = kind(f"vllm:{name}", doc, labels=["model_name"])
            metric.add_metric(labels, value)
            return metric

        yield family(GaugeMetricFamily, "num_requests_running",
                     "Sequences being decoded or prefilled", m["num_running"])  # fmt: skip
        yield family(GaugeMetricFamily, "num_requests_waiting",
                     "Sequences waiting to be scheduled", m["num_waiting"])  # fmt: skip
        yield family(GaugeMetricFamily, "kv_cache_usage_perc",
                     "Share of KV cache pages held by sequences (1: full)", usage)  # fmt: skip
        yield family(CounterMetricFamily, "num_preemptions",
                     "Sequences preempted for KV pages", m["preemptions"])  # fmt: skip
