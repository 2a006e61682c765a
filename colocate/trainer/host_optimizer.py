"""AdamW stepped on the host: moments (and fp32 master weights) live in host memory, never on the device.

    >>> optimizer = HostAdamW(model.parameters(), lr=1e-5)   # same arguments as torch.optim.AdamW
    >>> loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
    >>> HostAdamW(model.parameters(), lr=1e-5, state_dtype=torch.bfloat16, master_weights=False)  # 6 bytes a param

A step walks the parameters in chunks: each chunk's gradient is copied to a pinned staging buffer,
AdamW's update runs there in fp32 (torch's formula: decoupled weight decay, bias-corrected moments),
and the updated weights go back to the device. The device holds only the parameters and, during
backward, their gradients.

Host bytes per parameter: fp32 masters and fp32 moments (the default) 12; `state_dtype=torch.bfloat16`
moments 8; with `master_weights=False` as well, the host keeps the weights in their own dtype
(bf16: 2 bytes) and 6. bf16 state is rounded stochastically (each value to one of its two bf16
neighbours, with the probability that makes the rounding unbiased), because Adam's second moment
moves by 0.1% a step (beta2 = 0.999), less than bf16's resolution of 0.4%: rounded to nearest it
would never change. The default's numerics are those of `torch.optim.AdamW` on fp32 masters; with
fp32 parameters the weights equal a device AdamW's up to the order of fp32 operations.
`param_groups` has one group whose "lr" may be changed between steps (a schedule). A step starts from the
host's copy of the weights: after changing the parameters outside the optimizer (loading a state dict),
call `sync_from_params()`. (A `TrainerOffload` release with `host_copies` refreshes the copy too.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from colocate.memory.host import pinned_empty

_CHUNK = 1 << 22  # elements updated at once: bounds the fp32 temporaries (a few times 16 MiB)


class HostAdamW:
    def __init__(self, params: Iterable[nn.Parameter], *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, state_dtype: torch.dtype = torch.float32,
                 master_weights: bool = True, seed: int = 0) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("HostAdamW got no parameters that require gradients")
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype={state_dtype} must be torch.float32 or torch.bfloat16")
        self.state_dtype, self.master_weights = state_dtype, master_weights
        self.pin = torch.cuda.is_available() and any(p.is_cuda for p in self.params)
        # The host's copy of each weight: fp32 masters, or the parameter's own dtype without them.
        self.masters = [self._host(p.detach(), torch.float32 if master_weights else p.dtype) for p in self.params]
        self.exp_avg = [pinned_empty(p.shape, state_dtype, pin=self.pin).zero_() for p in self.params]
        self.exp_avg_sq = [pinned_empty(p.shape, state_dtype, pin=self.pin).zero_() for p in self.params]
        self.steps = [0] * len(self.params)
        self.param_groups = [{"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}]
        largest = min(max(p.numel() for p in self.params), _CHUNK)
        self._grad = self._host(torch.zeros(largest), torch.float32)  # one chunk of gradient at a time
        self._noise = torch.Generator().manual_seed(seed)  # the stochastic rounding's
        self._table: torch.Tensor | None = None  # its noise (see _round), made at the first bf16 rounding

    def _host(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        host = pinned_empty(tensor.shape, dtype, pin=self.pin)  # exact size: torch's pinned pool rounds to 2**k
        host.copy_(tensor)
        return host

    @property
    def state(self) -> dict[nn.Parameter, dict[str, Any]]:
        """torch's layout of the state: per parameter its moments and step count (host tensors)."""
        return {p: {"exp_avg": m, "exp_avg_sq": v, "step": s}
                for p, m, v, s in zip(self.params, self.exp_avg, self.exp_avg_sq, self.steps)}

    @torch.no_grad()
    def sync_from_params(self) -> None:
        """Take the parameters' current values as the host copy (masters: exactly where fp32, else widened)."""
        for p, master in zip(self.params, self.masters):
            master.copy_(p)

    def host_copies(self) -> dict[int, torch.Tensor]:
        """{id(param): its host copy} where that copy is the weight itself (same dtype: no fp32 masters, or fp32
        parameters); `TrainerOffload(host_copies=...)` releases those weights into it instead of a second copy."""
        return {id(p): m for p, m in zip(self.params, self.masters) if m.dtype == p.dtype}

    def host_bytes(self) -> int:
        """Host memory the optimizer holds: weights' copies, both moments and the gradient staging."""
        tensors = [*self.masters, *self.exp_avg, *self.exp_avg_sq, self._grad]
        return sum(t.numel() * t.element_size() for t in tensors)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """Each gradient to the host chunk by chunk, AdamW's update there in fp32, the weights back to the device.
        Parameters without a gradient are left as they are (as torch's AdamW leaves them)."""
        group = self.param_groups[0]
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            self.steps[i] += 1
            grad, master = p.grad.reshape(-1), self.masters[i].view(-1)
            m, v = self.exp_avg[i].view(-1), self.exp_avg_sq[i].view(-1)
            for start in range(0, grad.numel(), _CHUNK):
                end = min(start + _CHUNK, grad.numel())
                staged = self._grad[: end - start]
                staged.copy_(grad[start:end])  # device to pinned host: waits for the copy
                self._update(staged, master[start:end], m[start:end], v[start:end], self.steps[i], group)
            p.copy_(self.masters[i], non_blocking=True)  # cast to the parameter's dtype on the way

    def _update(self, grad: torch.Tensor, weight: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int,
                group: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        m32, v32, w32 = m.float(), v.float(), weight.float()  # copies only where the storage is not fp32
        m32.mul_(beta1).add_(grad, alpha=1 - beta1)
        v32.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        w32.mul_(1 - lr * decay)
        denom = v32.sqrt().div_((1 - beta2**step) ** 0.5).add_(eps)
        w32.addcdiv_(m32, denom, value=-lr / (1 - beta1**step))
        for stored, value in ((m, m32), (v, v32), (weight, w32)):
            if stored.data_ptr() != value.data_ptr():
                stored.copy_(self._round(value, stored.dtype))

    def _round(self, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """fp32 to bf16 rounded stochastically (unbiased); other dtypes as torch casts them. `value` is a
        temporary: its low bits are overwritten."""
        if dtype != torch.bfloat16:
            return value
        nan = value.isnan()
        has_nan = bool(nan.any())  # a NaN's bits could carry into the sign and come out as zero: kept apart
        # Drawing fresh random bits per value costs more than the whole AdamW update on a CPU. Each call reads
        # a window of a fixed table of independent uniform 16-bit values at a random offset instead: every
        # value's noise is still uniform (so the rounding is unbiased) and, within a call, independent.
        if self._table is None:
            self._table = torch.randint(0, 1 << 16, (_CHUNK,), dtype=torch.int32, generator=self._noise).repeat(2)
        n = value.numel()
        start = int(torch.randint(0, _CHUNK, (1,), generator=self._noise))
        # Adding up to one bf16 step below the cut and truncating rounds up with the right probability; the
        # low 16 bits are then zero, so the cast to bf16 is exact. Infinities and zeros come out as they went
        # in (their low bits are zero, so the carry never reaches their exponent).
        bits = value.view(torch.int32).view(-1)
        bits.add_(self._table[start:start + n]).bitwise_and_(-65536)
        if has_nan:
            value.masked_fill_(nan, float("nan"))
        return value.to(torch.bfloat16)

    def state_dict(self) -> dict[str, Any]:
        return {"masters": [t.clone() for t in self.masters], "exp_avg": [t.clone() for t in self.exp_avg],
                "exp_avg_sq": [t.clone() for t in self.exp_avg_sq], "steps": list(self.steps),
                "param_groups": [dict(g) for g in self.param_groups]}
