"""What the PPO and GRPO trainers share: the policy (and a value head for PPO), a frozen reference, AdamW, offload."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from colocate.dtypes import DTYPES
from colocate.memory.device import limit_device_memory
from colocate.memory.layer_stream import LayerStreamer, place_streamed
from colocate.memory.state import TagState
from colocate.model import CausalLM, DenseCausalAttention, load_model
from colocate.rl import GRPOConfig, PPOConfig, RolloutBatch, token_entropy, token_logprobs
from colocate.trainer.activations import ActivationOffload
from colocate.trainer.config import TrainerConfig  # noqa: F401 - also importable from here, as before
from colocate.trainer.critic import Critic
from colocate.trainer.offload import TrainerOffload
from colocate.trainer.reward_model import RewardModel


class PolicyWithValue(nn.Module):
    """A causal LM and, for PPO, a scalar value head on its last hidden state; one module, so one offload moves both.

    >>> PolicyWithValue(lm).value_head                      # nn.Linear(hidden, 1), zeros at first
    >>> PolicyWithValue(lm, has_value_head=False).value_head  # None: GRPO keeps no critic
    """

    def __init__(self, lm: CausalLM, *, has_value_head: bool = True) -> None:
        super().__init__()
        self.lm = lm
        self.value_head: nn.Linear | None = None
        if has_value_head:
            first = next(lm.parameters())
            self.value_head = nn.Linear(lm.config.hidden_size, 1, device=first.device, dtype=first.dtype)
            nn.init.zeros_(self.value_head.weight)  # values start at 0: early advantages are the raw rewards
            nn.init.zeros_(self.value_head.bias)


class PolicyTrainer:
    """The state and the passes PPO and GRPO share; a subclass adds `prepare(batch)` and `_loss(minibatch)`.

    >>> trainer = PPOTrainer(TrainerConfig(model="tiny"), PPOConfig())   # or GRPOTrainer(..., GRPOConfig())
    >>> stats = trainer.prepare(batch)     # old logprobs, reference logprobs, advantages
    >>> stats |= trainer.train(batch)      # ppo_epochs over minibatches, one AdamW step each
    >>> engine.update_weights(trainer.named_weights(), version=1)
    With torch.distributed initialised, gradients are averaged over the group before each step,
    so every worker keeps identical weights (data parallel). `has_reference=False` builds no
    reference model at all (GRPO without a KL term).
    """

    def __init__(self, config: TrainerConfig, rl: PPOConfig | GRPOConfig, *, temperature: float = 1.0,
                 has_value_head: bool, has_reference: bool) -> None:
        self.config, self.rl = config, rl
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={config.device!r} but torch sees no CUDA device; use device='cpu'")
        if config.memory_limit is not None:  # before anything is allocated (the cap is the whole process's)
            limit_device_memory(self.device, config.memory_limit)
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0: PPO needs the distribution the engine "
                             "sampled from, and greedy decoding has none")
        self.temperature = temperature
        self.is_cuda = self.device.type == "cuda"
        dtype = DTYPES[config.param_dtype]
        lm, self.tokenizer = load_model(config.model, device=self.device, dtype=dtype,
                                        max_positions=config.max_positions, seed=config.seed)
        # models are built frozen, for inference
        self.policy = PolicyWithValue(lm.requires_grad_(True), has_value_head=has_value_head)
        self.reference: CausalLM | None = None
        self.reference_offload: TrainerOffload | None = None
        self.reference_streamer: LayerStreamer | None = None  # with reference_offload: its host-resident layers
        ref_dtype = torch.bfloat16 if self.is_cuda else dtype  # frozen models: the reference, a reward model
        if has_reference:
            self.reference, _ = load_model(config.model, device=self.device, dtype=ref_dtype,
                                           max_positions=config.max_positions, seed=config.seed,
                                           materialize=self._place_reference)
            self.reference.requires_grad_(False)
            streamed = () if self.reference_streamer is None else self.reference_streamer.parameters()
            self.reference_offload = TrainerOffload(self.reference, None, device=self.device,
                                                    disk_dir=config.offload_dir, exclude=streamed)
        host_step = config.optimizer == "host"
        self.optimizer = config.make_optimizer(self.policy.parameters(), rl.lr)
        # A host optimizer's state never leaves the host: the offload moves parameters and gradients only.
        self.policy_offload = TrainerOffload(self.policy, None if host_step else self.optimizer, device=self.device,
                                             host_copies=self.optimizer.host_copies() if host_step else None,
                                             disk_dir=config.offload_dir)
        self.release_to = "host" if config.offload_dir is None else "disk"
        self.pad_id = 0  # any id: padding is masked out of every loss and statistic
        self.num_steps = 0
        self.critic: Critic | None = None  # PPO with TrainerConfig.critic_model: a model of its own
        self.reward_model: RewardModel | None = None
        if config.reward_model is not None:
            self.reward_model = RewardModel(config.reward_model, device=self.device, dtype=ref_dtype,
                                            max_positions=config.max_positions, seed=config.seed,
                                            offload_fraction=config.reward_offload, offload_dir=config.offload_dir)
        self.activations = (ActivationOffload(self.policy, device=self.device) if config.offload_activations
                            else None)

    # -- forward passes ------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.is_cuda else contextlib.nullcontext()

    def _forward(self, lm: CausalLM, batch: RolloutBatch, *, value_head: nn.Linear | None = None,
                 with_entropy: bool = False, temperature: float | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Logprobs of the response tokens [B, R] (float32), values [B, R] (None without a head) and
        the entropy of each response position's distribution [B, R] (None unless asked for)."""
        b, t = batch.input_ids.shape
        temperature = self.temperature if temperature is None else temperature
        attn = DenseCausalAttention(batch_size=b, seq_len=t, attention_mask=batch.attention_mask)
        with self._autocast():
            hidden = lm(batch.input_ids.flatten(), batch.positions.flatten(), attn).view(b, t, -1)
            hidden = batch.gather_response(hidden)  # [B, R, H]: only the positions that predict response tokens
            logits = lm.compute_logits(hidden)  # [B, R, V]
            if temperature != 1.0:  # the engine sampled from softmax(logits / T): score that distribution
                logits = logits / temperature
            values = value_head(hidden).squeeze(-1).float() if value_head is not None else None
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = token_entropy(logits)
        return token_logprobs(logits, batch.response_ids), values, entropy

    def _chunks(self, batch: RolloutBatch) -> list[RolloutBatch]:
        # [B, R, vocab] logits for a whole rollout would not fit next to a large model: minibatches.
        rows = torch.arange(len(batch), device=batch.response_mask.device)
        return [batch.select(r) for r in rows.split(self.rl.minibatch_size)]

    # -- one iteration -------------------------------------------------------------------
    def prepare(self, batch: RolloutBatch) -> dict[str, float]:
        raise NotImplementedError

    def _loss(self, minibatch: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def train(self, batch: RolloutBatch) -> dict[str, float]:
        """`ppo_epochs` passes over shuffled minibatches of a prepared batch; mean stats over the steps."""
        rl = self.rl
        if batch.advantages is None:
            raise RuntimeError("call prepare(batch) before train(batch): it computes the advantages the loss needs")
        if len(batch) % rl.minibatch_size:
            raise ValueError(f"a batch of {len(batch)} sequences does not split into minibatches of "
                             f"{rl.minibatch_size}; generate a multiple of minibatch_size")
        generator = torch.Generator().manual_seed(self.config.seed + self.num_steps)
        totals: dict[str, float] = {}
        num = 0
        for _ in range(rl.ppo_epochs):
            for rows in torch.randperm(len(batch), generator=generator).split(rl.minibatch_size):
                for optimizer in self._optimizers():
                    for group in optimizer.param_groups:
                        group["lr"] = rl.lr * min(1.0, (self.num_steps + 1) / max(1, rl.lr_warmup_steps))
                with self.activations if self.activations is not None else contextlib.nullcontext():
                    loss, stats = self._loss(batch.select(rows.to(self.device)))
                if self.activations is not None:
                    stats["activation_offload_bytes"] = self.activations.stats.bytes
                stats |= self._step_models(loss)
                self.num_steps += 1
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
                num += 1
        return {key: value / num for key, value in totals.items()}

    def _optimizers(self) -> list:
        return [self.optimizer] + ([self.critic.optimizer] if self.critic is not None else [])

    def _step_models(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """One backward for the policy (and a separate critic: disjoint parameters), then each one's step."""
        if self.critic is None:
            return {"grad_norm": self.step(loss, self.policy.parameters(), self.rl.max_grad_norm, self.optimizer)}
        self.critic.optimizer.zero_grad(set_to_none=True)  # before the backward that fills both
        grad_norm = self.step(loss, self.policy.parameters(), self.rl.max_grad_norm, self.optimizer)
        critic = [p for p in self.critic.parameters() if p.grad is not None]
        self._average_gradients(critic)
        critic_norm = (torch.nn.utils.clip_grad_norm_(critic, self.rl.max_grad_norm) if self.rl.max_grad_norm
                       else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in critic])))
        self.critic.optimizer.step()
        return {"grad_norm": grad_norm, "critic_grad_norm": critic_norm.detach()}

    def step(self, loss: torch.Tensor, params: Iterator[nn.Parameter], max_grad_norm: float | None,
             optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Backward, average gradients over workers, clip, one optimizer step; the norm before clipping."""
        params = list(params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._average_gradients(params)
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm is not None
                     else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        optimizer.step()
        return grad_norm.detach()

    def _average_gradients(self, params: list[nn.Parameter]) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])  # one collective instead of one per tensor
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    # -- weights and memory ----------------------------------------------------------------
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's weights by HF name, as the engine's `update_weights` takes them."""
        return self.policy.lm.hf_named_tensors()

    def _place_reference(self, meta_model: CausalLM) -> None:
        # Streamed layers get pinned host buffers (the loader writes them there); the rest goes to the device.
        self.reference_streamer = place_streamed(meta_model, meta_model.model, self.device,
                                                 self.config.reference_offload)

    @torch.no_grad()
    def reset_reference(self) -> None:
        """The reference becomes a copy of the policy as it is now (after a warm start: KL to that model)."""
        if self.reference is None:
            return
        if self.reference_offload.state is not TagState.AWAKE:
            raise RuntimeError("the reference is released; call resume() before reset_reference()")
        for (name, ref), (_, new) in zip(self.reference.named_parameters(), self.policy.lm.named_parameters()):
            assert ref.shape == new.shape, f"{name}: {ref.shape} != {new.shape}"
            ref.copy_(new)

    def release(self) -> None:
        """Policy, value head, AdamW moments and the reference to host memory; gradients are dropped.

        Each step makes its gradients anew, so carrying them over would only double the traffic.
        """
        for optimizer in self._optimizers():
            optimizer.zero_grad(set_to_none=True)
        self.policy_offload.release(to=self.release_to)
        if self.critic is not None:
            self.critic.offload.release(to=self.release_to)
        self.release_reference()

    def release_reference(self) -> None:
        """The frozen models (reference, reward model) are done once `prepare` has run: to host memory."""
        for offload in self._frozen_offloads():
            offload.release(to=self.release_to)

    def _frozen_offloads(self) -> list[TrainerOffload]:
        return [o for o in (self.reference_offload, self.reward_model and self.reward_model.offload) if o]

    @torch.no_grad()
    def score_with_reward_model(self, batch: RolloutBatch) -> dict[str, float]:
        """With a reward model: its scores become the batch's rewards; the task's are logged beside them."""
        if self.reward_model is None:
            return {}
        task = batch.scores.float().mean().item()
        batch.scores = torch.cat([self.reward_model.score(chunk, self._autocast) for chunk in self._chunks(batch)])
        return {"task_score_mean": task, "reward_model_score_mean": batch.scores.mean().item()}

    def resume(self) -> None:
        for offload in self._frozen_offloads():
            offload.resume()
        if self.critic is not None:
            self.critic.offload.resume()
        self.policy_offload.resume()

    def close(self) -> None:
        """Remove what the disk tier holds (a trainer released to disk is gone after this)."""
        for offload in (self.policy_offload, self.critic and self.critic.offload, *self._frozen_offloads()):
            if offload is not None and offload.disk is not None:
                offload.disk.remove()

    def offload(self) -> None:
        """Deprecated name of `release` (removed in 0.3)."""
        warnings.warn("offload() is now release()", DeprecationWarning, stacklevel=2)
        self.release()

    def onload(self) -> None:
        """Deprecated name of `resume` (removed in 0.3)."""
        warnings.warn("onload() is now resume()", DeprecationWarning, stacklevel=2)
        self.resume()

    def device_bytes(self) -> int:
        """Bytes the trainer holds on its device: all of this process's allocations on CUDA; on CPU,
        where there is no separate device memory, the state it keeps outside its host arenas."""
        if self.is_cuda:
            return torch.cuda.memory_allocated(self.device)
        others = [o.device_bytes() for o in (self.critic and self.critic.offload, *self._frozen_offloads()) if o]
        return self.policy_offload.device_bytes() + sum(others)
