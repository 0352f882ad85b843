"""What one request may ask of the server: how many samples and how many output tokens.

Samples: `n` (HTTP, gRPC) and `num_samples` (JetStream) above `ServerConfig.max_n` are refused.
Output tokens: a request that names `max_tokens` above `max_tokens_cap` is refused; one that
does not name it gets its protocol's default, limited by the cap:
  - HTTP /v1/completions: 16 (OpenAI's and vLLM's default; an explicit null: as much as fits)
  - HTTP /v1/chat/completions: as much as fits in max_model_len (vLLM's default)
  - gRPC Generate and JetStream Decode (max_tokens 0 or unset): `max_tokens_default`
A default the server chose is cut at max_model_len (finish reason "length"), never refused.
"""

from __future__ import annotations

import dataclasses

from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.serving.errors import Kind, ServingError

COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def check_n(max_n: int, n: int, param: str) -> None:
    """Refuses more than `max_n` samples; `param` is the field as the client names it."""
    if n > max_n:
        raise ServingError(
            Kind.INVALID,
            f"{param} must be <= {max_n} (this server's --max-n), got {n}",
            param=param,
        )


def max_tokens_for(
    asked: int | None, default: int | None, cap: int | None, param: str = "max_tokens"
) -> int | None:
    """The max_tokens to run: what the request asked (refused above `cap`) or, where it did
    not say (`asked` None), `default` limited by `cap`. None: until max_model_len."""
    if asked is not None:
        if cap is not None and asked > cap:
            raise ServingError(
                Kind.INVALID,
                f"{param} must be <= {cap} (this server's --max-tokens-cap), got {asked}",
                param=param,
            )
        return asked
    if cap is None:
        return default
    return cap if default is None else min(default, cap)


def limited(
    params: SamplingParams,
    *,
    max_n: int,
    asked: int | None,
    default: int | None,
    cap: int | None,
    n_param: str = "n",
    max_tokens_param: str = "max_tokens",
) -> SamplingParams:
    """`params` checked against `max_n` and with max_tokens set by `max_tokens_for`; the
    `*_param` names are the fields as the client names them."""
    check_n(max_n, params.n, n_param)
    max_tokens = max_tokens_for(asked, default, cap, max_tokens_param)
    if max_tokens == params.max_tokens:
        return params
    return dataclasses.replace(params, max_tokens=max_tokens)
