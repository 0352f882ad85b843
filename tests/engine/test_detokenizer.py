"""IncrementalDetokenizer: streamed deltas rebuild the full decode; stop strings cut the text.

Two tokenizers: SmolLM2's byte-level BPE (GGUF bundled with the repo), which splits CJK and
emoji over several byte tokens, and a tiny SentencePiece-style BPE with byte fallback built
offline here ("▁" for spaces, `<0xE4>`-style byte tokens for characters outside its vocabulary).
"""

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from xlaserve.engine.detokenizer import DetokenizerUpdate, IncrementalDetokenizer

FFFD = "\ufffd"

REAL_TEXTS = [
    "The answer is 42. STOP here, then more text.",
    "Café naïve résumé — déjà vu, Œuvre, Ångström, e\u0301 (combining accent)",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 🤖🚀 family 👩‍👩‍👧 flag 🇯🇵 skin tone 👍🏽 done",
    "  leading spaces, tabs\tand\nnew lines\n\n  end ",
    "mixed: x=∑ᵢ αᵢ² ≤ ∞ ✓ « quotes » 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]

TINY_SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a test of the tokenizer",
    "stop here and there, then go on. END of text",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


@pytest.fixture(scope="module")
def smol():
    from xlaserve.checkpoints.presets import resolve_bundled
    from xlaserve.checkpoints.tokenizer import load_tokenizer

    return load_tokenizer(resolve_bundled("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def smol_prompt(smol):
    """A chat prompt ending in `<|im_start|>assistant\\n`, as the engine would see it."""
    messages = [{"role": "user", "content": "Say something."}]
    text = smol.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return smol.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def tiny():
    """A Llama-style SentencePiece BPE with byte fallback, trained on ASCII sentences only,
    so every non-ASCII character (and rare ASCII ones) is spelled with 1-4 byte tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(TINY_SENTENCES, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_end|>"],
    )


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(tok, prompt, outputs, *, chunk=1, **kwargs):
    """Feeds outputs `chunk` tokens at a time; returns (deltas, updates, detokenizer).

    The last delta is `flush()`'s when no stop string matched."""
    detok = IncrementalDetokenizer(tok, prompt, **kwargs)
    updates = []
    for i in range(0, len(outputs), chunk):
        updates.append(detok.append(outputs[i : i + chunk]))
        if updates[-1].stop_str is not None:
            break
    deltas = [u.delta for u in updates]
    if updates and updates[-1].stop_str is not None:
        assert detok.flush() == ""
    else:
        deltas.append(detok.flush())
    return deltas, updates, detok


def in_context_decode(tok, prompt, outputs, skip_special_tokens=True) -> str:
    """The outputs' text with the prompt as left context (what streaming produces)."""
    full = tok.decode(prompt + outputs, skip_special_tokens=skip_special_tokens)
    head = tok.decode(prompt, skip_special_tokens=skip_special_tokens)
    assert full.startswith(head)
    return full[len(head) :]


# --- deltas rebuild the decode ------------------------------------------------------------------


@pytest.mark.parametrize("text", REAL_TEXTS)
def test_smol_deltas_rebuild_text_without_replacement_chars(smol, smol_prompt, text):
    outputs = encode(smol, text)
    deltas, updates, detok = stream(smol, smol_prompt, outputs)
    assert all(FFFD not in d for d in deltas), deltas
    assert "".join(deltas) == detok.text == smol.decode(outputs) == text
    assert all(u.stop_str is None for u in updates)
    if any(ord(c) > 0x7FF for c in text):  # 3-4 byte characters: split over byte tokens
        assert "" in deltas[:-1]


@pytest.mark.parametrize("text", REAL_TEXTS)
def test_tiny_byte_fallback_deltas_rebuild_text(tiny, text):
    prompt = encode(tiny, "hello world")
    outputs = encode(tiny, text)
    deltas, _, detok = stream(tiny, prompt, outputs)
    assert all(FFFD not in d for d in deltas), deltas
    assert "".join(deltas) == detok.text == in_context_decode(tiny, prompt, outputs)


def test_tiny_character_split_over_byte_tokens_is_emitted_once_complete(tiny):
    prompt = encode(tiny, "hello")
    outputs = encode(tiny, " 你🤖")
    # "▁" then 3 byte tokens for 你 and 4 for 🤖.
    assert tiny.convert_ids_to_tokens(outputs) == [
        "▁",
        "<0xE4>",
        "<0xBD>",
        "<0xA0>",
        "<0xF0>",
        "<0x9F>",
        "<0xA4>",
        "<0x96>",
    ]
    detok = IncrementalDetokenizer(tiny, prompt)
    deltas = [detok.append([t]).delta for t in outputs]
    assert deltas == [" ", "", "", "你", "", "", "", "🤖"]
    assert detok.flush() == ""


def test_sentencepiece_leading_space_is_kept_in_context(tiny):
    prompt, outputs = encode(tiny, "hello"), encode(tiny, " the")
    assert tiny.convert_ids_to_tokens(outputs) == ["▁the"]
    deltas, _, detok = stream(tiny, prompt, outputs)
    # Decoded alone, "▁the" loses its space (the decoder strips the first one); in the stream
    # it follows the prompt, so the client sees " the" (as with vLLM).
    assert tiny.decode(outputs) == "the"
    assert deltas == [" the", ""]
    assert detok.text == " the"


def test_empty_prompt_and_no_outputs(smol):
    detok = IncrementalDetokenizer(smol, [])
    assert detok.text == ""
    assert detok.flush() == ""
    deltas, _, detok = stream(smol, [], encode(smol, "Hi 🤖"))
    assert "".join(deltas) == detok.text == "Hi 🤖"


def test_several_tokens_per_append(smol, smol_prompt):
    text = REAL_TEXTS[3]
    outputs = encode(smol, text)
    for chunk in (2, 3, 7):
        deltas, _, detok = stream(smol, smol_prompt, outputs, chunk=chunk)
        assert "".join(deltas) == detok.text == text


def test_incomplete_character_at_the_end_is_flushed_as_decode_does(smol, smol_prompt):
    outputs = encode(smol, "ok 🤖")[:-1]  # the emoji's last byte token is missing
    detok = IncrementalDetokenizer(smol, smol_prompt)
    streamed = "".join(detok.append([t]).delta for t in outputs)
    assert streamed == "ok"  # " " is in the same token as the emoji's first bytes
    assert detok.flush() == " " + FFFD
    assert detok.text == smol.decode(outputs) == "ok " + FFFD


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_smol_random_token_ids_rebuild_decode(smol, smol_prompt, data):
    """Any token sequence, specials and invalid UTF-8 included."""
    outputs = data.draw(st.lists(st.integers(0, len(smol) - 1), max_size=24))
    skip = data.draw(st.booleans())
    chunk = data.draw(st.integers(1, 3))
    deltas, _, detok = stream(smol, smol_prompt, outputs, chunk=chunk, skip_special_tokens=skip)
    expected = smol.decode(outputs, skip_special_tokens=skip)
    assert "".join(deltas) == detok.text == expected


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(
        alphabet=st.characters(exclude_categories=["Cs", "Co", "Cn"], exclude_characters=FFFD),
        max_size=30,
    )
)
def test_smol_random_text_streams_without_replacement_chars(smol, smol_prompt, text):
    outputs = encode(smol, text)
    # The GGUF vocabulary lacks a few byte tokens (e.g. 0xF1), so some rare characters do not
    # survive encoding at all; the stream must still equal the decode.
    expected = smol.decode(outputs)
    deltas, _, detok = stream(smol, smol_prompt, outputs)
    assert "".join(deltas) == detok.text == expected
    if expected == text:
        assert all(FFFD not in d for d in deltas)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(
        alphabet=st.characters(exclude_categories=["Cs"], exclude_characters=FFFD + "▁"),
        max_size=30,
    ),
    chunk=st.integers(1, 4),
)
def test_tiny_random_text_streams_without_replacement_chars(tiny, text, chunk):
    prompt = encode(tiny, "hello world")
    outputs = encode(tiny, text)
    deltas, _, detok = stream(tiny, prompt, outputs, chunk=chunk)
    assert all(FFFD not in d for d in deltas)
    assert "".join(deltas) == detok.text == in_context_decode(tiny, prompt, outputs)


# --- stop strings ------------------------------------------------------------------------------


def token_starts(tok, outputs) -> list[int]:
    """Character offset where each output token's text starts (all are whole characters here)."""
    return [len(tok.decode(outputs[:k])) for k in range(len(outputs))]


def tokens_spanned(tok, outputs, text, sub) -> int:
    start, end = text.index(sub), text.index(sub) + len(sub)
    starts = token_starts(tok, outputs) + [len(text)]
    return sum(1 for a, b in itertools.pairwise(starts) if a < end and b > start)


@pytest.mark.parametrize(
    ("stop", "spans"),
    [(" STOP", 2), ("2. S", 3), ("e answer i", 3)],
)
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(smol, smol_prompt, stop, spans, include):
    text = REAL_TEXTS[0]  # "The answer is 42. STOP here, then more text."
    outputs = encode(smol, text)
    assert tokens_spanned(smol, outputs, text, stop) == spans
    deltas, updates, detok = stream(
        smol, smol_prompt, outputs, stop=[stop], include_stop_str_in_output=include
    )
    cut = text.index(stop) + (len(stop) if include else 0)
    assert updates[-1].stop_str == stop == detok.stop_str
    assert "".join(deltas) == detok.text == text[:cut]
    # It stops at the token that completes the stop string, not later.
    assert len(updates) == next(
        k for k in range(len(outputs) + 1) if stop in smol.decode(outputs[:k])
    )
    with pytest.raises(RuntimeError, match="after the detokenizer finished"):
        detok.append(outputs[len(updates) :][:1])


def test_text_after_stop_in_the_same_token_never_appears(smol, smol_prompt):
    text = "The answer is 42. STOP here, then more text."
    outputs = encode(smol, text)
    # "ans" ends inside " answer"; "wer is 42..." must not leak, even with all tokens at once.
    for chunk in (1, len(outputs)):
        deltas, updates, detok = stream(smol, smol_prompt, outputs, chunk=chunk, stop=["ans"])
        assert detok.text == "".join(deltas) == "The "
        assert updates[-1] == DetokenizerUpdate(updates[-1].delta, "ans")
        deltas, _, detok = stream(
            smol, smol_prompt, outputs, chunk=chunk, stop=["ans"], include_stop_str_in_output=True
        )
        assert detok.text == "".join(deltas) == "The ans"


def test_possible_stop_prefix_is_held_back_then_flushed(smol, smol_prompt):
    outputs = encode(smol, "The answer is 42. ST")
    detok = IncrementalDetokenizer(smol, smol_prompt, stop=["STOP", "never"])
    streamed = "".join(detok.append([t]).delta for t in outputs)
    assert streamed == "The answer is 42. "  # "ST" might become "STOP"
    assert detok.text == "The answer is 42. ST"
    assert detok.flush() == "ST"
    assert detok.flush() == ""
    assert detok.stop_str is None


def test_held_back_text_is_released_once_the_stop_cannot_match(smol, smol_prompt):
    outputs = encode(smol, "The answer is 42. STAY")
    detok = IncrementalDetokenizer(smol, smol_prompt, stop=["STOP"])
    deltas = [detok.append([t]).delta for t in outputs]
    assert "".join(deltas) == "The answer is 42. STAY"
    assert detok.flush() == ""


def test_released_text_only_grows_and_is_what_was_streamed(smol, smol_prompt):
    # "ST" may start "STOP": it is in `text` but not yet released; the match then drops it.
    outputs = encode(smol, "The answer is ST") + encode(smol, "OP now")
    detok = IncrementalDetokenizer(smol, smol_prompt, stop=["STOP"])
    streamed, previous = "", ""
    for t in outputs:
        update = detok.append([t])
        streamed += update.delta
        assert detok.released_text == streamed and detok.released_text.startswith(previous)
        previous = detok.released_text
        if update.stop_str:
            break
    assert detok.text == streamed == "The answer is "


def test_only_a_possible_stop_prefix_is_held_back(smol, smol_prompt):
    detok = IncrementalDetokenizer(smol, smol_prompt, stop=["xyzzy"])
    assert detok.append(encode(smol, "Hello")).delta == "Hello"


def test_no_holdback_when_the_stop_string_is_included(smol, smol_prompt):
    outputs = encode(smol, "The answer is 42. ST")
    detok = IncrementalDetokenizer(
        smol, smol_prompt, stop=["STOP"], include_stop_str_in_output=True
    )
    assert "".join(detok.append([t]).delta for t in outputs) == "The answer is 42. ST"
    assert detok.flush() == ""


@pytest.mark.parametrize("chunk", [1, 100])
def test_earliest_of_several_stop_strings_wins(smol, smol_prompt, chunk):
    outputs = encode(smol, "The answer is 42. STOP here, then more text.")
    stops = ["then", "here", "42"]
    deltas, updates, detok = stream(smol, smol_prompt, outputs, chunk=chunk, stop=stops)
    assert detok.stop_str == "42"
    assert "".join(deltas) == detok.text == "The answer is "
    # Same start: the one that is complete first (the shorter) wins.
    deltas, _, detok = stream(smol, smol_prompt, outputs, chunk=chunk, stop=["STOP here", "STOP"])
    assert detok.stop_str == "STOP"
    assert "".join(deltas) == "The answer is 42. "


def test_stop_string_of_multibyte_characters_over_byte_tokens(tiny):
    prompt = encode(tiny, "hello")
    outputs = encode(tiny, " the 你好 world")
    for include, expected in ((False, " the "), (True, " the 你好")):
        deltas, _, detok = stream(
            tiny, prompt, outputs, stop=["你好"], include_stop_str_in_output=include
        )
        assert FFFD not in "".join(deltas)
        assert "".join(deltas) == detok.text == expected
        assert detok.stop_str == "你好"


def naive_stop_reference(tok, outputs, stops, include):
    """Decode after every token; stop at the first settled text that contains a stop string."""
    for k in range(1, len(outputs) + 1):
        text = tok.decode(outputs[:k])
        if text.endswith(FFFD):
            continue
        hits = [(text.find(s), len(s), s) for s in stops if s in text]
        if hits:
            start, length, s = min(hits)
            return text[: start + (length if include else 0)], s
    return tok.decode(outputs), None


WORDS = ["the", " answer", " is", " 42", ".", " STOP", " 你好", " 🤖", "é", " a", "\n", "ab"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_stop_strings_match_a_naive_reference(smol, smol_prompt, data):
    text = "".join(data.draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12)))
    substrings = st.integers(0, len(text) - 1).flatmap(
        lambda i: st.integers(i + 1, min(len(text), i + 6)).map(lambda j: text[i:j])
    )
    stops = data.draw(st.lists(substrings | st.sampled_from(WORDS), min_size=1, max_size=3))
    include = data.draw(st.booleans())
    chunk = data.draw(st.integers(1, 3))
    outputs = encode(smol, text)
    deltas, updates, detok = stream(
        smol, smol_prompt, outputs, chunk=chunk, stop=stops, include_stop_str_in_output=include
    )
    expected_text, expected_stop = naive_stop_reference(smol, outputs, stops, include)
    if chunk == 1:
        assert (detok.text, detok.stop_str) == (expected_text, expected_stop)
    elif expected_stop is not None:  # a chunk may complete a later-starting stop too
        assert detok.stop_str is not None
    assert "".join(deltas) == detok.text
    assert all(FFFD not in d for d in deltas)
    if detok.stop_str is not None:
        cut_stop = detok.text if include else detok.text + detok.stop_str
        assert text.startswith(cut_stop)


