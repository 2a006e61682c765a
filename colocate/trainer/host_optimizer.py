"""AdamW stepped on the host: moments and fp32 master weights live in (pinned) host memory, never on the device.

    >>> optimizer = HostAdamW(model.parameters(), lr=1e-5)   # same arguments as torch.optim.AdamW
    >>> loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)

A step copies every gradient to host memory (pinned, non-blocking, one synchronisation), runs torch's
vectorised (foreach) AdamW on the fp32 masters, and copies the updated weights back into the parameters,
cast to their dtype. The device then holds only the parameters and, during backward, their gradients:
for a model trained in bf16 that is 4 bytes a parameter instead of 16 (bf16 weights and gradients, plus
fp32 masters and two fp32 moments). The numerics are those of an fp32 AdamW on the masters; with fp32
parameters the result equals `torch.optim.AdamW` on the device up to the order of fp32 operations.
`param_groups` is the inner optimizer's, so learning-rate schedules work as with any optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


class HostAdamW:
    def __init__(self, params: Iterable[nn.Parameter], *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("HostAdamW got no parameters that require gradients")
        pin = torch.cuda.is_available() and any(p.is_cuda for p in self.params)
        self.masters = [self._host(p.detach(), pin) for p in self.params]
        for master in self.masters:
            master.requires_grad_(True)
        self.host_grads = [self._host(torch.zeros_like(p, dtype=torch.float32), pin) for p in self.params]
        self.inner = torch.optim.AdamW(self.masters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                       foreach=True)

    @staticmethod
    def _host(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
        host = torch.empty(tensor.shape, dtype=torch.float32, pin_memory=pin)
        host.copy_(tensor)
        return host

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> dict:
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """Gradients to the host, one AdamW step on the fp32 masters there, weights back to the device."""
        with_grad = {i for i, p in enumerate(self.params) if p.grad is not None}
        for i in with_grad:
            self.host_grads[i].copy_(self.params[i].grad, non_blocking=True)
        devices = {p.device for p in self.params if p.is_cuda}
        for device in devices:  # the non-blocking copies are done before the host reads them
            torch.cuda.current_stream(device).synchronize()
        for i, master in enumerate(self.masters):
            master.grad = self.host_grads[i] if i in with_grad else None
        self.inner.step()
        for i in with_grad:  # parameters without a gradient are left as AdamW leaves them: unchanged
            self.params[i].copy_(self.masters[i], non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "masters": [m.detach().clone() for m in self.masters]}
