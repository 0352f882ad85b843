"""Tiny random Llama checkpoints in the compressed-tensors format, written by the
compressed-tensors package itself (the reference reader and writer), for the loader tests."""

from pathlib import Path

import torch

# Preset schemes of compressed_tensors.quantization, plus a per-channel int8 weight-only one
# (the package's "W8A16" preset is group-wise).
SCHEMES = ("W8A8", "W8A16_CHANNEL", "FP8_DYNAMIC", "FP8", "W4A16")


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def _scheme(name: str):
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        preset_name_to_scheme,
    )

    if name == "W8A16_CHANNEL":
        weights = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True)
        return QuantizationScheme(targets=["Linear"], weights=weights)
    return preset_name_to_scheme(name, ["Linear"])


def _min_max(w: torch.Tensor, args):
    """A calibration-free observer: the weight's own range per tensor, channel or group."""
    if args.strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if args.strategy == "channel":
        return w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    groups = w.unflatten(-1, (-1, args.group_size))
    return groups.amin(-1), groups.amax(-1)


@torch.no_grad()
def write_checkpoint(folder: Path, scheme: str, seed: int = 0) -> None:
    """Quantizes every Linear but the LM head with `scheme` and saves the compressed model."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams

    model = tiny_llama(seed)
    amax, hooks = {}, []  # static activation scales (the FP8 preset) from one forward
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hook = lambda m, i, o, n=name: amax.__setitem__(n, i[0].abs().amax().float())  # noqa: E731
            hooks.append(module.register_forward_hook(hook))
    model(torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed)))
    for hook in hooks:
        hook.remove()
    config = QuantizationConfig(config_groups={"group_0": _scheme(scheme)}, ignore=["lm_head"])
    apply_quantization_config(model, config, show_progress=False)
    for name, module in model.named_modules():
        args = getattr(module, "quantization_scheme", None)
        if args is None:
            continue
        scale, zero_point = calculate_qparams(*_min_max(module.weight.float(), args.weights),
                                              args.weights)  # fmt: skip
        module.weight_scale.copy_(scale)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.copy_(zero_point)
        if hasattr(module, "input_scale"):
            a = amax[name].reshape(1)
            module.input_scale.copy_(calculate_qparams(-a, a, args.input_activations)[0])
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)  # config.json's quantization_config


def dense_model(folder: Path):
    """transformers' model of the checkpoint with the package's dequantized weights."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
