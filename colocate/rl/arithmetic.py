"""Multi-digit addition and subtraction with an exact-match reward and held-out evaluation problems."""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Literal

from colocate.model.tokenizer import BYTE_EOS

_PROMPT = re.compile(rb"(\d+)([+-])(\d+)=")
_MAX_TRIES = 10_000  # draws per prompt before the split is called empty


@dataclass(kw_only=True)
class ArithmeticTask:
    """Prompt "37+85=" or "37-85=" (bytes); reward 1 when the response up to its EOS is exactly the answer.

    >>> task = ArithmeticTask(max_digits=2)
    >>> prompt = task.sample_prompts(1, seed=0)[0]              # e.g. list(b"37-85=")
    >>> task.score(prompt, [*b"-48", BYTE_EOS])                  # 1.0; "-48 " or "048" score 0.0
    >>> task.demonstration(prompt)                              # [*b"-48", BYTE_EOS]: a worked example
    Operands have `min_digits` to `max_digits` digits (the count drawn uniformly, then the number);
    subtraction may go below zero. A fixed share of all problems (`eval_fraction`, chosen by a hash
    of the problem's text) is held out: `split="train"` never samples them, `split="eval"` only them.
    """

    name: str = "arithmetic"
    min_digits: int = 1
    max_digits: int = 3
    ops: str = "+-"
    eval_fraction: float = 0.1
    max_new_tokens: int = 0  # 0: room for the longest answer, a sign and the EOS (max_digits + 2)
    ignore_eos: bool = False  # generation stops at EOS: the answer's length is part of being right

    def __post_init__(self) -> None:
        if not isinstance(self.min_digits, int) or not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"min_digits={self.min_digits!r} must be an integer from 1 to max_digits="
                             f"{self.max_digits!r}")
        if not isinstance(self.max_digits, int) or self.max_digits > 18:
            raise ValueError(f"max_digits={self.max_digits!r} must be an integer <= 18")
        if not self.ops or set(self.ops) - set("+-") or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops={self.ops!r} must be '+', '-' or '+-'")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction!r} must be in [0, 1); 0 holds nothing out")
        if self.max_new_tokens == 0:
            self.max_new_tokens = self.max_digits + 2
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < self.max_digits + 2:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be >= max_digits + 2 = "
                             f"{self.max_digits + 2}: the longest answer, its sign or carry, and the EOS")

    def sample_prompts(self, n: int, *, seed: int, split: Literal["train", "eval"] = "train") -> list[list[int]]:
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r} must be 'train' or 'eval'")
        rng = random.Random(seed)  # a private stream: the same seed gives the same prompts anywhere
        want_eval = split == "eval"
        prompts = []
        for _ in range(n):
            for _ in range(_MAX_TRIES):
                text = f"{self._operand(rng)}{rng.choice(self.ops)}{self._operand(rng)}=".encode()
                if self.eval_fraction == 0 or self.is_held_out(text) == want_eval:
                    prompts.append(list(text))
                    break
            else:
                raise ValueError(f"no {split} problem found in {_MAX_TRIES} draws: with {self.max_digits}-digit "
                                 f"operands and eval_fraction={self.eval_fraction} the {split} split is (nearly) "
                                 "empty; allow more digits or change eval_fraction")
        return prompts

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)

    def is_held_out(self, text: bytes) -> bool:
        """Whether the problem `text` (e.g. b"37+85=") belongs to the evaluation split: a stable hash, any process."""
        return zlib.crc32(text) / 2**32 < self.eval_fraction

    def answer(self, prompt_ids: list[int]) -> str:
        """The exact answer text; ValueError for a prompt this task did not make."""
        is_bytes = all(isinstance(i, int) and 0 <= i < 256 for i in prompt_ids)
        match = _PROMPT.fullmatch(bytes(prompt_ids)) if is_bytes else None
        if match is None:
            raise ValueError(f"prompt {prompt_ids!r} is not 'a+b=' or 'a-b='; score prompts made by sample_prompts")
        a, op, b = int(match[1]), match[2], int(match[3])
        return str(a + b if op == b"+" else a - b)

    def score(self, prompt_ids: list[int], response_ids: list[int]) -> float:
        end = response_ids.index(BYTE_EOS) if BYTE_EOS in response_ids else len(response_ids)
        text = response_ids[:end]
        if not all(0 <= i < 256 for i in text):
            return 0.0
        return float(bytes(text) == self.answer(prompt_ids).encode())

    def demonstration(self, prompt_ids: list[int]) -> list[int]:
        """The response a teacher would write: the answer's bytes, then EOS (the warm start trains on these)."""
        return [*self.answer(prompt_ids).encode(), BYTE_EOS]
