"""Numerical parity of the JAX and torch backends on one checkpoint (`xlaserve parity`).

Both backends load the model independently (JAX: `checkpoints.loader.load_model`, torch:
`kernels_cuda.loader.load_torch_model`; dummy presets and orbax stores reach torch as the JAX
parameters). All prompts run together as one ragged paged batch: a prefill, then `max_tokens - 1`
paged decode steps fed with the JAX model's greedy tokens (teacher forcing), so both backends
always score the same contexts. Per prompt it reports:
- greedy agreement: the first generated position where torch's argmax differs from JAX's token
  (None when all agree); before it, both backends' own greedy runs are identical;
- the max |logit difference| over every prompt position and generated position.
A prompt fails when that difference exceeds the dtype's tolerance. A greedy divergence within
tolerance is a near-tie (the two top logits are within 2x the tolerance) and is reported, not
failed.
"""

import time
from dataclasses import dataclass

import numpy as np

# Max |logit difference| allowed per dtype (logits are compared in float32 after the final
# matmul), set from SmolLM2-135M measured on the CPU (benchmarks/results/parity-2026-11-23.md):
# float32 1.6e-4 (logits up to ~35, 30 layers; summation order only), float16 0.13, bfloat16
# 1.37 (both backends round activations at slightly different points; ~8x per 3 mantissa bits
# fewer). GPU figures remain to be measured.
TOLERANCES = {"float32": 1e-3, "bfloat16": 3.0, "float16": 0.5}

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at",
    "1, 2, 3, 4, 5,",
    "Translate to French: I like apples.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "import numpy as np\n\ndef softmax(x):",
    "Q: What is 12 times 12?\nA:",
)
PAGE_SIZE = 16


@dataclass
class PromptParity:
    prompt: str
    prompt_ids: list[int]
    jax_tokens: list[int]  # JAX greedy continuation
    torch_tokens: list[int]  # torch argmax at each of those positions (teacher-forced)
    max_abs_diff: float  # over prompt and generated positions
    first_divergence: int | None  # index into jax_tokens, None when all agree
    divergence_margin: float | None  # JAX logit gap between its token and torch's there

    def passed(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance


@dataclass
class ParityReport:
    model: str
    dtype: str
    tolerance: float
    torch_device: str
    torch_attention: str
    results: list[PromptParity]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(r.passed(self.tolerance) for r in self.results)

    def format(self) -> str:
        lines = [
            f"parity {self.model} dtype={self.dtype} tolerance={self.tolerance:g} "
            f"(torch on {self.torch_device}, attention={self.torch_attention})",
            f"{'#':>2}  {'prompt toks':>11}  {'greedy agree':>12}  {'first div':>9}  "
            f"{'max |dlogit|':>12}  result  prompt",
        ]
        for i, r in enumerate(self.results):
            n = len(r.jax_tokens)
            agree = n if r.first_divergence is None else r.first_divergence
            div = "-" if r.first_divergence is None else str(r.first_divergence)
            if r.divergence_margin is not None:
                div += f" (gap {r.divergence_margin:.2g})"
            verdict = "ok" if r.passed(self.tolerance) else "FAIL"
            lines.append(
                f"{i:>2}  {len(r.prompt_ids):>11}  {f'{agree}/{n}':>12}  {div:>9}  "
                f"{r.max_abs_diff:>12.3e}  {verdict:<6}  {r.prompt[:40]!r}"
            )
        worst = max(r.max_abs_diff for r in self.results)
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"{verdict}: max |dlogit| {worst:.3e} vs tolerance {self.tolerance:g} "
                     f"({self.seconds:.1f}s)")  # fmt: skip
        return "\n".join(lines)


