"""Incremental detokenization with stop strings.

Text is re-decoded from all generated ids each step (robust for byte-level BPE, where one
character can span tokens) and text that could still become a stop string is held back, so a
stop string never reaches the client even across token boundaries.
"""

from __future__ import annotations

from typing import Any


class TextAssembler:
    """Turns generated token ids into text deltas and detects stop strings."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._emitted = 0
        self.stopped = False

    def _decode(self) -> str:
        text: str = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        return text

    def add(self, token_id: int) -> str:
        """Add a token; returns the text that may be sent now. Sets `stopped` on a stop string."""
        self._ids.append(token_id)
        text = self._decode()
        if text.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for the next token
        cut = -1
        for s in self._stop:
            found = text.find(s, max(0, self._emitted - len(s) + 1))
            if found != -1 and (cut == -1 or found < cut):
                cut = found
        if cut != -1:
            self.stopped = True
            delta = text[self._emitted : cut]
            self._emitted = max(self._emitted, cut)
            return delta
        safe_end = len(text) - self._hold
        if safe_end <= self._emitted:
            return ""
        delta = text[self._emitted : safe_end]
        self._emitted = safe_end
        return delta

    def flush(self) -> str:
        """The held-back tail once generation ends without a stop string."""
        if self.stopped:
            return ""
        text = self._decode()
        delta = text[self._emitted :]
        self._emitted = len(text)
        return delta
