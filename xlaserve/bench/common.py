"""What the benchmarks share: the engine they build, a runner that records each step's shape,
latency percentiles, and results files named by benchmark, model, device and date."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from xlaserve.bench.cli import HelpFormatter
from xlaserve.config import EngineArgs
from xlaserve.engine.runner_api import DeviceInfo, KVCacheSpec, Runner, RunnerOutput, RunnerStats
from xlaserve.engine.scheduler_output import SchedulerOutput

DEFAULT_OUT = Path("benchmarks") / "results"
PERCENTILES = (50, 90, 99)


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the results files")


def build_llm(args: EngineArgs):
    """The offline `LLM` for these engine options."""
    from xlaserve import LLM

    return LLM(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args)})


def today() -> str:
    return datetime.date.today().isoformat()


def slug(text: str) -> str:
    """A file-name-safe form of a device name: 'AMD EPYC 9B14 (2 cores)' -> 'AMD-EPYC-9B14'."""
    return text.split(" (")[0].replace(" ", "-").replace("/", "-")


def write_results(folder: str | Path, stem: str, result: dict, markdown: str) -> Path:
    """FOLDER/STEM.json and FOLDER/STEM.md; returns the JSON path. The home folder in any
    recorded path is written as "~" (results are committed; the machine's paths are not)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.json"
    home = str(Path.home())
    path.write_text(json.dumps(result, indent=2).replace(home + "/", "~/"))
    (folder / f"{stem}.md").write_text(markdown.replace(home + "/", "~/"))
    return path


def dist(values: list[float]) -> dict | None:
    """mean / p50 / p90 / p99 in milliseconds of values in seconds."""
    if not values:
        return None
    ms = 1e3 * np.asarray(values)
    return {"mean": float(ms.mean()), **{f"p{q}": float(np.percentile(ms, q)) for q in PERCENTILES}}


# ---- per-step recording --------------------------------------------------------------------
def step_shape(output: SchedulerOutput) -> tuple[int, int]:
    """(tokens fed in the step, KV tokens the step's sequences attend to once it has run)."""
    attended = sum(
        seq.num_computed_tokens + output.num_scheduled_tokens[seq.seq_id]
        for seq in (*output.new_seqs, *output.cached_seqs)
    )
    return output.total_num_scheduled_tokens, attended


class RecordingRunner:
    """A runner that delegates every call to another and records the shape (`step_shape`) of
    each non-empty step it executes. It implements the `Runner` contract, so an engine drives it
    exactly as it drives the runner it wraps."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner
        self.steps: list[tuple[int, int]] = []

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        return self.inner.kv_cache_spec

    def warmup(self) -> None:
        self.inner.warmup()

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        if not output.is_empty:
            self.steps.append(step_shape(output))
        return self.inner.execute(output)

    def dispatch(self, output: SchedulerOutput):
        """Async scheduling's half of `execute`: recorded the same way."""
        if not output.is_empty:
            self.steps.append(step_shape(output))
        return self.inner.dispatch(output)

    def device_info(self) -> DeviceInfo:
        return self.inner.device_info()

    def stats(self) -> RunnerStats:
        return self.inner.stats()

    def shutdown(self) -> None:
        self.inner.shutdown()

    def __getattr__(self, name: str):
        # What a backend offers beyond the contract (its mesh, ...) stays reachable.
        return getattr(self.inner, name)


def _engines(engine) -> list:
    """The single-replica engines behind `engine` (a data-parallel engine has several)."""
    replicas = getattr(engine, "replicas", None)
    engines = list(replicas) if replicas is not None else [engine]
    for e in engines:
        if not isinstance(getattr(e, "runner", None), Runner):
            raise TypeError(f"{type(e).__name__} exposes no runner implementing the Runner "
                            "contract (xlaserve/engine/runner_api.py)")  # fmt: skip
    return engines


@contextmanager
def recording(engine) -> Iterator[list[RecordingRunner]]:
    """Wraps the runner of every replica of `engine` in a `RecordingRunner` (one per replica,
    in replica order) for the duration of the block, then puts the original runners back."""
    engines = _engines(engine)
    recorders = [RecordingRunner(e.runner) for e in engines]
    for e, recorder in zip(engines, recorders, strict=True):
        e.runner = recorder
    try:
        yield recorders
    finally:
        for e, recorder in zip(engines, recorders, strict=True):
            e.runner = recorder.inner


def runners(engine) -> list[Runner]:
    return [e.runner for e in _engines(engine)]


def validated_main(add_arguments: Callable, validate: Callable, run: Callable, *,
                   prog: str, doc: str | None, argv: list[str] | None) -> int:  # fmt: skip
    """A benchmark's stand-alone entry point: its own parser; a bad combination of flags is a
    usage error (exit 2) naming it."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        validate(args)
    except ValueError as e:
        parser.error(str(e))
    return run(args)


def decode_step_seconds(llm, prompts: list[dict], params, loras=None) -> list[float]:
    """Wall time of each step in which every request decodes one token (`loras`: one
    LoRARequest or None per prompt)."""
    engine = llm.engine
    for prompt, lora in zip(prompts, loras or [None] * len(prompts), strict=True):
        engine.add_request(None, prompt, params, **({"lora_request": lora} if lora else {}))
    times = []
    with recording(engine) as (recorder,):
        while engine.has_unfinished_requests():
            steps = len(recorder.steps)
            start = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - start
            decoding = engine.scheduler.num_running == len(prompts)
            if len(recorder.steps) > steps and recorder.steps[-1][0] == len(prompts) and decoding:
                times.append(elapsed)
    return times
