"""llama.cpp (PyPI `llama-cpp-python`) as the batch-1 peer of `xlaserve bench latency`.

Same GGUF file, same prompts (token ids), same thread count as the cores JAX uses, greedy,
exactly `output_len` tokens: its EOS tokens get a -inf logit bias (our `ignore_eos`), since its
greedy output stops at once on some raw prompts. Timed like ours: submit -> first token (TTFT),
then the decode tokens one by one.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCppPeer:
    def __init__(self, gguf: Path, *, n_ctx: int, threads: int | None = None):
        import llama_cpp

        self.threads = threads or os.cpu_count() or 1
        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=n_ctx, n_threads=self.threads,
            n_threads_batch=self.threads, n_batch=min(n_ctx, 2048), verbose=False,
        )  # fmt: skip
        self.eos_ids = {int(self.llm.token_eos())}
        vocab = self.llm.n_vocab()
        self._ban = np.zeros(vocab, np.float32)
        for t in self.eos_ids:
            self._ban[t] = -np.inf

    def _no_eos(self, input_ids, scores):
        return scores + self._ban

    def run(self, prompt: list[int], output_len: int) -> tuple[float, list[float]]:
        """(TTFT seconds, per-token decode seconds) for one greedy generation."""
        import llama_cpp

        self.llm.reset()
        processors = llama_cpp.LogitsProcessorList([self._no_eos])
        start = time.perf_counter()
        stamps = []
        for _ in self.llm.generate(prompt, top_k=1, temp=0.0, reset=True,
                                   logits_processor=processors):  # fmt: skip
            stamps.append(time.perf_counter())
            if len(stamps) == output_len:
                break
        if len(stamps) < output_len:
            raise RuntimeError(f"llama.cpp stopped after {len(stamps)} of {output_len} tokens")
        return stamps[0] - start, list(np.diff(stamps))

    def measure(self, prompts: list[list[int]], output_len: int) -> dict:
        ttfts, per_token = [], []
        for prompt in prompts:
            ttft, steps = self.run(prompt, output_len)
            ttfts.append(ttft)
            per_token.append(statistics.fmean(steps))
        return {
            "threads": self.threads,
            "version": self.version,
            "ttft_ms": 1e3 * statistics.median(ttfts),
            "ms_per_output_token": 1e3 * statistics.median(per_token),
        }

    def ttft_ms(self, prompt: list[int]) -> float:
        return 1e3 * self.run(prompt, 1)[0]
