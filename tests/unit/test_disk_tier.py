"""The trainer's disk tier: a release to disk frees host memory too, a resume is bit-exact, no file is left."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from colocate.trainer.offload import TrainerOffload


def trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(4, 64)).pow(2).mean().backward()
        opt.step()
    return net, opt


def snapshot(net: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return ([p.detach().clone() for p in net.parameters()] + [p.grad.clone() for p in net.parameters()]
            + [v.clone() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)])


def test_release_to_disk_and_back_is_bit_exact_and_leaves_no_file(tmp_path: Path) -> None:
    net, opt = trained()
    before = snapshot(net, opt)
    offload = TrainerOffload(net, opt, device="cpu", disk_dir=tmp_path)
    report = offload.release(to="disk")
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].stat().st_size >= sum(t.numel() * t.element_size() for t in before)
    assert all(p.numel() == 0 for p in net.parameters())  # nothing held in memory
    assert offload.arena.nbytes == 0 and all("on disk" in t.message for t in report.tags.values())
    offload.resume()
    assert not list(tmp_path.iterdir())  # read back: the file is gone
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(net, opt)))
    # Training goes on from the restored state, and a second trip works the same way.
    opt.step()
    offload.release(to="disk")
    del offload
    gc.collect()
    assert not list(tmp_path.iterdir())  # an offload that goes away takes its file with it


def test_disk_tier_refuses_bad_folders_and_missing_config(tmp_path: Path) -> None:
    net, opt = trained()
    with pytest.raises(ValueError, match="not a folder"):
        TrainerOffload(net, opt, device="cpu", disk_dir=tmp_path / "missing")
    offload = TrainerOffload(net, opt, device="cpu")
    with pytest.raises(ValueError, match="disk_dir"):
        offload.release(to="disk")
    with pytest.raises(ValueError, match="'host' or 'disk'"):
        offload.release(to="nvme")
    assert all(p.device.type == "cpu" for p in net.parameters())  # refused: nothing moved


def test_a_trainer_released_to_disk_trains_on_exactly_like_one_released_to_host(tmp_path: Path) -> None:
    from colocate.rl import PPOConfig
    from colocate.trainer import PPOTrainer, TrainerConfig
    from tests.unit.test_rollout_trainer import random_batch

    ppo = PPOConfig(rollout_batch_size=4, minibatch_size=2, ppo_epochs=1, lr=1e-3, kl_coef=0.01)
    host = PPOTrainer(TrainerConfig(model="tiny", max_positions=64), ppo)
    disk = PPOTrainer(TrainerConfig(model="tiny", max_positions=64, offload_dir=str(tmp_path)), ppo)
    for iteration in range(2):
        for trainer in (host, disk):
            batch = random_batch(seed=iteration)
            trainer.prepare(batch)
            trainer.train(batch)
            trainer.release()
        assert len(list(tmp_path.iterdir())) == 2  # the policy's state and the reference's
        for trainer in (host, disk):
            trainer.resume()
        assert not list(tmp_path.iterdir())
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(host.named_weights(), disk.named_weights()))


def test_a_worker_with_the_disk_tier_updates_the_engine_and_leaves_no_file(tmp_path: Path) -> None:
    """The worker's setup sends a released trainer's weights: on disk it brings them back for the update."""
    from colocate import EngineConfig, SamplingParams
    from colocate.ray.worker import ColocatedWorker, WorkerConfig
    from colocate.rl import PPOConfig
    from colocate.trainer import TrainerConfig

    config = WorkerConfig(engine=EngineConfig(model="tiny", device="cpu", max_model_len=64),
                          trainer=TrainerConfig(model="tiny", max_positions=64, offload_dir=str(tmp_path)),
                          ppo=PPOConfig(rollout_batch_size=4, minibatch_size=2, ppo_epochs=1), engine_in_process=True,
                          verify_tolerance=0.01)
    worker = ColocatedWorker(config, rank=0, world_size=1)
    try:
        worker.setup()
        assert len(list(tmp_path.iterdir())) == 2  # released again after the update: policy and reference
        # The update carried the trainer's logprob probe: the engine holds exactly the trainer's weights.
        assert worker.last_probe["probe_ok"] and worker.last_probe["probe_mean_abs_diff"] < 1e-4
        worker.resume_trainer()
        assert not list(tmp_path.iterdir()) and all(t.numel() > 0 for _, t in worker.trainer.named_weights())
        assert worker.engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=0.0))[0].token_ids
        worker.release_trainer()
    finally:
        worker.shutdown()
    assert not list(tmp_path.iterdir())


def test_chunked_transfers_write_every_tensor_at_its_offset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces smaller than a tensor (and than the file): each lands at its aligned offset and comes back exact."""
    monkeypatch.setattr("colocate.trainer.disk_tier.DiskTier.CHUNK", 1000)
    net, opt = trained(seed=3)
    before = snapshot(net, opt)
    offload = TrainerOffload(net, opt, device="cpu", disk_dir=tmp_path)
    offload.release(to="disk")
    size = next(tmp_path.iterdir()).stat().st_size
    assert size == offload._offsets[-1] + offload._disk_layout[-1].numel() * offload._disk_layout[-1].element_size()
    offload.resume()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(net, opt)))


def test_a_truncated_file_fails_the_resume_and_says_where(tmp_path: Path) -> None:
    net, opt = trained()
    offload = TrainerOffload(net, opt, device="cpu", disk_dir=tmp_path)
    offload.release(to="disk")
    path = next(tmp_path.iterdir())
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(OSError, match="ended after"):
        offload.resume()
