"""Programmatic tasks with rewards in [0, 1] for byte-level models (token ids 0-255 are bytes), and their registry."""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from colocate.rl.arithmetic import ArithmeticTask


class Task(Protocol):
    """What the RL loop needs from a task: token-id prompts, a response length, a score in [0, 1], and a
    demonstration (the response a teacher would write) for the supervised warm start."""

    name: str
    max_new_tokens: int  # generate at most this many tokens; the score looks at no more
    ignore_eos: bool  # True: always generate max_new_tokens; False: a response ends at its EOS

    def sample_prompts(self, n: int, *, seed: int, split: Literal["train", "eval"] = "train") -> list[list[int]]: ...

    def score(self, prompt_ids: list[int], response_ids: list[int]) -> float: ...

    def demonstration(self, prompt_ids: list[int]) -> list[int]: ...


_PREFIX, _SUFFIX = b"say ", b": "


@dataclass(kw_only=True)
class RepeatLetterTask:
    """Prompt "say x: " (x drawn from `letters`); reward = share of the first `max_new_tokens`
    response tokens that are the byte of x. Dense, and about 1/vocab for a random model.

    >>> task = RepeatLetterTask(letters="ab", max_new_tokens=8)
    >>> prompts = task.sample_prompts(4, seed=0)          # e.g. [list(b"say b: "), ...]
    >>> task.score(list(b"say b: "), list(b"bbbbxxxx"))   # 0.5
    A constant policy ("always a") earns 1/len(letters); a full score needs copying the letter.
    Responses shorter than `max_new_tokens` (an early EOS) count the missing tokens as misses.
    """

    name: str = "repeat_letter"
    letters: str = "ab"
    max_new_tokens: int = 8
    ignore_eos: bool = True  # the score counts max_new_tokens tokens; an early EOS only loses hits

    def __post_init__(self) -> None:
        if (not self.letters or len(set(self.letters)) != len(self.letters)
                or not all(c in string.ascii_letters for c in self.letters)):
            raise ValueError(f"letters={self.letters!r} must be distinct ASCII letters, e.g. 'ab' or "
                             f"{string.ascii_lowercase!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")

    def sample_prompts(self, n: int, *, seed: int, split: Literal["train", "eval"] = "train") -> list[list[int]]:
        """`n` prompts from `seed`; there are only len(letters) prompts, so both splits draw from all of them."""
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r} must be 'train' or 'eval'")
        rng = random.Random(seed)  # a private stream: the same seed gives the same prompts anywhere
        return [[*_PREFIX, ord(rng.choice(self.letters)), *_SUFFIX] for _ in range(n)]

    def target(self, prompt_ids: list[int]) -> int:
        """The byte the response should repeat; ValueError for a prompt this task did not make."""
        letter = prompt_ids[len(_PREFIX)] if len(prompt_ids) == len(_PREFIX) + 1 + len(_SUFFIX) else -1
        if letter < 0 or prompt_ids != [*_PREFIX, letter, *_SUFFIX] or chr(letter) not in self.letters:
            raise ValueError(f"prompt {prompt_ids!r} is not 'say x: ' with x in {self.letters!r}; "
                             f"score prompts made by this task's sample_prompts")
        return letter

    def score(self, prompt_ids: list[int], response_ids: list[int]) -> float:
        target = self.target(prompt_ids)
        num_hits = sum(1 for i in response_ids[:self.max_new_tokens] if i == target)
        return num_hits / self.max_new_tokens

    def demonstration(self, prompt_ids: list[int]) -> list[int]:
        return [self.target(prompt_ids)] * self.max_new_tokens


# name -> factory; keyword arguments given to get_task override the factory's defaults.
TASKS: dict[str, Callable[..., Task]] = {
    # Two letters: even a policy that ignores the prompt can reach 0.5, so a tiny model learns fast.
    "repeat_letter": lambda **kw: RepeatLetterTask(**{"name": "repeat_letter", "letters": "ab", **kw}),
    # The whole lowercase alphabet: a constant policy earns only 1/26, so this needs real copying.
    "repeat_letter_az": lambda **kw: RepeatLetterTask(**{"name": "repeat_letter_az",
                                                         "letters": string.ascii_lowercase, **kw}),
    # Addition and subtraction, 1 to 3 digits, exact match; a random model never gets one right: warm-start it.
    "arithmetic": lambda **kw: ArithmeticTask(**{"name": "arithmetic", **kw}),
}


def get_task(name: str, **overrides: Any) -> Task:
    """The registered task `name`, e.g. get_task("repeat_letter", max_new_tokens=16)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    try:
        return TASKS[name](**overrides)
    except TypeError as e:  # an override the task does not have
        raise ValueError(f"task {name!r} does not take {sorted(overrides)}: {e}") from None
