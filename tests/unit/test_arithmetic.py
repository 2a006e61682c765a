"""The arithmetic task: prompts, exact-match scores, demonstrations, and a held-out split that never leaks."""

from __future__ import annotations

import pytest

from colocate.model.tokenizer import BYTE_EOS
from colocate.rl import get_task
from colocate.rl.arithmetic import ArithmeticTask


def test_scores_exact_matches_only() -> None:
    task = ArithmeticTask(max_digits=3)
    assert task.max_new_tokens == 5 and not task.ignore_eos
    assert task.answer(list(b"37+85=")) == "122" and task.answer(list(b"37-85=")) == "-48"
    prompt = list(b"37-85=")
    assert task.score(prompt, [*b"-48", BYTE_EOS]) == 1.0
    assert task.score(prompt, list(b"-48")) == 1.0  # cut at max_new_tokens: the text is still the answer
    assert task.score(prompt, [*b"-48", BYTE_EOS, *b"garbage"]) == 1.0  # nothing after the EOS counts
    for wrong in (b"48", b"-048", b"-48 ", b"-4", b"-480", b""):
        assert task.score(prompt, [*wrong, BYTE_EOS]) == 0.0, wrong
    assert task.score(prompt, [300, BYTE_EOS]) == 0.0  # a non-byte token is never right
    assert task.demonstration(prompt) == [*b"-48", BYTE_EOS]
    with pytest.raises(ValueError, match="sample_prompts"):
        task.answer(list(b"say a: "))
    with pytest.raises(ValueError, match="sample_prompts"):
        task.answer([*b"1+1", 300])


def test_prompts_follow_the_sizes_and_are_reproducible() -> None:
    task = ArithmeticTask(min_digits=2, max_digits=3, ops="-")
    prompts = task.sample_prompts(300, seed=4)
    assert prompts == task.sample_prompts(300, seed=4) and prompts != task.sample_prompts(300, seed=5)
    lengths = set()
    for prompt in prompts:
        a, b = bytes(prompt)[:-1].split(b"-")
        lengths |= {len(a), len(b)}
        assert not a.startswith(b"0") and not b.startswith(b"0")
        assert task.score(prompt, task.demonstration(prompt)) == 1.0
    assert lengths == {2, 3}
    assert any(task.answer(p).startswith("-") for p in prompts)  # subtraction goes below zero


def test_held_out_split_is_disjoint_and_covers_every_problem() -> None:
    # 1-digit sums: 100 problems, few enough to see them all.
    task = ArithmeticTask(max_digits=1, ops="+", eval_fraction=0.2)
    train = {bytes(p) for p in task.sample_prompts(3000, seed=0)}
    held_out = {bytes(p) for p in task.sample_prompts(3000, seed=0, split="eval")}
    assert not train & held_out
    assert len(train | held_out) == 100
    assert 10 <= len(held_out) <= 30  # about eval_fraction of them, chosen by a hash of the text
    assert all(task.is_held_out(p) for p in held_out)
    everything = ArithmeticTask(max_digits=1, ops="+", eval_fraction=0.0)
    assert len({bytes(p) for p in everything.sample_prompts(3000, seed=0, split="eval")}) == 100


@pytest.mark.parametrize("kwargs,match", [
    ({"min_digits": 0}, "min_digits"),
    ({"min_digits": 3, "max_digits": 2}, "min_digits"),
    ({"ops": "*"}, "ops"),
    ({"ops": "++"}, "ops"),
    ({"eval_fraction": 1.0}, "eval_fraction"),
    ({"max_digits": 3, "max_new_tokens": 4}, "max_new_tokens"),
])
def test_rejects_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ArithmeticTask(**kwargs)


def test_registry_and_split_errors() -> None:
    task = get_task("arithmetic", max_digits=2, ops="+")
    assert isinstance(task, ArithmeticTask) and task.max_new_tokens == 4
    with pytest.raises(ValueError, match="does not take"):
        get_task("repeat_letter", max_digits=2)
    with pytest.raises(ValueError, match="split"):
        task.sample_prompts(1, seed=0, split="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split"):
        get_task("repeat_letter").sample_prompts(1, seed=0, split="test")  # type: ignore[arg-type]