def compare(jax_model, torch_model, prompts: list[list[int]], max_tokens: int):
    """(jax tokens, torch argmax tokens, max |diff| per prompt, margins) for token-id prompts."""
    from xlaserve.kernels_cuda.paged import TorchPagedRunner
    from xlaserve.models.generate import PagedModelRunner

    num = len(prompts)
    max_len = max(len(p) for p in prompts) + max_tokens
    jax_runner = PagedModelRunner(jax_model, num_seqs=num, max_len=max_len, page_size=PAGE_SIZE)
    torch_runner = TorchPagedRunner(torch_model, num_seqs=num, max_len=max_len, page_size=PAGE_SIZE)
    a = jax_runner.step(prompts, all_logits=True)
    b = torch_runner.step(prompts, all_logits=True)
    starts = np.cumsum([0, *map(len, prompts)])
    prompt_diff = np.abs(a.all_logits - b.all_logits).max(-1)  # [T] every prompt position
    max_diff = [float(prompt_diff[starts[s] : starts[s + 1]].max()) for s in range(num)]
    jax_tokens = [[] for _ in prompts]
    torch_tokens = [[] for _ in prompts]
    margins: list[float | None] = [None] * num
    for step in range(max_tokens):
        ja, tb = a.logits.argmax(-1), b.logits.argmax(-1)  # [S]
        for s in range(num):
            jax_tokens[s].append(int(ja[s]))
            torch_tokens[s].append(int(tb[s]))
            max_diff[s] = max(max_diff[s], float(np.abs(a.logits[s] - b.logits[s]).max()))
            if ja[s] != tb[s] and margins[s] is None:
                margins[s] = float(a.logits[s, ja[s]] - a.logits[s, tb[s]])
        if step + 1 < max_tokens:
            feed = [[int(t)] for t in ja]
            a, b = jax_runner.step(feed), torch_runner.step(feed)
    return jax_tokens, torch_tokens, max_diff, margins


def run_parity(
    model: str,
    *,
    prompts: list[str] | None = None,
    dtype: str = "float32",
    max_tokens: int = 16,
    load_format: str = "auto",
    device: str | None = None,
    attention: str = "auto",
    seed: int = 0,
) -> ParityReport:
    """Loads `model` on both backends and compares them on `prompts` (token-id prompts drawn
    from `seed` when the model has no tokenizer, e.g. a dummy preset)."""
    from xlaserve.checkpoints.loader import load_model
    from xlaserve.kernels_cuda.loader import load_torch_model

    if dtype not in TOLERANCES:
        raise ValueError(f"parity dtype must be one of {', '.join(TOLERANCES)}, got {dtype!r}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    start = time.perf_counter()
    jax_loaded = load_model(model, load_format=load_format, dtype=dtype, seed=seed)
    torch_loaded = load_torch_model(
        model, load_format=load_format, dtype=dtype, seed=seed, device=device,
        attention=attention, with_tokenizer=False,
    )  # fmt: skip
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if not prompts:
        raise ValueError("no prompts to compare")
    tokenizer = jax_loaded.tokenizer
    if tokenizer is not None:
        ids = [tokenizer(p)["input_ids"] for p in prompts]
    else:  # no tokenizer (dummy weights): random token ids of the prompts' character lengths
        rng = np.random.default_rng(seed)
        vocab = jax_loaded.config.vocab_size
        ids = [rng.integers(0, vocab, max(1, len(p) // 4)).tolist() for p in prompts]
    if any(not p for p in ids):
        raise ValueError("every prompt needs at least one token")
    jax_tokens, torch_tokens, diffs, margins = compare(
        jax_loaded.model, torch_loaded.model, ids, max_tokens
    )
    results = []
    for i, prompt in enumerate(prompts):
        pairs = zip(jax_tokens[i], torch_tokens[i], strict=True)
        div = next((j for j, (x, y) in enumerate(pairs) if x != y), None)
        results.append(
            PromptParity(prompt, ids[i], jax_tokens[i], torch_tokens[i], diffs[i], div, margins[i])
        )
    return ParityReport(
        model=model,
        dtype=dtype,
        tolerance=TOLERANCES[dtype],
        torch_device=str(torch_loaded.device),
        torch_attention=torch_loaded.model.attention,
        results=results,
        seconds=time.perf_counter() - start,
    )


def read_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines are skipped; a literal "\\n" stands for a newline."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
