"""SamplingParams(n): n responses per prompt share its prefill and KV blocks and equal n seeded requests."""

from __future__ import annotations

import pytest

from colocate import Engine, EngineConfig, SamplingParams
from colocate.engine.block_manager import BlockManager
from colocate.engine.request import SequenceFactory
from colocate.engine.scheduler import Scheduler

PROMPT = list(range(1, 38))  # 37 tokens: two full blocks of 16 and a partial one


def sampling(seed: int, n: int = 1, **kw: object) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 12, "temperature": 1.0, "seed": seed, "n": n, **kw})


@pytest.fixture(scope="module")
def engine():
    with Engine(EngineConfig(model="tiny", device="cpu", max_model_len=128, seed=0, block_size=16)) as e:
        yield e


def assert_same(group: list, singles: list) -> None:
    assert [o.token_ids for o in group] == [o.token_ids for o in singles]
    for a, b in zip(group, singles):  # float32 rows of differently composed batches: equal up to rounding
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_n_responses_equal_n_seeded_requests_prompt_major(engine: Engine) -> None:
    outs = engine.generate([PROMPT, [5, 6, 7]], sampling(100, n=4, top_logprobs=2, prompt_logprobs=1))
    assert len(outs) == 8 and [o.prompt_token_ids for o in outs] == [PROMPT] * 4 + [[5, 6, 7]] * 4
    singles = engine.generate([PROMPT] * 4 + [[5, 6, 7]] * 4,
                              [sampling(100 + i, top_logprobs=2, prompt_logprobs=1) for i in range(4)] * 2)
    assert_same(outs, singles)
    assert len({tuple(o.token_ids) for o in outs[:4]}) == 4  # independent streams, not copies
    for a, b in zip(outs, singles):  # every response reports the prompt's scores and its own alternatives
        assert a.prompt_logprobs == pytest.approx(b.prompt_logprobs, abs=1e-5)
        assert [[t for t, _ in top] for top in a.top_logprobs] == [[t for t, _ in top] for top in b.top_logprobs]
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.refs)  # every shared block came back


def make_scheduler(num_blocks: int = 20, max_num_seqs: int = 16) -> tuple[Scheduler, SequenceFactory]:
    bm = BlockManager(num_blocks, 16)
    return (Scheduler(block_manager=bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=4096, max_model_len=128,
                      eos_token_ids=[]),
            SequenceFactory(tokenizer=None, vocab_size=320, max_model_len=128, seed=0))


