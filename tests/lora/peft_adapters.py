"""PEFT adapters made in the tests (seeded, non-zero A and B) and peft + transformers outputs
under them: the numerical reference for the engine's LoRA path."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class AdapterSpec:
    r: int
    alpha: int
    targets: list[str]
    seed: int
    rslora: bool = False
    bin_file: bool = False  # saved as adapter_model.bin instead of safetensors
    scale: float = 0.05  # std of the random A and B entries


@dataclass
class MadeAdapter:
    path: str
    spec: AdapterSpec
    greedy: list[list[int]] = field(default_factory=list)  # per reference prompt
    prompt_logprobs: list | None = None  # [positions, V] log-softmax for LOGPROB_PROMPT


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()


def make_adapters(base, specs: dict[str, AdapterSpec], folder, prompts, new_tokens, lp_prompt):
    """Saves each adapter under folder/name and records peft's greedy tokens for `prompts` and
    its log-softmax over `lp_prompt`. `base` is changed while an adapter is on, then restored
    (peft's unload), so pass a copy if others share it."""
    made = {}
    for name, spec in specs.items():
        config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=spec.targets,
                            use_rslora=spec.rslora, lora_dropout=0.0)  # fmt: skip
        model = get_peft_model(base, config).eval()
        gen = torch.Generator().manual_seed(spec.seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(spec.scale * torch.randn(p.shape, generator=gen))
        path = str(folder / name)
        model.save_pretrained(path, safe_serialization=not spec.bin_file)
        entry = MadeAdapter(path, spec)
        entry.greedy = [hf_greedy(model, ids, new_tokens) for ids in prompts]
        with torch.no_grad():
            logits = model(torch.tensor([lp_prompt])).logits[0]
        entry.prompt_logprobs = torch.log_softmax(logits, -1).numpy()
        made[name] = entry
        base = model.unload()
    return made
