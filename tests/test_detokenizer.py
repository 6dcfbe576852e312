"""Incremental detokenizer on the default model's real tokenizer: UTF-8 safety, stop strings."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from engine.detokenizer import IncrementalDetokenizer
from engine.model_files import default_model_dir
from engine.sampling_params import SamplingParams

MULTIBYTE_TEXTS = [
    "Hello 😀 world! 你好世界, café naïve — ß.",
    "日本語のテキストと絵文字 🇯🇵 👨‍👩‍👧 ok",
    "Ünïcödé àccénts: øæå ñ ç, Ελληνικά, русский, עברית 🎉🎉",
]


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[int]:
    return tokenizer.encode("Please write something:")


def stream(tokenizer, prompt_ids, ids, **params) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed ids one at a time; the pieces include finish()'s flush as the last one."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(**params))
    pieces = [detok.add_token(t) for t in ids]
    pieces.append(detok.finish())
    return pieces, detok


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_stream_matches_full_decode_without_replacement_chars(tokenizer, prompt_ids, text):
    ids = tokenizer.encode(text)
    # The test is only meaningful if the tokenizer splits some character across tokens.
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    pieces, detok = stream(tokenizer, prompt_ids, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert detok.text == text
    assert not any("\ufffd" in p for p in pieces)
    assert detok.stop_reason is None


def test_prompt_ending_inside_a_character(tokenizer):
    ids = tokenizer.encode("Hi 😀 there")
    split = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    pieces, _ = stream(tokenizer, ids[:split], ids[split:])
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces).endswith("😀 there")


def test_special_tokens_skipped_or_kept(tokenizer, prompt_ids):
    ids = tokenizer.encode("Done.") + [tokenizer.eos_token_id]
    pieces, _ = stream(tokenizer, prompt_ids, ids)
    assert "".join(pieces) == "Done."
    pieces, _ = stream(tokenizer, prompt_ids, ids, skip_special_tokens=False)
    assert "".join(pieces) == "Done." + tokenizer.eos_token


def _token_ends(tokenizer, ids: list[int]) -> list[int]:
    """Character offset in the decoded text where each token ends."""
    return [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]


def test_stop_string_spanning_tokens_is_not_leaked(tokenizer, prompt_ids):
    text = "The quick brown fox jumps over the lazy dog."
    stop = "ck bro"
    ids = tokenizer.encode(text)
    start = text.index(stop)
    ends = _token_ends(tokenizer, ids)
    assert any(start < e < start + len(stop) for e in ends), "stop must span a token boundary"
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(stop=[stop]))
    pieces = []
    for token in ids:
        pieces.append(detok.add_token(token))
        if detok.stop_reason is not None:
            break
    # Matched by the token that completes it, not later.
    last = len(pieces) - 1
    assert ends[last] >= start + len(stop) > ends[last - 1]
    assert detok.stop_reason == stop
    assert detok.add_token(ids[-1]) == ""
    assert detok.finish() == ""
    assert "".join(pieces) == detok.text == text[:start]
    assert not any(c in "".join(pieces) for c in "kbr")


def test_include_stop_str_in_output(tokenizer, prompt_ids):
    text = "The quick brown fox jumps."
    ids = tokenizer.encode(text)
    # "qu" ends inside the token " quick": the rest of that token must not be released.
    pieces, detok = stream(tokenizer, prompt_ids, ids, stop=["qu"], include_stop_str_in_output=True)
    assert "".join(pieces) == detok.text == "The qu"
    assert detok.stop_reason == "qu"


def test_earliest_stop_string_wins(tokenizer, prompt_ids):
    text = "The quick brown fox jumps."
    ids = tokenizer.encode(text)
    pieces, detok = stream(tokenizer, prompt_ids, ids, stop=["jumps", "fox", "brown"])
    assert detok.stop_reason == "brown"
    assert "".join(pieces) == "The quick "


def test_stop_result_does_not_depend_on_tokenization(tokenizer, prompt_ids):
    # Whole-text vs one-token-per-character: the stop that *completes* first must win.
    text = "xabcdey"
    per_char = [t for ch in text for t in tokenizer.encode(ch)]
    assert per_char != tokenizer.encode(text)
    for ids in (tokenizer.encode(text), per_char):
        pieces, detok = stream(tokenizer, prompt_ids, ids, stop=["abcde", "bcd"])
        assert (detok.stop_reason, "".join(pieces)) == ("bcd", "xa")


def test_stop_string_inside_multibyte_text(tokenizer, prompt_ids):
    text = "你好世界 again"
    ids = tokenizer.encode(text)
    pieces, detok = stream(tokenizer, prompt_ids, ids, stop=["世界"])
    assert detok.stop_reason == "世界"
    assert "".join(pieces) == "你好"
    assert not any("\ufffd" in p for p in pieces)


def test_held_back_text_is_flushed_by_finish(tokenizer, prompt_ids):
    text = "the quick brown fox"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(stop=["fox jumped"]))
    pieces = [detok.add_token(t) for t in ids]
    # "fox" could be the start of the stop string, so it is held back...
    assert "".join(pieces) == detok.text == "the quick brown "
    # ...at most len(stop) - 1 characters of it...
    assert len(text) - len(detok.text) <= len("fox jumped") - 1
    # ...until generation ends without the stop string.
    assert detok.finish() == "fox"
    assert detok.text == text
    assert detok.stop_reason is None


def test_stop_strings_wait_for_min_tokens(tokenizer, prompt_ids):
    ids = tokenizer.encode("a b a b a b")
    pieces, detok = stream(tokenizer, prompt_ids, ids, stop=[" b"], min_tokens=3, max_tokens=10)
    # The first " b" arrives as token 2 (<= min_tokens, ignored); the next one stops.
    assert detok.stop_reason == " b"
    assert "".join(pieces) == "a b a"


def test_add_token_after_finish_is_an_error(tokenizer, prompt_ids):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams())
    detok.finish()
    with pytest.raises(RuntimeError):
        detok.add_token(tokenizer.encode("x")[0])


def test_run_of_invalid_bytes_is_released_in_bounded_steps(tokenizer, prompt_ids):
    # Continuation bytes with no lead byte never form a character.
    continuation = tokenizer.encode("😀")[-1]
    assert tokenizer.decode([continuation] * 3).endswith("\ufffd")
    ids = [continuation] * 40 + tokenizer.encode(" hello")
    pieces, _ = stream(tokenizer, prompt_ids, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert any(pieces[:40]), "invalid bytes must not stay pending forever"