# --- special tokens and arguments ---------------------------------------------------------------


@pytest.mark.parametrize(("skip", "expected"), [(True, "Hi there"), (False, "Hi<|im_end|> there")])
def test_skip_special_tokens(smol, smol_prompt, skip, expected):
    im_end = smol.convert_tokens_to_ids("<|im_end|>")
    outputs = encode(smol, "Hi") + [im_end] + encode(smol, " there")
    deltas, _, detok = stream(smol, smol_prompt, outputs, skip_special_tokens=skip)
    assert "".join(deltas) == detok.text == expected


@pytest.mark.parametrize(("skip", "expected"), [(True, " 你"), (False, "<|im_end|> 你")])
def test_skip_special_tokens_tiny(tiny, skip, expected):
    im_end = tiny.convert_tokens_to_ids("<|im_end|>")
    prompt = encode(tiny, "hello") + [im_end]
    outputs = [im_end] + encode(tiny, "你")
    deltas, _, detok = stream(tiny, prompt, outputs, skip_special_tokens=skip)
    assert FFFD not in "".join(deltas)
    assert "".join(deltas) == detok.text == expected


def test_stop_string_in_a_special_token_only_when_not_skipped(smol, smol_prompt):
    im_end = smol.convert_tokens_to_ids("<|im_end|>")
    outputs = encode(smol, "Hi") + [im_end] + encode(smol, " there")
    _, _, detok = stream(smol, smol_prompt, outputs, stop=["im_end"])
    assert (detok.text, detok.stop_str) == ("Hi there", None)
    _, _, detok = stream(smol, smol_prompt, outputs, stop=["im_end"], skip_special_tokens=False)
    assert (detok.text, detok.stop_str) == ("Hi<|", "im_end")


@pytest.mark.parametrize("stop", [[""], ["ok", ""]])
def test_empty_stop_string_is_rejected(smol, stop):
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(smol, [], stop=stop)


def test_fast_tokenizers_decode_through_their_backend_with_the_same_text(smol):
    # SmolLM2's tokenizer is transformers' fast tokenizer: the detokenizer calls the tokenizers
    # backend directly, and it gives transformers' decode, special tokens kept or skipped.
    from xlaserve.engine.detokenizer import backend_decode

    decode = backend_decode(smol)
    assert decode is not None
    ids = smol.encode("<|im_start|>user\nHé, 日本語 ok?<|im_end|>", add_special_tokens=False)
    for skip in (True, False):
        want = smol.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        assert decode(ids, skip_special_tokens=skip) == want

    class OwnDecode(type(smol)):  # a subclass with its own _decode keeps transformers' path
        def _decode(self, *args, **kwargs):
            return super()._decode(*args, **kwargs)

    smol_own = OwnDecode.__new__(OwnDecode)
    smol_own.__dict__.update(smol.__dict__)
    assert backend_decode(smol_own) is None
