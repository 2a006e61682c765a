"""The trainer half of a colocated worker: policy with a value head, AdamW, a frozen reference, PPO steps."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from colocate.trainer.offload import TrainerOffload
from colocate.dtypes import DTYPES, parse_dtype
from colocate.model import CausalLM, DenseCausalAttention, load_model
from colocate.rl import (PPOConfig, RolloutBatch, compute_gae, logprob_gap, masked_mean, policy_loss, shaped_rewards,
                         token_logprobs, value_loss, whiten)

# Parameter dtypes a trainer keeps (fp16 would need loss scaling, which the trainer does not do).
PARAM_DTYPES = ("float32", "bfloat16")


@dataclass(kw_only=True)
class TrainerConfig:
    """What the trainer builds: the model (preset or folder), where, and in which precision.

    >>> TrainerConfig(model="tiny", device="cpu")                      # float32 on CPU
    >>> TrainerConfig(model="qwen2.5-0.5b", device="cuda", param_dtype="float32")  # bf16 autocast
    `param_dtype` is what parameters, gradients and AdamW moments are stored in. On CUDA the
    forward runs under bfloat16 autocast either way, and the reference model is kept in
    bfloat16; "bfloat16" parameters halve the trainer's memory for the largest models.
    """

    model: str = "tiny"
    device: str = "cpu"
    param_dtype: str = "float32"
    seed: int = 0  # presets: random weights from this seed, the same on every worker
    max_positions: int = 2048

    def __post_init__(self) -> None:
        parse_dtype(self.param_dtype, "param_dtype", allowed=PARAM_DTYPES)
        try:
            device = torch.device(self.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be 'cpu' or a CUDA device such as 'cuda'")


class PolicyWithValue(nn.Module):
    """A causal LM and a scalar value head on its last hidden state; one module, so one offload moves both."""

    def __init__(self, lm: CausalLM) -> None:
        super().__init__()
        self.lm = lm
        first = next(lm.parameters())
        self.value_head = nn.Linear(lm.config.hidden_size, 1, device=first.device, dtype=first.dtype)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: early advantages are the raw rewards
        nn.init.zeros_(self.value_head.bias)


class PPOTrainer:
    """Scores a rollout and runs PPO epochs on it; offloads its whole device state between iterations.

    >>> trainer = PPOTrainer(TrainerConfig(model="tiny"), PPOConfig())
    >>> stats = trainer.prepare(batch)        # old logprobs, values, reference logprobs, GAE
    >>> stats |= trainer.train(batch)         # ppo_epochs over minibatches, one AdamW step each
    >>> engine.update_weights(trainer.named_weights(), version=1)
    With torch.distributed initialised, gradients are averaged over the group before each step,
    so every worker keeps identical weights (data parallel).
    """

    def __init__(self, config: TrainerConfig, ppo: PPOConfig, *, temperature: float = 1.0) -> None:
        self.config, self.ppo = config, ppo
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={config.device!r} but torch sees no CUDA device; use device='cpu'")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0: PPO needs the distribution the engine "
                             "sampled from, and greedy decoding has none")
        self.temperature = temperature
        self.is_cuda = self.device.type == "cuda"
        dtype = DTYPES[config.param_dtype]
        lm, self.tokenizer = load_model(config.model, device=self.device, dtype=dtype,
                                        max_positions=config.max_positions, seed=config.seed)
        self.policy = PolicyWithValue(lm.requires_grad_(True))  # models are built frozen, for inference
        ref_dtype = torch.bfloat16 if self.is_cuda else dtype
        self.reference, _ = load_model(config.model, device=self.device, dtype=ref_dtype,
                                       max_positions=config.max_positions, seed=config.seed)
        self.reference.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=ppo.lr, weight_decay=0.0)
        self.policy_offload = TrainerOffload(self.policy, self.optimizer, device=self.device)
        self.reference_offload = TrainerOffload(self.reference, None, device=self.device)
        self.pad_id = 0  # any id: padding is masked out of every loss and statistic
        self.num_steps = 0

    # -- forward passes ------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.is_cuda else contextlib.nullcontext()

    def _forward(self, lm: CausalLM, batch: RolloutBatch, value_head: nn.Linear | None,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logprobs of the response tokens [B, R] (float32) and values [B, R] (None without a head)."""
        b, t = batch.input_ids.shape
        attn = DenseCausalAttention(batch_size=b, seq_len=t, attention_mask=batch.attention_mask)
        with self._autocast():
            hidden = lm(batch.input_ids.flatten(), batch.positions.flatten(), attn).view(b, t, -1)
            hidden = batch.gather_response(hidden)  # [B, R, H]: only the positions that predict response tokens
            logits = lm.compute_logits(hidden)  # [B, R, V]
            if self.temperature != 1.0:  # the engine sampled from softmax(logits / T): score that distribution
                logits = logits / self.temperature
            values = value_head(hidden).squeeze(-1).float() if value_head is not None else None
        return token_logprobs(logits, batch.response_ids), values

    # -- one iteration -------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, batch: RolloutBatch) -> dict[str, float]:
        """Fill the batch with old logprobs, values, reference logprobs, rewards and advantages."""
        ppo, mask = self.ppo, batch.response_mask
        # In minibatches: [B, R, vocab] logits for a whole rollout would not fit next to a large model.
        chunks = [batch.select(rows) for rows in torch.arange(len(batch), device=mask.device).split(ppo.minibatch_size)]
        policy = [self._forward(self.policy.lm, chunk, self.policy.value_head) for chunk in chunks]
        batch.old_logprobs = torch.cat([logprobs for logprobs, _ in policy])
        batch.old_values = torch.cat([values for _, values in policy])
        batch.ref_logprobs = torch.cat([self._forward(self.reference, chunk, None)[0] for chunk in chunks])
        rewards = shaped_rewards(batch.scores, batch.old_logprobs, batch.ref_logprobs, mask,
                                 kl_coef=ppo.kl_coef, kl_kind=ppo.kl_kind)
        advantages, batch.returns = compute_gae(rewards, batch.old_values, mask, gamma=ppo.gamma, lam=ppo.lam)
        batch.advantages = whiten(advantages, mask) if ppo.whiten_advantages else advantages
        stats = logprob_gap(batch.engine_logprobs, batch.old_logprobs, mask)
        stats["kl_to_reference"] = masked_mean(batch.old_logprobs - batch.ref_logprobs, mask).item()
        stats["value_mean"] = masked_mean(batch.old_values, mask).item()
        return stats

    def train(self, batch: RolloutBatch) -> dict[str, float]:
        """`ppo_epochs` passes over shuffled minibatches of a prepared batch; mean stats over the steps."""
        ppo = self.ppo
        if batch.advantages is None:
            raise RuntimeError("call prepare(batch) before train(batch): it computes the advantages PPO needs")
        if len(batch) % ppo.minibatch_size:
            raise ValueError(f"a batch of {len(batch)} sequences does not split into minibatches of "
                             f"{ppo.minibatch_size}; generate a multiple of minibatch_size")
        generator = torch.Generator().manual_seed(self.config.seed + self.num_steps)
        totals: dict[str, float] = {}
        num = 0
        for _ in range(ppo.ppo_epochs):
            for rows in torch.randperm(len(batch), generator=generator).split(ppo.minibatch_size):
                for key, value in self._step(batch, rows.to(self.device)).items():
                    totals[key] = totals.get(key, 0.0) + value
                num += 1
        return {key: value / num for key, value in totals.items()}

    def _step(self, batch: RolloutBatch, rows: torch.Tensor) -> dict[str, float]:
        ppo = self.ppo
        mb = batch.select(rows)
        mask = mb.response_mask
        logprobs, values = self._forward(self.policy.lm, mb, self.policy.value_head)
        p_loss, p_stats = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mask, clip_eps=ppo.clip_eps)
        v_loss, v_stats = value_loss(values, mb.old_values, mb.returns, mask, clip_eps=ppo.value_clip_eps)
        loss = p_loss + ppo.value_coef * v_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._average_gradients()
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.policy.parameters(), ppo.max_grad_norm)
                     if ppo.max_grad_norm is not None else torch.zeros(()))
        self.optimizer.step()
        self.num_steps += 1
        return {"policy_loss": p_loss.item(), "value_loss": v_loss.item(), "grad_norm": float(grad_norm),
                **{k: v.item() for k, v in (p_stats | v_stats).items()}}

    def _average_gradients(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
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

    def release(self) -> None:
        """Policy, value head, AdamW moments and the reference to host memory; gradients are dropped.

        Each step makes its gradients anew, so carrying them over would only double the traffic.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.policy_offload.release()
        self.reference_offload.release()

    def resume(self) -> None:
        self.reference_offload.resume()
        self.policy_offload.resume()

    def offload(self) -> None:
        """Deprecated name of `release` (removed in 0.3)."""
        warnings.warn("PPOTrainer.offload() is now release()", DeprecationWarning, stacklevel=2)
        self.release()

    def onload(self) -> None:
        """Deprecated name of `resume` (removed in 0.3)."""
        warnings.warn("PPOTrainer.onload() is now resume()", DeprecationWarning, stacklevel=2)
        self.resume()

    def device_bytes(self) -> int:
        """Bytes the trainer holds on its device: all of this process's allocations on CUDA; on CPU,
        where there is no separate device memory, the state it keeps outside its host arenas."""
        if self.is_cuda:
            return torch.cuda.memory_allocated(self.device)
        return self.policy_offload.device_bytes() + self.reference_offload.device_bytes()
