"""Exact-size pinned host memory (colocate.memory.host): sizes, lifetime of the registration, refusals.

On a CPU machine CUDA's registration is replaced by a recorder, so what is tested is the bookkeeping:
that the pages are registered once with the tensor's exact size, stay registered while any view of
them lives, are unregistered once after the last, and that a refused registration keeps nothing."""

from __future__ import annotations

import gc

import pytest
import torch

from colocate.memory.host import pinned_empty


class Recorder:
    def __init__(self, error: int = 0) -> None:
        self.error, self.registered, self.unregistered = error, [], []

    def __call__(self):
        return (lambda address, nbytes: self.registered.append((address, nbytes)) or self.error,
                self.unregistered.append)


def test_exact_size_registered_once_and_released_after_the_last_view() -> None:
    rec = Recorder()
    host = pinned_empty((4096, 14336), torch.bfloat16, register=rec)
    assert host.shape == (4096, 14336) and host.dtype == torch.bfloat16
    assert rec.registered == [(host.data_ptr(), 4096 * 14336 * 2)]  # 112 MiB, where torch's pinned pool takes 128
    host.fill_(1.5)
    view = host[7:9].view(-1)
    del host
    gc.collect()
    assert rec.unregistered == [] and float(view.sum()) == 1.5 * 2 * 14336  # still mapped and registered
    address = rec.registered[0][0]
    del view
    gc.collect()
    assert rec.unregistered == [address]


def test_a_refused_registration_raises_and_keeps_nothing() -> None:
    rec = Recorder(error=2)
    with pytest.raises(torch.OutOfMemoryError, match="could not page-lock"):
        pinned_empty(1 << 20, register=rec)
    gc.collect()
    assert len(rec.registered) == 1 and rec.unregistered == []


def test_unpinned_requests_are_plain_host_memory() -> None:
    host = pinned_empty((3, 5), torch.float32, pin=False)
    assert host.shape == (3, 5) and host.dtype == torch.float32 and not host.is_pinned()
