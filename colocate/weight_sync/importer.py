"""Receiver side of an update: open the buckets a message or manifest names and load them into an engine."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from colocate.model.probe import LogprobProbe
from colocate.weight_sync.buckets import bucket_views
from colocate.weight_sync.handles import OpenedBucket, open_bucket
from colocate.weight_sync.manifest import WeightManifest
from colocate.weight_sync.sender import UnknownLayoutError
from colocate.weight_sync.copy_check import BucketCheck, warm_up
from colocate.weight_sync.strict_json import check_int, check_int64, check_keys

Layout = Sequence[tuple[str, tuple[int, ...], torch.dtype]]


class WeightTarget(Protocol):
    """What an engine implements to take updates: plan once, then begin, load bucket by bucket, finish or abort."""

    def plan_weight_update(self, layout: Layout, *, partial: bool = False) -> object:
        """Validate every (name, shape, dtype) against the model before any copy; the plan may be reused."""

    def begin_weight_update(self, plan: object, *, version: int | None, verify: LogprobProbe | None = None) -> None:
        """Open an update of `plan`; `verify`: the sender's logprob probe, checked against the model now and
        scored at finish (a mismatch refuses the weights: ValueError)."""

    def load_weight_bucket(self, named_tensors: Sequence[tuple[str, torch.Tensor]], *, check_first: bool = False,
                           after_copy: Callable[[], Callable[[], None]] | None = None) -> dict[str, Any]:
        """Copy one bucket in place; the tensors may be freed once this returns. `check_first`: refuse NaN or
        infinity before any copy (else after, aborting the update). `after_copy()` is called once the copies
        are queued; the check it returns runs after they are done, and its exception aborts the update."""

    def finish_weight_update(self) -> dict[str, Any]:
        """Close the update (and score its logprob probe, if it has one, before any step runs)."""

    def abort_weight_update(self) -> None: ...


class BucketImporter:
    """Turns the sender's bucket messages, or one complete manifest, into calls on a `WeightTarget`.

    >>> importer = BucketImporter(engine, device=engine.config.torch_device)
    >>> importer.load(message)              # one bucket message of a BucketSender (begin/finish inside)
    >>> importer.apply_manifest(manifest)   # a complete manifest: every handle opened before the first copy
    It keeps the one layout cache of the receiving side: the last manifest a sender announced, parsed
    and planned, under the sender's layout id, so later updates of that layout send the id alone.
    Buffers the sender reuses across buckets (keep_open) are mapped once and closed at finish or abort.
    """

    def __init__(self, target: WeightTarget, *, device: torch.device) -> None:
        self.target, self.device = target, device
        warm_up(device)  # the checksum and one-pass kernels, built before the first update rather than during it
        # ((layout id, partial), manifest, the target's plan) of the last layout a sender announced
        self._cached: tuple[tuple[int, bool], WeightManifest, object] | None = None
        self._manifest: WeightManifest | None = None  # of the open update
        self._opened: dict[str, OpenedBucket] = {}
        self._seconds: dict[str, float] = {}  # where the open update's time went, on this side (in the answer)
        self._one_pass = 0

    def load(self, message: dict[str, Any]) -> dict[str, Any]:
        """One bucket message: {"index", "handle", "keep_open", "begin": {...} | null, "finish": bool}."""
        check_keys(message, "message", required=("index", "handle", "keep_open", "begin", "finish"),
                   optional=("checksum",))
        checksum = message.get("checksum")
        if checksum is not None:
            check_int64(checksum, "message.checksum")
        if type(message["keep_open"]) is not bool or type(message["finish"]) is not bool:
            raise ValueError("message.keep_open and message.finish must be true or false")
        if message["begin"] is not None:
            self._begin(message["begin"])
        if self._manifest is None:
            raise RuntimeError("no weight update is open; the first bucket message must carry 'begin'")
        try:
            index = check_int(message["index"], "message.index", maximum=len(self._manifest.buckets) - 1)
            result = self._load_bucket(index, message["handle"], message["keep_open"], checksum)
        except BaseException:
            # An unreadable bucket mid-update: the weights may already be a mix, so stop here.
            self.abort()
            raise
        return self.finish() if message["finish"] else result

    def _begin(self, begin: object) -> None:
        start = time.perf_counter()
        check_keys(begin, "message.begin", required=("manifest", "layout_id", "version"),
                   optional=("partial", "probe"))
        probe = None if begin.get("probe") is None else LogprobProbe.from_dict(begin["probe"])
        layout_id = check_int(begin["layout_id"], "message.begin.layout_id")
        partial = begin.get("partial", False)
        if type(partial) is not bool:
            raise ValueError("message.begin.partial must be true or false")
        version = None if begin["version"] is None else check_int(begin["version"], "message.begin.version")
        if begin["manifest"] is None:
            if self._cached is None or self._cached[0] != (layout_id, partial):
                raise UnknownLayoutError(f"layout_id {layout_id} is not the last layout this engine saw; "
                                         "send the manifest")
            _, manifest, plan = self._cached
        else:
            self._cached = None
            manifest = WeightManifest.from_dict(begin["manifest"])
            # Raises naming each bad entry, before anything is copied.
            plan = self.target.plan_weight_update(manifest.tensor_layout(), partial=partial)
        self.target.begin_weight_update(plan, version=version, verify=probe)
        self._manifest = manifest
        self._seconds = {"begin": time.perf_counter() - start, "open": 0.0, "copy_and_verify": 0.0, "close": 0.0}
        self._one_pass = 0  # buckets the engine copied and checked in one pass
        self._cached = ((layout_id, partial), manifest, plan)

    def _load_bucket(self, index: int, handle: object, keep_open: bool, checksum: int | None) -> dict[str, Any]:
        start = time.perf_counter()
        layout = self._manifest.buckets[index]
        key = json.dumps(handle, sort_keys=True) if isinstance(handle, dict) else repr(handle)
        opened = self._opened.get(key)
        if opened is None:
            nbytes = handle.get("nbytes", -1) if isinstance(handle, dict) else -1
            opened = open_bucket(handle, nbytes=nbytes, device=self.device)
            self._opened[key] = opened
        if opened.buffer.numel() < layout.nbytes:
            raise ValueError(f"bucket {index} needs {layout.nbytes} bytes; the buffer has {opened.buffer.numel()}")
        opened_at = time.perf_counter()
        # load_weight_bucket synchronises its copies before returning: the producer may refill then. The
        # checksum is taken in the same pass as the copies on CUDA, or queued behind them (so a bucket changed
        # while it was copied, torn, is caught too), and judged after the same synchronisation.
        source = opened.buffer[:layout.nbytes]
        after_copy = None if checksum is None else BucketCheck(source, checksum, f"bucket {index}")
        result = self.target.load_weight_bucket(bucket_views(layout, opened.buffer), after_copy=after_copy)
        loaded_at = time.perf_counter()
        self._one_pass += bool(result.get("one_pass"))
        if not keep_open:
            self._opened.pop(key).close()
        self._seconds["open"] += opened_at - start
        self._seconds["copy_and_verify"] += loaded_at - opened_at
        self._seconds["close"] += time.perf_counter() - loaded_at
        return result

    def finish(self) -> dict[str, Any]:
        start = time.perf_counter()
        self._close_all()
        closed = time.perf_counter()
        result = self.target.finish_weight_update()
        seconds = {"begin": 0.0, "open": 0.0, "copy_and_verify": 0.0, "close": 0.0} | self._seconds
        seconds |= {"close": seconds["close"] + closed - start,
                                   "finish": time.perf_counter() - closed}
        return result | {"receiver_seconds": {k: round(v, 6) for k, v in seconds.items()},
                         "one_pass_buckets": self._one_pass}

    def abort(self) -> None:
        self._close_all()
        self.target.abort_weight_update()

    def _close_all(self) -> None:
        for opened in self._opened.values():
            opened.close()
        self._opened.clear()
        self._manifest = None

    def apply_manifest(self, manifest: dict[str, Any], *, partial: bool = False, probe: object = None,
                       ) -> dict[str, Any]:
        """A complete manifest with one handle per bucket (the one-request form over HTTP).

        Every bucket is opened before the first copy, so a bogus or vanished handle changes nothing.
        The producer keeps its buckets alive until this returns.
        """
        parsed = WeightManifest.from_dict(manifest)
        verify = None if probe is None else LogprobProbe.from_dict(probe)
        if parsed.handles is None:
            raise ValueError("the manifest has no handles; a complete update names one per bucket")
        opened: list[OpenedBucket] = []
        try:
            for i, (layout, handle) in enumerate(zip(parsed.buckets, parsed.handles)):
                opened.append(open_bucket(handle, nbytes=layout.nbytes, device=self.device))
                # Every bucket is whole before the first copy, so a corrupted one changes nothing.
                _verify(opened[-1].buffer[:layout.nbytes], parsed.checksums and parsed.checksums[i], f"bucket {i}")
            self.target.begin_weight_update(self.target.plan_weight_update(parsed.tensor_layout(), partial=partial),
                                            version=parsed.version, verify=verify)
            try:
                for layout, bucket in zip(parsed.buckets, opened):
                    # Each bucket checked before its copy: a bad first bucket changes nothing.
                    self.target.load_weight_bucket(bucket_views(layout, bucket.buffer), check_first=True)
            except BaseException:
                self.target.abort_weight_update()
                raise
            return self.target.finish_weight_update()
        finally:
            for bucket in opened:
                bucket.close()


def _verify(buffer: torch.Tensor, expected: int | None, what: str) -> None:
    if expected is not None:
        BucketCheck(buffer, expected, what)()()
