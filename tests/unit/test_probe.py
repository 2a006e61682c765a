"""The logprob probe of a weight update: it passes the sender's own weights and refuses anyone else's."""

from __future__ import annotations

import math

import pytest
import torch

from colocate import Engine, EngineConfig, SamplingParams, launch_engine
from colocate.model import LogprobProbe, load_model, make_probe, probe_token_ids, sequence_logprobs

CONFIG = {"model": "tiny", "device": "cpu", "dtype": "bfloat16", "max_model_len": 64, "kv_cache_bytes": 1 << 20,
          "max_num_seqs": 4, "seed": 0}
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)


def trainer(seed: int) -> torch.nn.Module:
    """A float32 copy of the tiny preset with the weights of `seed` (the sender's side)."""
    return load_model("tiny", device="cpu", dtype=torch.float32, seed=seed, max_positions=64)[0]


def test_probe_tokens_are_fixed_and_cover_the_vocabulary() -> None:
    ids = probe_token_ids(50_000)
    assert ids == probe_token_ids(50_000) and len(ids) == 32 and len(set(ids)) > 28
    assert max(ids) < 50_000 and max(ids) > 25_000
    with pytest.raises(ValueError, match="vocab_size"):
        probe_token_ids(1)


def test_sequence_logprobs_match_a_token_by_token_softmax() -> None:
    model = trainer(0)
    ids = [5, 17, 200, 3, 99]
    lps = sequence_logprobs(model, ids)
    for t in range(1, len(ids)):
        prefix = sequence_logprobs(model, ids[:t + 1])
        assert prefix[-1] == pytest.approx(lps[t - 1], abs=1e-5)
    assert all(x <= 0 for x in lps)


@pytest.mark.parametrize("bad, match", [
    ({"token_ids": [1], "logprobs": []}, "token_ids"),
    ({"token_ids": [1, 2], "logprobs": [0.5]}, "logprobs"),
    ({"token_ids": [1, 2], "logprobs": [float("nan")]}, "logprobs"),
    ({"token_ids": [1, -2], "logprobs": [-1.0]}, "token_ids"),
    ({"token_ids": [1, 2], "logprobs": [-1.0], "tolerance": 0}, "tolerance"),
    ({"token_ids": [1, 2], "logprobs": [-1.0], "tolerance": "0.1"}, "tolerance"),
    ({"token_ids": [1, 2], "logprobs": [-1.0], "extra": 1}, "expected"),
    ([1, 2], "expected"),
])
def test_probe_json_is_checked_field_by_field(bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LogprobProbe.from_dict(bad)


def test_probe_passes_the_senders_weights_and_refuses_another_checkpoint() -> None:
    sender_a, sender_b = trainer(0), trainer(1)
    with Engine(EngineConfig(**{**CONFIG, "seed": 1})) as engine:
        good = engine.update_weights(sender_a.named_parameters(), version=1, verify=make_probe(sender_a))
        assert good["probe_ok"] and good["probe_mean_abs_diff"] < 0.05 and good["version"] == 1
        tokens = engine.generate([[1, 2, 3]], GREEDY)[0].token_ids
        # Weights of seed 1 announced with the probe of seed 0: copied, then refused before any step uses them.
        with pytest.raises(ValueError, match="logprob probe") as err:
            engine.update_weights(sender_b.named_parameters(), version=2, verify=make_probe(sender_a))
        assert "tolerance 0.1" in str(err.value)
        assert engine.weights_version == 1  # the refused update did not advance it
        with pytest.raises(RuntimeError, match="logprob probe"):
            engine.generate([[1, 2, 3]], GREEDY)
        # A good update lifts the refusal.
        engine.update_weights(sender_a.named_parameters(), version=3, verify=make_probe(sender_a))
        assert engine.generate([[1, 2, 3]], GREEDY)[0].token_ids == tokens


def test_a_probe_that_does_not_fit_the_model_changes_nothing() -> None:
    sender = trainer(0)
    with Engine(EngineConfig(**CONFIG)) as engine:
        before = engine.generate([[4, 5]], GREEDY)[0].token_ids
        too_long = LogprobProbe(tuple(range(2, 102)), tuple([-1.0] * 99))  # 100 tokens, 64 positions
        with pytest.raises(ValueError, match="do not fit"):
            engine.update_weights(trainer(1).named_parameters(), version=9, verify=too_long)
        assert engine.generate([[4, 5]], GREEDY)[0].token_ids == before
        del sender


def test_probe_travels_with_bucketed_updates_to_an_engine_process() -> None:
    sender_a, sender_b = trainer(0), trainer(1)
    with launch_engine(EngineConfig(**{**CONFIG, "seed": 1})) as engine:
        ok = engine.update_weights(sender_a.named_parameters(), version=1, verify=make_probe(sender_a))
        assert ok["probe_ok"] and math.isfinite(ok["probe_max_abs_diff"])
        with pytest.raises(Exception, match="logprob probe"):
            engine.update_weights(sender_b.named_parameters(), version=2, verify=make_probe(sender_a))
        with pytest.raises(Exception, match="logprob probe"):
            engine.generate([[1, 2, 3]], GREEDY)
        # The same layout again (sent by id this time) with the right probe is accepted.
        assert engine.update_weights(sender_b.named_parameters(), version=3, verify=make_probe(sender_b))["probe_ok"]
        assert engine.generate([[1, 2, 3]], GREEDY)[0].token_ids
