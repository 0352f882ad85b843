"""Shared pieces of the serving tests: a char-level tokenizer for the mock engine, a runner
wrapper that slows steps down or fails them on demand, servers on loopback ports, polling."""

from __future__ import annotations

import threading
import time

from tests.engine.mock_runner import mock_engine
from xlaserve.engine.async_engine import AsyncEngine
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.serving.server import ServerConfig, ServerThread

API_KEY = "test-key"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} | {% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def char_tokenizer():
    """97 tokens, one per printable ASCII character: id 0 "<eos>", 1..95 = chr(32..126),
    96 "<unk>". "Hi" -> [41, 74]; decoding concatenates characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{chr(c): c - 31 for c in range(32, 127)}, "<unk>": 96}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


class ControlledRunner:
    """The mock runner plus a per-step delay, a step counter and an injectable fault."""

    def __init__(self, inner, delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        self.steps = 0
        self.max_batch = 0  # most sequences in one step
        self.fail = threading.Event()

    def execute(self, output):
        if self.fail.is_set():
            raise RuntimeError("injected fault in the runner")
        if self.delay:
            time.sleep(self.delay)
        self.steps += 1
        self.max_batch = max(self.max_batch, output.num_seqs)
        return self.inner.execute(output)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def controlled_mock_engine(delay: float = 0.0, **kw):
    kw.setdefault("tokenizer", char_tokenizer())
    engine = mock_engine(**kw)
    engine.runner = ControlledRunner(engine.runner, delay)
    return engine


def start_mock_server(*, delay: float = 0.0, config: dict | None = None, **engine_kw):
    """(ServerThread, AsyncEngine, ControlledRunner) on ephemeral loopback ports."""
    engine = controlled_mock_engine(delay, **engine_kw)
    async_engine = AsyncEngine(engine)
    options = dict(grpc_port=0, http_port=0, api_key=API_KEY, max_body_bytes=64 << 10)
    options.update(config or {})
    server = ServerThread(async_engine, ServerConfig(**options))
    server.start()
    return server, async_engine, engine.runner


def run_alone(prompt, params: SamplingParams, **engine_kw):
    """The RequestOutput a fresh mock engine produces for this request alone (offline path)."""
    engine = controlled_mock_engine(**engine_kw)
    rid = engine.add_request(None, prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id == rid:
                return out
    raise AssertionError("request did not finish")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s: {predicate}")


def pages_all_free(async_engine: AsyncEngine) -> bool:
    m = async_engine.metrics()
    return (
        m["kv_pages_free"] == m["kv_pages_total"]
        and not m["num_running"]
        and not (m["num_waiting"])
    )
