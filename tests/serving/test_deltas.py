"""DeltaTracker: streamed deltas concatenate to the final output."""

from xlaserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from xlaserve.serving.deltas import DeltaTracker, Usage


def output(text, tokens, finish=None, stop_reason=None):
    sample = CompletionOutput(0, text, tokens, None, None, finish, stop_reason)
    return RequestOutput("r", None, [1, 2], None, [sample], finish is not None,
                         RequestMetrics(0.0))  # fmt: skip


def stream(outputs):
    tracker = DeltaTracker()
    deltas = [d for out in outputs for d in tracker.update(out)]
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas


def test_without_stop_strings_every_character_streams_at_once():
    outs = [output("ab", [1, 2]), output("abc", [1, 2, 3])]
    text, tokens, deltas = stream(outs)
    assert [d.text for d in deltas] == ["ab", "c"] and tokens == [1, 2, 3]


def test_a_sample_without_news_gets_no_delta_and_usage_adds_up():
    tracker = DeltaTracker()
    assert len(tracker.update(output("a", [1]))) == 1
    assert tracker.update(output("a", [1])) == []
    usage = Usage.of(output("a", [1])) + Usage.of(output("ab", [1, 2]))
    assert usage.openai()["total_tokens"] == 2 + 1 + 2 + 2
