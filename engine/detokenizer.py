"""Turn a stream of generated token ids into a stream of text pieces, with stop strings.

Each step decodes only a small window of tokens: those from `prefix` (already released
context) to the end, and emits what that adds to the decoding of the context alone. The
context matters because a token's text can depend on its left neighbours (SentencePiece's
leading space, byte-level BPE's split UTF-8 characters). While the window's text ends in
U+FFFD the last character is incomplete, so nothing is emitted until a later token ends it.

Stop strings are searched in the text not yet released; text that could still be the
start of a stop string is held back, so a stop string (and anything after it) never leaks.
"""

from __future__ import annotations

from typing import Any

from engine.sampling_params import SamplingParams

# Prompt tokens decoded as left context for the first generated token (as in vLLM).
_PROMPT_CONTEXT = 5
# A UTF-8 character has at most 4 bytes, so at most 4 tokens can hold a partial one.
_MAX_PARTIAL_TOKENS = 4
# More tokens than this whose text still ends in U+FFFD are invalid bytes, not a split char.
_MAX_PENDING_TOKENS = 16
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Incremental, UTF-8 safe detokenizer for one sequence; O(1) work per token."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self._tokenizer = tokenizer
        self._params = params
        self._skip_special = params.skip_special_tokens
        self._stops = list(params.stop)
        # Hold-back is only needed when the stop string itself must not be shown.
        self._max_hold = (
            0
            if params.include_stop_str_in_output or not self._stops
            else max(len(s) for s in self._stops) - 1
        )
        # Window of token ids: [0, read) is decoded context, [read, end) is pending.
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._read = len(self._ids)
        # If the prompt ends inside a character, let the output own that whole character.
        for _ in range(_MAX_PARTIAL_TOKENS):
            if self._read == 0 or not self._decode(self._ids[: self._read]).endswith(_REPLACEMENT):
                break
            self._read -= 1
        self._context_text = self._decode(self._ids[: self._read])
        self._held = ""  # decoded text not released yet: it might start a stop string
        self._pieces: list[str] = []
        self._num_output = 0
        self._stop_reason: str | None = None
        self._finished = False

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended generation, once one has matched."""
        return self._stop_reason

    @property
    def text(self) -> str:
        """All text released so far (including what finish() flushed)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add_token(self, token_id: int) -> str:
        """Add one generated token; return the text it makes releasable (possibly "")."""
        if self._finished:
            raise RuntimeError("add_token() called after finish()")
        if self._stop_reason is not None:
            return ""
        self._num_output += 1
        self._ids.append(token_id)
        end = len(self._ids)
        window_text = self._decode(self._ids)
        if window_text.endswith(_REPLACEMENT):
            if end - self._read <= _MAX_PENDING_TOKENS:
                return ""  # the last character is still incomplete
            # Invalid bytes, not a split character: release all but the tokens that may
            # hold an incomplete last character, so the window stays bounded.
            end -= _MAX_PARTIAL_TOKENS
            window_text = self._decode(self._ids[:end])
        new_text = window_text[len(self._context_text) :]
        # Slide the window: the tokens just decoded become the next step's context.
        del self._ids[: self._read]
        self._read = end - self._read
        self._context_text = self._decode(self._ids[: self._read])
        return self._accept(new_text)

    def finish(self) -> str:
        """Flush held-back text at the end of generation; "" if a stop string ended it.

        Bytes of a character left incomplete by the last token are dropped.
        """
        if self._finished:
            return ""
        self._finished = True
        if self._stop_reason is not None:
            return ""
        pending = self._decode(self._ids)[len(self._context_text) :].rstrip(_REPLACEMENT)
        released = self._accept(pending) if pending else ""
        if self._stop_reason is None and self._held:
            released += self._release(self._held)
            self._held = ""
        return released

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _accept(self, new_text: str) -> str:
        """Check stop strings in held + new text, then release all that cannot start one."""
        if not new_text:
            return ""
        buf = self._held + new_text
        if self._stops and self._num_output > self._params.min_tokens:
            match = self._find_stop(buf, len(self._held))
            if match is not None:
                stop, start = match
                self._stop_reason = stop
                self._held = ""
                end = start + len(stop) if self._params.include_stop_str_in_output else start
                return self._release(buf[:end])
        keep = self._hold_length(buf)
        self._held = buf[len(buf) - keep :]
        return self._release(buf[: len(buf) - keep])

    def _find_stop(self, buf: str, new_from: int) -> tuple[str, int] | None:
        """The stop string that ends first in buf among those ending at or after new_from.

        Ending first (not starting first) is what a character-by-character stream would
        see, so the result does not depend on how the text was split into tokens.
        """
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = buf.find(stop, max(0, new_from - len(stop) + 1))
            if start >= 0:
                candidate = (start + len(stop), start, stop)
                if best is None or candidate < best:
                    best = candidate
        return None if best is None else (best[2], best[1])

    def _hold_length(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for k in range(min(len(buf), self._max_hold), 0, -1):
            tail = buf[-k:]
            if any(stop.startswith(tail) for stop in self._stops):
                return k
        return 0

    def _release(self, piece: str) -> str:
        if piece:
            self._pieces.append(piece)
        return piece
