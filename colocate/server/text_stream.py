"""One choice's text as its tokens arrive: decoded incrementally, held back where it may change, cut at a stop string."""

from __future__ import annotations

from colocate.model import Tokenizer

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence: the next token may complete it


class ChoiceText:
    """The text of one choice, released piece by piece, never a character that could still change.

    >>> text = ChoiceText(tokenizer, stops=["\\n\\n"], needs_offsets=True)
    >>> piece, tokens = text.add([72, 105], is_last=False)   # "Hi", and token indices range(0, 2)
    A piece ends before a trailing U+FFFD (an incomplete character) and before the longest tail
    that could begin a stop string. Once a stop string appears, the text ends before it, the
    tokens wholly before the cut are kept (`num_tokens`), and `is_stopped` is set. `tokens` are
    the tokens a piece completes: what a streamed chunk reports logprobs for.
    """

    def __init__(self, tokenizer: Tokenizer | None, *, stops: list[str], needs_offsets: bool) -> None:
        if stops and tokenizer is None:
            raise ValueError("stop strings need a tokenizer and this model has none; use token ids and no stop")
        self.tokenizer, self.stops = tokenizer, stops
        self.needs_offsets = needs_offsets or bool(stops)
        self.ids: list[int] = []
        self.offsets: list[int] = []  # offsets[i]: characters of the text of tokens [0, i], when needed
        self.text = ""  # the text released so far
        self.num_tokens = 0  # tokens released so far (the kept ones, once stopped)
        self.is_stopped = False
        self._longest_stop = max((len(s) for s in stops), default=0)

    def add(self, ids: list[int], *, is_last: bool) -> tuple[str, range]:
        """Take new token ids; (the text they release, the indices of the tokens that text completes)."""
        if self.is_stopped:
            return "", range(self.num_tokens, self.num_tokens)
        self.ids.extend(ids)
        if self.tokenizer is None:  # token ids only: no text, every token released at once
            return self._release("", len(self.ids))
        full = self.tokenizer.decode(self.ids)
        if self.needs_offsets:
            # Quadratic in the choice's length (one decode per token), like any exact per-token offset.
            self.offsets.extend(len(self.tokenizer.decode(self.ids[:j + 1]))
                                for j in range(len(self.offsets), len(self.ids)))
        cut = self._find_stop(full)
        if cut is not None:
            self.is_stopped = True
            keep = next((i for i, end in enumerate(self.offsets) if end > cut), len(self.ids))
            return self._release(full[:cut], keep)
        end = len(full) if is_last else self._stable_end(full)
        if is_last or not self.needs_offsets:
            return self._release(full[:end], len(self.ids) if is_last or end == len(full) else self.num_tokens)
        return self._release(full[:end], next((i for i, o in enumerate(self.offsets) if o > end), len(self.offsets)))

    def _release(self, text: str, num_tokens: int) -> tuple[str, range]:
        text = text if len(text) >= len(self.text) else self.text  # what was sent stays sent
        piece, self.text = text[len(self.text):], text
        num_tokens = max(num_tokens, self.num_tokens)
        tokens, self.num_tokens = range(self.num_tokens, num_tokens), num_tokens
        return piece, tokens

    def _find_stop(self, full: str) -> int | None:
        # A stop may straddle what was released and what is new: look back one stop's length.
        start = max(0, len(self.text) - self._longest_stop + 1)
        cuts = [i for s in self.stops if (i := full.find(s, start)) >= 0]
        return min(cuts) if cuts else None

    def _stable_end(self, full: str) -> int:
        """Where the text that cannot change yet ends: before a trailing U+FFFD or a possible stop's start."""
        end = len(full)
        while end > len(self.text) and full[end - 1] == REPLACEMENT:
            end -= 1
        for n in range(min(self._longest_stop - 1, end), 0, -1):
            if any(s.startswith(full[end - n:end]) for s in self.stops):
                return end - n
        return end
