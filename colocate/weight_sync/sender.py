"""Producer side of an update: plan buckets once per layout, fill two exported buffers in turn, send each as JSON."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from typing import Any, Protocol

import torch

from colocate.model.probe import LogprobProbe
from colocate.weight_sync.buckets import DEFAULT_BUCKET_BYTES, fill_and_checksum, plan_buckets
from colocate.weight_sync.copy_check import warm_up
from colocate.weight_sync.handles import ExportedBucket, allocate_bucket
from colocate.weight_sync.manifest import BucketLayout, WeightManifest


class BucketTransport(Protocol):
    """How a sender reaches an engine: bucket messages delivered and answered in the order they are sent."""

    def send_bucket(self, message: dict[str, Any]) -> Future:
        """Deliver one bucket message (see `BucketSender`); the future holds the engine's answer."""

    def abort_update(self) -> None:
        """Close the open update on the engine's side; its weights are refused until a complete update."""


class UnknownLayoutError(ValueError):
    """The receiver does not hold the layout a message names by id (it restarted, or another sender came)."""


class BucketSender:
    """Sends (name, tensor) pairs to an engine in buckets, double-buffered, through any `BucketTransport`.

    >>> sender = BucketSender(transport, device=torch.device("cuda", 0), dtype=torch.bfloat16)
    >>> sender.send(model.named_parameters(), version=3)     # {"version": 3, "num_tensors": ..., "seconds": ...}
    Each message is JSON: {"index", "handle", "keep_open", "checksum", "begin", "finish"}. The first carries
    `begin` ({"manifest", "layout_id", "version"}: the whole layout, validated by the engine before any
    copy; `manifest` is null when the engine already holds `layout_id` from an earlier update, since a
    trainer sends the same layout every step); the last carries `finish`. `checksum` is the bucket's
    (weight_sync.checksum), which the engine checks after its copy. Two buffers are exported per
    update and filled in turn: while the engine copies bucket i out of one, bucket i + 1 is cast into
    the other. A tensor larger than a bucket gets a buffer of its own, freed after its copy. Peak extra
    memory: two buckets, plus that one tensor while it is in flight.
    """

    def __init__(self, transport: BucketTransport, *, device: torch.device, dtype: torch.dtype,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.transport, self.device, self.dtype, self.bucket_bytes = transport, device, dtype, bucket_bytes
        warm_up(device)  # the checksum and one-pass kernels, built before the first update rather than during it
        self._layout: tuple[tuple, tuple[BucketLayout, ...], int] | None = None  # (shapes, buckets, id) last sent

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: int | None,
             partial: bool = False, verify: LogprobProbe | None = None) -> dict[str, Any]:
        """Every tensor to the engine; `partial` updates may leave some weights as they are (the answer lists them).
        `verify`: the sender's logprob probe (`colocate.model.make_probe`), scored by the engine at the finish."""
        start = time.perf_counter()
        tensors = _checked(named_tensors)
        shapes = tuple((name, tuple(t.shape)) for name, t in tensors)
        probe = None if verify is None else verify.to_dict()
        try:
            return self._send(dict(tensors), shapes, version, partial, probe, start)
        except UnknownLayoutError:
            self._layout = None  # the engine lost the layout: send it whole, once
            return self._send(dict(tensors), shapes, version, partial, probe, start)

    def _send(self, by_name: dict[str, torch.Tensor], shapes: tuple, version: int | None, partial: bool,
              probe: dict[str, Any] | None, start: float) -> dict[str, Any]:
        cached, self._layout = self._layout, None  # forgotten until the engine has accepted it again
        if cached is not None and cached[0] == shapes:
            buckets, layout_id = cached[1], cached[2]
            begin = {"manifest": None, "layout_id": layout_id, "version": version, "partial": partial}
        else:
            buckets = plan_buckets(shapes, dtype=self.dtype, bucket_bytes=self.bucket_bytes)
            layout_id = secrets.randbits(62)  # unique to this layout of this sender, whichever engine receives it
            begin = {"manifest": WeightManifest(version=version, buckets=buckets).to_dict(),
                     "layout_id": layout_id, "version": version, "partial": partial}
        if probe is not None:
            begin["probe"] = probe
        planned = time.perf_counter()
        size = max((b.nbytes for b in buckets if b.nbytes <= self.bucket_bytes), default=0)
        num_pooled = sum(b.nbytes <= size for b in buckets)
        pool = [allocate_bucket(size, self.device) for _ in range(min(2, num_pooled))]
        in_flight: list[Future] = []
        try:
            self._pipeline(buckets, by_name, pool, begin, in_flight)
            copied = time.perf_counter()
            result = [future.result() for future in in_flight][-1]
        except BaseException:
            _drain(in_flight)  # the engine must be done with our buffers before they go
            self.transport.abort_update()
            raise
        finally:
            for bucket in pool:  # after finish or abort the engine has closed its mappings
                bucket.release()
        self._layout = (shapes, buckets, layout_id)
        end = time.perf_counter()
        return result | {"num_buckets": len(buckets), "bytes": sum(b.nbytes for b in buckets), "seconds": end - start,
                         "phase_seconds": {"plan": planned - start, "fill_and_send": copied - planned,
                                           "wait": end - copied}}

    def _pipeline(self, buckets: tuple[BucketLayout, ...], by_name: Mapping[str, torch.Tensor],
                  pool: list[ExportedBucket], begin: dict[str, Any], in_flight: list[Future]) -> None:
        reading: dict[int, Future] = {}  # pool slot -> the message whose bucket the engine may still be reading
        turn = 0
        for index, layout in enumerate(buckets):
            message = {"index": index, "begin": begin if index == 0 else None, "finish": index == len(buckets) - 1}
            if not pool or layout.nbytes > pool[0].buffer.numel():
                with allocate_bucket(layout.nbytes, self.device) as own:
                    checksum = fill_and_checksum(layout, by_name, own.buffer)
                    in_flight.append(self.transport.send_bucket(message | {
                        "handle": own.handle, "keep_open": False, "checksum": checksum}))
                    in_flight[-1].result()  # its buffer goes when this block ends
                continue
            slot, turn = turn % len(pool), turn + 1
            if slot in reading:
                reading.pop(slot).result()  # the engine is done with this buffer
            checksum = fill_and_checksum(layout, by_name, pool[slot].buffer)  # one wait for both
            reading[slot] = self.transport.send_bucket(message | {"handle": pool[slot].handle, "keep_open": True,
                                                                  "checksum": checksum})
            in_flight.append(reading[slot])


