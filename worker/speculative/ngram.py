"""Prompt-lookup proposals: continue the latest earlier occurrence of the last n tokens.

For a sequence t_0 … t_{m−1} (prompt and output), try n = max_n down to min_n (4 … 1): find the
latest i < m − n with t_i … t_{i+n−1} = t_{m−n} … t_{m−1} and propose t_{i+n} … t_{i+n+γ−1}
(fewer where the sequence ends first). Text that copies from its input (rewrite, extract,
summarize) repeats long spans of the prompt, so the proposals are often right; elsewhere
there is no match and nothing is proposed. No model runs.

The index maps every n-gram to the position just after its latest occurrence and grows by
max_n − min_n + 1 entries per appended token, so a lookup costs O(max_n) whatever the
length. Committed tokens only: a sequence's tokens never shrink (rejected drafts never
enter it), so the index is append-only.
"""

from __future__ import annotations

from collections.abc import Sequence


class NgramIndex:
    def __init__(self, max_n: int = 4, min_n: int = 1) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n = max_n
        self.min_n = min_n
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}  # n-gram → position after its latest end

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens; each new position i records the n-grams ending just before it."""
        for token in tokens:
            i = len(self.tokens)
            for n in range(self.min_n, min(self.max_n, i) + 1):
                self._next[tuple(self.tokens[i - n : i])] = i
            self.tokens.append(token)

    def sync(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        """Catch up with a sequence (prompt, then output) whose start is already indexed."""
        done = len(self.tokens)
        if done < len(prompt):
            self.extend(prompt[done:])
        self.extend(output[max(0, len(self.tokens) - len(prompt)) :])

    def propose(self, max_tokens: int) -> tuple[list[int], int]:
        """Up to max_tokens tokens continuing the longest matching suffix, and its length n
        (longer matches are right more often); ([], 0) when nothing matches."""
        m = len(self.tokens)
        if max_tokens <= 0:
            return [], 0
        for n in range(min(self.max_n, m), self.min_n - 1, -1):
            start = self._next.get(tuple(self.tokens[m - n :]))
            if start is not None:  # start < m: recorded only once a token followed it
                return self.tokens[start : start + max_tokens], n
        return [], 0
