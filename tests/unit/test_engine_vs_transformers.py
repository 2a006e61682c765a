"""The engine's greedy tokens equal transformers' own greedy generate, for every supported family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from colocate import Engine, EngineConfig, SamplingParams
from tests.conftest import FAMILIES, VOCAB

NEW_TOKENS = 24


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 17, 40)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_generate(family: str, hf_checkpoints: dict[str, tuple[Any, Path]]) -> None:
    hf_model, folder = hf_checkpoints[family]
    engine = Engine(EngineConfig(model=str(folder), device="cpu", dtype="float32", max_model_len=128))
    prompts = _prompts()
    # All prompts in one continuous batch on our side; one at a time (no padding) on theirs.
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                    pad_token_id=0, eos_token_id=None)
        expected = ref[0, len(prompt):].tolist()
        assert len(set(expected)) > 1, "reference output is one repeated token; the comparison would prove little"
        assert out.token_ids == expected
        # The logprobs of the greedy tokens come from the same logits transformers computes.
        with torch.no_grad():
            logits = hf_model(ref).logits[0, len(prompt) - 1: -1].float()
        ref_logprobs = torch.log_softmax(logits, -1).gather(1, ref[0, len(prompt):, None])[:, 0]
        assert out.logprobs == pytest.approx(ref_logprobs.tolist(), abs=1e-4)
