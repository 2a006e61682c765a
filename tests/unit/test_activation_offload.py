"""Activation offloading: gradients are unchanged, parameters and small tensors stay, the graph is not mixed up."""

from __future__ import annotations

import pytest
import torch

from colocate.model import DenseCausalAttention, load_model
from colocate.trainer.activations import ActivationOffload


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    b, t = ids.shape
    hidden = model(ids.flatten(), torch.arange(t).repeat(b), DenseCausalAttention(batch_size=b, seq_len=t))
    return torch.log_softmax(model.compute_logits(hidden).float(), -1).mean()


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("checkpointed", [False, True])
def test_offloaded_activations_give_identical_gradients(checkpointed: bool) -> None:
    model = load_model("tiny", device="cpu", dtype=torch.float32, max_positions=64)[0].train().requires_grad_(True)
    ids = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))

    def run(offload: ActivationOffload | None) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        forward = (lambda: torch.utils.checkpoint.checkpoint(loss_of, model, ids, use_reentrant=False)) \
            if checkpointed else (lambda: loss_of(model, ids))
        if offload is None:
            loss = forward()
        else:
            with offload:
                loss = forward()
        loss.backward()
        return grads(model)

    reference = run(None)
    offload = ActivationOffload(model, device=torch.device("cpu"), min_bytes=1024)
    offloaded = run(offload)
    if checkpointed:  # a checkpointed forward saves only its inputs (token ids: small, kept)
        assert offload.stats.tensors == 0 and offload.stats.kept >= 1
    else:
        assert offload.stats.tensors > 10 and offload.stats.bytes > 1 << 16 and offload.stats.kept > 0
    assert all(torch.equal(a, b) for a, b in zip(reference, offloaded))


def test_the_host_pool_is_reused_by_the_next_forward_and_never_shared_by_two_live_ones() -> None:
    import gc
    model = load_model("tiny", device="cpu", dtype=torch.float32, max_positions=64)[0].train().requires_grad_(True)
    ids = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))
    offload = ActivationOffload(model, device=torch.device("cpu"), min_bytes=1024)
    offload.pool.CHUNK_BYTES = 1 << 16  # small chunks: the forward spans several
    sizes = []
    for _ in range(3):
        with offload:
            loss = loss_of(model, ids)
        loss.backward()
        del loss
        gc.collect()
        sizes.append(offload.pool.nbytes)
        assert sum(c.numel() for c in offload.pool.free) == offload.pool.nbytes  # all back once the graph is gone
    assert offload.stats.bytes <= sizes[0] < 2 * offload.stats.bytes + (1 << 16) and sizes == [sizes[0]] * 3
    model.zero_grad(set_to_none=True)
    other = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(1))  # overwritten chunks would show
    (loss_of(model, ids) + loss_of(model, other)).backward()
    reference = grads(model)
    model.zero_grad(set_to_none=True)
    with offload:
        first = loss_of(model, ids)
    with offload:  # a second forward while the first's graph lives: new chunks, none of the first's
        second = loss_of(model, other)
    assert offload.pool.nbytes >= sizes[0] + offload.stats.bytes
    (first + second).backward()
    assert all(torch.equal(a, b) for a, b in zip(reference, grads(model)))
    del first, second
    gc.collect()
    pinned = offload.pool.nbytes
    assert offload.pool.release() == pinned and offload.pool.nbytes == 0 and not offload.pool.free


def test_parameters_and_small_tensors_stay_and_two_graphs_do_not_mix() -> None:
    layer = torch.nn.Linear(64, 64)
    offload = ActivationOffload(layer, device=torch.device("cpu"), min_bytes=64 * 64 * 4)
    x1, x2 = torch.randn(64, 64, requires_grad=True), torch.randn(64, 64, requires_grad=True)
    with offload:
        y1 = (layer(x1) ** 2).sum()  # saves x1 (offloaded), the weight (kept), layer(x1) for the square
    first = offload.stats
    assert first.kept >= 1 and first.tensors >= 1
    with offload:
        y2 = (layer(x2) ** 2).sum()  # a second forward before the first backward
    y1.backward()
    y2.backward()
    g1 = torch.autograd.grad((layer(x1) ** 2).sum(), x1)[0]
    g2 = torch.autograd.grad((layer(x2) ** 2).sum(), x2)[0]
    assert torch.equal(x1.grad, g1) and torch.equal(x2.grad, g2)
    with pytest.raises(ValueError, match="min_bytes"):
        ActivationOffload(layer, device=torch.device("cpu"), min_bytes=-1)


def test_a_trainer_with_offloaded_activations_takes_the_same_steps() -> None:
    from colocate.rl import PPOConfig
    from colocate.trainer import PPOTrainer, TrainerConfig
    from tests.unit.test_rollout_trainer import random_batch

    ppo = PPOConfig(rollout_batch_size=4, minibatch_size=2, ppo_epochs=1, lr=1e-3, kl_coef=0.01)
    plain = PPOTrainer(TrainerConfig(model="tiny", max_positions=64), ppo)
    offloaded = PPOTrainer(TrainerConfig(model="tiny", max_positions=64, offload_activations=True), ppo)
    offloaded.activations.min_bytes = 0  # tiny activations: offload every one
    for trainer in (plain, offloaded):
        batch = random_batch(seed=0)
        trainer.prepare(batch)
        stats = trainer.train(batch)
    assert stats["activation_offload_bytes"] > 0
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(plain.named_weights(), offloaded.named_weights()))