def export_manifest(named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *,
                    dtype: torch.dtype, device: torch.device | str, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                    version: int | None = None) -> tuple[WeightManifest, list[ExportedBucket]]:
    """A complete manifest (one handle per bucket) over freshly exported buckets cast to `dtype`.

    >>> manifest, buckets = export_manifest(model.named_parameters(), dtype=torch.bfloat16, device="cuda")
    >>> post("/update_weights", {"format": "ipc", "manifest": manifest.to_dict(), "version": 3})
    >>> for bucket in buckets: bucket.release()
    For producers that send one request per update (every handle at once): peak extra memory is every
    bucket. The caller keeps the buckets alive until the consumer has copied them, then releases them.
    If a fill fails, the buckets already made are released before the error propagates.
    """
    named = dict(named_tensors)
    layouts = plan_buckets([(n, tuple(t.shape)) for n, t in named.items()], dtype=dtype, bucket_bytes=bucket_bytes)
    buckets: list[ExportedBucket] = []
    checksums = []
    try:
        for layout in layouts:
            buckets.append(allocate_bucket(layout.nbytes, device))
            checksums.append(fill_and_checksum(layout, named, buckets[-1].buffer))
    except BaseException:
        for bucket in buckets:
            bucket.release()
        raise
    return WeightManifest(version=version, buckets=layouts, handles=tuple(b.handle for b in buckets),
                          checksums=tuple(checksums)), buckets


def _checked(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    tensors = list(named_tensors)
    if not tensors:
        raise ValueError("update_weights got no tensors")
    if len({name for name, _ in tensors}) != len(tensors):
        raise ValueError("update_weights got the same name twice")
    bad = [name for name, t in tensors if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point]
    if bad:
        raise ValueError(f"refused weight update, nothing was sent: {bad[:5]} are not floating-point tensors")
    return tensors


def _drain(futures: list[Future]) -> None:
    for future in futures:
        try:
            future.result()
        except Exception:  # noqa: BLE001, S110 - the first error is the one the caller sees
            pass
