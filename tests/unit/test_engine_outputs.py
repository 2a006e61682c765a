"""What a request can ask for beyond tokens: streamed deltas, top logprobs, prompt logprobs, penalties; and the
default max_model_len (the model's limit, capped by the KV cache)."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from colocate import Engine, EngineConfig, SamplingParams
from colocate.engine.sampler import Penalties, apply_penalties
from colocate.engine.stream import StreamEvent, submit_streaming
from colocate.model import save_preset

GREEDY = dict(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    engine = Engine(EngineConfig(model="tiny", device="cpu", max_model_len=128, seed=0))
    yield engine
    engine.shutdown()


def test_streamed_deltas_add_up_to_the_output_in_order(engine: Engine) -> None:
    events: list[StreamEvent] = []
    done = threading.Event()
    params = [SamplingParams(**GREEDY), SamplingParams(max_new_tokens=5, temperature=1.0, seed=3, top_logprobs=2, ignore_eos=True)]
    seqs = submit_streaming(engine, ["Hello", [1, 2, 3]], params,
                            on_delta=lambda i, d: events.append(StreamEvent(i, delta=d)),
                            on_finish=lambda i, s: events.append(StreamEvent(i, output=engine.output(s))),
                            on_done=lambda _: done.set())
    assert done.wait(60)
    for i, seq in enumerate(seqs):
        mine = [e for e in events if e.index == i]
        assert mine[-1].output is not None and all(e.delta is not None for e in mine[:-1])  # deltas, then the output
        streamed = [t for e in mine[:-1] for t in e.delta.token_ids]
        assert streamed == mine[-1].output.token_ids == seq.output().token_ids
        assert [lp for e in mine[:-1] for lp in e.delta.logprobs] == mine[-1].output.logprobs
    tops = [top for e in events if e.index == 1 and e.delta for top in e.delta.top_logprobs]
    output = next(e.output for e in events if e.index == 1 and e.output is not None)
    assert tops == output.top_logprobs and len(tops) == 5


def test_a_request_without_on_update_is_never_called_per_token(engine: Engine) -> None:
    calls: list[int] = []
    seqs = engine.submit("Hi", SamplingParams(**GREEDY), on_finish=lambda s: calls.append(s.seq_id))
    engine.core.wait(seqs)
    assert seqs[0].on_update is None and len(seqs[0].output().token_ids) == GREEDY["max_new_tokens"]


def test_top_logprobs_are_the_most_likely_tokens_of_the_sampled_distribution(engine: Engine) -> None:
    out = engine.generate("Hello", SamplingParams(**GREEDY, top_logprobs=4))[0]
    assert len(out.top_logprobs) == len(out.token_ids)
    for token, logprob, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert len(top) == 4 and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        assert top[0] == (token, logprob)  # greedy: the sampled token is the most likely one
    # top_k=2 leaves two tokens the request can sample: the others are not alternatives.
    out = engine.generate("Hello", SamplingParams(max_new_tokens=4, temperature=1.0, seed=1, top_k=2,
                                                  top_logprobs=5))[0]
    for token, top in zip(out.token_ids, out.top_logprobs):
        assert len(top) == 2 and token in [t for t, _ in top]
        assert math.isclose(sum(math.exp(lp) for _, lp in top), 1.0, rel_tol=1e-4)
    assert engine.generate("Hello", SamplingParams(**GREEDY))[0].top_logprobs is None


def test_prompt_logprobs_score_each_prompt_token_given_the_ones_before(engine: Engine) -> None:
    prompt = list(b"The colocated engine")
    first = engine.generate([prompt], SamplingParams(max_new_tokens=1, temperature=0.0))[0]
    # Scoring the prompt plus that greedy token gives the token the logprob greedy generation reported.
    scored = engine.generate([prompt + first.token_ids], SamplingParams(max_new_tokens=1, temperature=0.0,
                                                                        prompt_logprobs=3))[0]
    assert len(scored.prompt_logprobs) == len(prompt) + 1 and scored.prompt_logprobs[0] is None
    assert scored.prompt_logprobs[-1] == pytest.approx(first.logprobs[0], abs=1e-4)
    assert scored.prompt_top_logprobs[0] == [] and all(len(top) == 3 for top in scored.prompt_top_logprobs[1:])
    assert all(lp <= top[0][1] + 1e-6 for lp, top in zip(scored.prompt_logprobs[1:], scored.prompt_top_logprobs[1:]))


def test_penalties_lower_repeats_even_for_greedy_requests(engine: Engine) -> None:
    plain = engine.generate("Hello", SamplingParams(max_new_tokens=24, temperature=0.0))[0].token_ids
    present = engine.generate("Hello", SamplingParams(max_new_tokens=24, temperature=0.0,
                                                      presence_penalty=2.0))[0].token_ids
    frequent = engine.generate("Hello", SamplingParams(max_new_tokens=24, temperature=0.0,
                                                       frequency_penalty=2.0))[0].token_ids
    assert plain[0] == present[0] == frequent[0]  # nothing generated yet: nothing to penalise
    assert len(set(present)) > len(set(plain)) and len(set(frequent)) > len(set(plain))
    # A penalised row in a batch does not change its neighbours.
    batch = engine.generate(["Hello", "Hello"], [SamplingParams(max_new_tokens=24, temperature=0.0),
                                                 SamplingParams(max_new_tokens=24, temperature=0.0,
                                                                presence_penalty=2.0)])
    assert [o.token_ids for o in batch] == [plain, present]


def test_apply_penalties_is_openais_formula() -> None:
    logits = torch.zeros(3, 5)
    p = Penalties(rows=torch.tensor([0, 2]), presence=torch.tensor([0.5, 0.0]), frequency=torch.tensor([0.0, 1.5]),
                  token_rows=torch.tensor([0, 0, 0, 1, 1]), token_ids=torch.tensor([1, 1, 3, 4, 4]))
    out = apply_penalties(logits, p)
    assert out.tolist() == [[0, -0.5, 0, -0.5, 0], [0] * 5, [0, 0, 0, 0, -3.0]]
    assert logits.abs().sum() == 0  # the caller's tensor is untouched


@pytest.mark.parametrize("field, value", [("top_logprobs", -1), ("top_logprobs", 65), ("prompt_logprobs", 1.5),
                                          ("presence_penalty", 2.5), ("frequency_penalty", float("nan"))])
def test_bad_new_sampling_params_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


# -- max_model_len ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with a 256-position limit in its config.json."""
    folder = save_preset("tiny", tmp_path_factory.mktemp("tiny-256"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    return folder


def test_max_model_len_defaults_to_the_models_limit(short_checkpoint: Path) -> None:
    config = EngineConfig(model=str(short_checkpoint), device="cpu")
    assert config.max_model_len is None
    with Engine(config) as engine:
        limits = engine.limits()
        assert engine.config.max_model_len == limits["max_model_len"] == 256
        assert "max_position_embeddings=256" in limits["max_model_len_reason"]
        assert engine.generate([[1] * 250], SamplingParams(max_new_tokens=20, temperature=0.0))[0].finish_reason \
            == "length"
        with pytest.raises(ValueError, match="max_model_len=256"):
            engine.generate([[1] * 256], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="max_position_embeddings"):  # an explicit value is still checked
        Engine(EngineConfig(model=str(short_checkpoint), device="cpu", max_model_len=2048))


def test_max_model_len_default_is_capped_by_the_kv_cache_and_the_batch_budget() -> None:
    per_block = 2 * 4 * 16 * 4 * 32 * 4  # K and V, 4 layers, 16 tokens, 4 KV heads of 32, float32
    with Engine(EngineConfig(model="tiny", device="cpu", kv_cache_bytes=(62 + 1) * per_block)) as engine:
        limits = engine.limits()  # the pool holds 62 blocks (one more is the padding sink)
        assert limits["kv_cache_tokens"] == 62 * 16 and engine.config.max_model_len == 62 * 16
        assert "KV cache" in limits["max_model_len_reason"]
    with Engine(EngineConfig(model="tiny", device="cpu", max_num_batched_tokens=512)) as engine:
        assert engine.config.max_model_len == 512 and "max_num_batched_tokens" in engine.limits()["max_model_len_reason"]