@pytest.mark.parametrize("prompt_len, copies", [(37, 3), (32, 0)])
def test_prompt_blocks_are_shared_and_freed_with_the_last_response(prompt_len: int, copies: int) -> None:
    scheduler, factory = make_scheduler()
    seqs = factory.make([list(range(1, prompt_len + 1))], sampling(1, n=4))
    for seq in seqs:
        scheduler.add(seq)
    assert scheduler.num_unfinished == 4 and len(scheduler.waiting) == 1
    batch = scheduler.schedule()
    assert batch.is_prefill and batch.seqs == seqs[:1]  # the prompt is prefilled once
    assert [child for _, child in batch.forks] == seqs[1:] and len(batch.copies) == copies
    bm = scheduler.block_manager
    leader_blocks = -(-prompt_len // 16)
    assert bm.num_blocks - bm.num_free_blocks == leader_blocks + copies  # not 4 x leader_blocks
    assert [bm.refs[b] for b in seqs[0].block_table[:prompt_len // 16]] == [4] * (prompt_len // 16)
    for src, dst in batch.copies:
        assert src == seqs[0].block_table[-1] and bm.refs[dst] == 1
    for seq in seqs[:3]:
        scheduler.abort(seq)
    assert bm.num_blocks - bm.num_free_blocks == leader_blocks  # the last response holds the prompt alone
    scheduler.abort(seqs[3])
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.refs)


def test_a_group_larger_than_the_batch_runs_the_rest_as_requests_of_their_own(engine: Engine) -> None:
    scheduler, factory = make_scheduler(max_num_seqs=3)
    seqs = factory.make([PROMPT], sampling(5, n=5))
    for seq in seqs:
        scheduler.add(seq)
    batch = scheduler.schedule()
    assert len(batch.sampled) == 3 and list(scheduler.waiting) == seqs[3:]
    assert all(seq.leader is None and not seq.siblings for seq in seqs)
    with Engine(EngineConfig(model="tiny", device="cpu", max_model_len=128, seed=0, block_size=16,
                             max_num_seqs=3)) as small:
        assert_same(small.generate([PROMPT], sampling(5, n=5)), engine.generate([PROMPT] * 5,
                                                                                [sampling(5 + i) for i in range(5)]))


def test_aborting_a_waiting_leader_hands_the_group_to_the_next_response() -> None:
    scheduler, factory = make_scheduler()
    seqs = factory.make([PROMPT], sampling(9, n=3))
    for seq in seqs:
        scheduler.add(seq)
    scheduler.abort(seqs[0])
    assert seqs[0].finish_reason == "abort" and scheduler.num_unfinished == 2
    batch = scheduler.schedule()
    assert batch.seqs == [seqs[1]] and [c for _, c in batch.forks] == [seqs[2]]
    scheduler.abort(seqs[2])  # a started response finishes alone
    assert scheduler.num_unfinished == 1
    aborted = scheduler.abort_all()
    assert aborted == [seqs[1]] and scheduler.num_unfinished == 0


def test_shared_prompts_survive_preemption() -> None:
    """A pool too small for every response at once: some are preempted and prefilled again, tokens unchanged."""
    config = {"model": "tiny", "device": "cpu", "max_model_len": 96, "seed": 0, "block_size": 16}
    params = sampling(21, n=6, max_new_tokens=40, ignore_eos=True)
    with Engine(EngineConfig(**config, kv_cache_bytes=14 * 16 * 2 * 2 * 64 * 4 * 2)) as tight, \
            Engine(EngineConfig(**config)) as roomy:
        outs = tight.generate([PROMPT], params)
        assert tight.scheduler.num_preemptions > 0
        assert_same(outs, roomy.generate([PROMPT] * 6, [sampling(21 + i, max_new_tokens=40, ignore_eos=True)
                                                         for i in range(6)]))


@pytest.mark.parametrize("n", [0, -1, 1025, 2.0, True])
def test_bad_n_is_refused(n: object) -> None:
    with pytest.raises(ValueError, match="n="):
        SamplingParams(n=n)


def test_an_engine_process_returns_n_responses_and_streams_them_by_index(engine: Engine) -> None:
    from colocate import launch_engine

    with launch_engine(EngineConfig(model="tiny", device="cpu", max_model_len=128, seed=0, block_size=16)) as child:
        outs = child.generate([PROMPT], sampling(70, n=3))
        events = list(child.generate_stream([PROMPT], sampling(70, n=3)))
    assert_same(outs, engine.generate([PROMPT] * 3, [sampling(70 + i) for i in range(3)]))
    finished = {e.index: e.output.token_ids for e in events if e.output is not None}
    assert finished == {i: o.token_ids for i, o in enumerate(outs)}


def test_responses_held_while_paused_survive_a_cancelled_leader(engine: Engine) -> None:
    """Requests that arrive while the engine sleeps are held; cancelling the group's first response then must
    neither lose the others nor run the cancelled one."""
    engine.release_memory()
    try:
        seqs = engine.submit([PROMPT], sampling(80, n=3))
        engine.abort(seqs[:1])
        held_sibling = engine.submit([[9, 9]], sampling(3, n=2))
        engine.abort(held_sibling[1:])  # a response cancelled while held, its leader alive
    finally:
        engine.resume_memory()
    engine.core.wait(seqs[1:] + held_sibling[:1])
    assert seqs[0].finish_reason == "abort" and held_sibling[1].finish_reason == "abort"
    alone = engine.generate([PROMPT] * 2, [sampling(81), sampling(82)])
    assert [s.output().token_ids for s in seqs[1:]] == [o.token_ids for o in alone]
    assert held_sibling[0].output().token_ids == engine.generate([[9, 9]], sampling(3))[0].token_ids
    assert engine.scheduler.num_unfinished == 0


def test_a_busy_engine_waits_for_room_so_that_every_group_shares_its_prefill() -> None:
    """8 prompts x n=8 through 16 slots: each group starts whole (one prefill row, 7 forks), none is split."""
    scheduler, factory = make_scheduler(num_blocks=200, max_num_seqs=16)
    groups = [factory.make([[p + 1] * 20], sampling(p, n=8)) for p in range(8)]
    for group in groups:
        for seq in group:
            scheduler.add(seq)
    forked, rows, steps = 0, 0, 0
    while scheduler.num_unfinished and steps < 500:
        batch = scheduler.schedule()
        steps += 1
        if batch is None:
            continue
        if batch.is_prefill:
            forked += len(batch.forks)
            rows += len(batch.seqs)
        for seq in list(batch.sampled):  # each response ends after 2 to 9 tokens
            seq.append(7, -1.0, None)
            if seq.num_generated >= 2 + seq.seed % 8:
                scheduler.running.remove(seq)
                scheduler.block_manager.free(seq)
                seq.finish("length")
    assert scheduler.num_unfinished == 0
    assert rows == 8 and forked == 56  # every prompt prefilled once, every other response forked
    bm = scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.refs)


def test_status_counts_every_waiting_response(engine: Engine) -> None:
    with engine.core.parked():  # no step runs: the group waits behind its leader
        seqs = engine.submit([PROMPT], sampling(1, n=8))
        assert engine.memory_status()["num_waiting"] == 8
    engine.core.wait(seqs)
    assert engine.memory_status()["num_waiting"] == 0
