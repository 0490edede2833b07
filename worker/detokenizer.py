"""Incremental detokenization that never emits a broken UTF-8 character, plus stop strings.

Text is decoded from a short window of recent tokens (so a token's leading space
and merges come out right) and held back while it ends in U+FFFD, the mark of an
incomplete multi-byte character. With stop strings, the last len(stop) - 1
characters are held back until they can no longer start a stop string.

Special tokens, which decoding skips, never enter the window: they add no text, and a run
of them (a model repeating its end-of-turn token under ignore_eos) would otherwise hold
the window open, making every later decode longer than the last.
"""

from __future__ import annotations

from typing import Any


def skipped_ids(tokenizer: Any) -> frozenset[int]:
    """The ids `decode(..., skip_special_tokens=True)` drops: the added tokens marked special
    (what the tokenizers backend skips; SmolLM2 has 17, not only bos, eos and pad)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return frozenset(i for i, token in added.items() if getattr(token, "special", False))


class Detokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int],
        stop: tuple[str, ...],
        skipped: frozenset[int] | None = None,  # skipped_ids(tokenizer), computed once
    ) -> None:
        self.tokenizer = tokenizer
        self.skipped = skipped_ids(tokenizer) if skipped is None else skipped
        self.ids = list(prompt_ids[-6:])  # context for the first output tokens
        self.prefix = 0  # start of the decode window in self.ids
        self.read = len(self.ids)  # tokens before this are already in self.text
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all decoded output text
        self.emitted = 0  # characters of self.text already handed out

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append one token; returns (new text to emit, whether a stop string matched)."""
        if token_id in self.skipped:
            return self._release()
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(full) > len(before) and not full.endswith("\ufffd"):
            self.text += full[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def flush(self) -> str:
        """At the end: everything not yet emitted (held-back characters included)."""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def _release(self) -> tuple[str, bool]:
        found = [at for stop in self.stop if (at := self.text.find(stop, self.emitted)) >= 0]
        if found:
            self.text = self.text[: min(found)]
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out, True
        end = max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out, False
