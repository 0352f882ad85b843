"""The proposer a speculative config asks for, checked against the target model."""

from __future__ import annotations

from xlaserve.engine.runner_api import LoadedForRunner, RunnerConfig
from xlaserve.spec_decode.config import SpeculativeConfig
from xlaserve.spec_decode.proposer import NgramProposer, Proposer


def make_proposer(
    spec: SpeculativeConfig, target: LoadedForRunner, config: RunnerConfig
) -> Proposer:
    if spec.method == "ngram":
        return NgramProposer(spec, config.max_model_len)
    if spec.method == "draft_model":
        from xlaserve.spec_decode.draft_model import DraftModelProposer

        return DraftModelProposer(spec, target.draft, config, target.mesh)
    if spec.method in ("eagle", "eagle3"):
        from xlaserve.spec_decode.eagle import EagleProposer

        return EagleProposer(spec, target.draft, config)
    raise ValueError(f"speculative_config method {spec.method!r} is not available yet")
