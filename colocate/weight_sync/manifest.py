"""The JSON-safe description of a weight update: buckets of aligned tensor slots, and its strict parser."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from colocate.dtypes import DTYPES
from colocate.memory.layout import ALIGN_BYTES, tensor_nbytes
from colocate.weight_sync.strict_json import (check_int, check_int64, check_keys, check_list, check_name, plain_json,
                                              short)

FORMAT = "colocate.weights/1"
MAX_NAME_CHARS = 512
MAX_NDIM = 16


@dataclass(frozen=True, kw_only=True)
class TensorSlot:
    """Where one tensor lies in a bucket: `nbytes` bytes from `offset`, row-major, of `dtype`."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # a key of colocate.dtypes.DTYPES
    offset: int  # bytes from the bucket start, a multiple of ALIGN_BYTES

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, DTYPES[self.dtype])


@dataclass(frozen=True, kw_only=True)
class BucketLayout:
    """One flat buffer of `nbytes` bytes and the slots in it."""

    nbytes: int  # >= the end of the last slot
    tensors: tuple[TensorSlot, ...]


@dataclass(frozen=True, kw_only=True)
class WeightManifest:
    """The JSON-safe description of a weight update: a layout of buckets, and optionally one handle per bucket.

    Construction checks the layout (unique names, aligned slots inside their bucket, no overlap,
    one handle per bucket); `from_dict` also checks every field's type and range, for JSON that
    comes from outside the process.

    >>> layouts = plan_buckets([(n, p.shape) for n, p in model.named_parameters()], dtype=torch.bfloat16)
    >>> manifest = WeightManifest(version=step, buckets=layouts, handles=tuple(b.handle for b in exported))
    >>> WeightManifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    True
    """

    version: int | None
    buckets: tuple[BucketLayout, ...]
    handles: tuple[dict, ...] | None = None  # None: layout only (handles arrive bucket by bucket)
    checksums: tuple[int, ...] | None = None  # one per bucket, computed by the producer (weight_sync.checksum)

    def __post_init__(self) -> None:
        check_layout(self.buckets)
        if self.handles is not None and len(self.handles) != len(self.buckets):
            raise ValueError(f"handles: {len(self.handles)} handles for {len(self.buckets)} buckets; "
                             "send one handle per bucket, or none")
        if self.checksums is not None and len(self.checksums) != len(self.buckets):
            raise ValueError(f"checksums: {len(self.checksums)} checksums for {len(self.buckets)} buckets; "
                             "send one per bucket, or none")

    @property
    def num_tensors(self) -> int:
        return sum(len(bucket.tensors) for bucket in self.buckets)

    @property
    def total_bytes(self) -> int:
        return sum(slot.nbytes for bucket in self.buckets for slot in bucket.tensors)

    def to_dict(self) -> dict:
        out = {"format": FORMAT, "version": self.version,
               "buckets": [{"nbytes": bucket.nbytes,
                            "tensors": [{"name": slot.name, "shape": list(slot.shape), "dtype": slot.dtype,
                                         "offset": slot.offset} for slot in bucket.tensors]}
                           for bucket in self.buckets]}
        if self.handles is not None:
            out["handles"] = copy.deepcopy(list(self.handles))
        if self.checksums is not None:
            out["checksums"] = list(self.checksums)
        return out

    def tensor_layout(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """Every (name, shape, dtype) of the update in bucket order: what the receiving engine validates."""
        return [(slot.name, slot.shape, DTYPES[slot.dtype]) for bucket in self.buckets for slot in bucket.tensors]

    @classmethod
    def from_dict(cls, data: object, *, max_tensors: int = 1_000_000, max_bytes: int = 1 << 42) -> WeightManifest:
        """Parse JSON (as `json.loads` returns it) into a manifest, or raise ValueError naming the bad field.

        This is the trust boundary for manifests that arrive over HTTP: only plain JSON types are
        accepted (no subclasses, no bools for ints), every size is bounded by `max_bytes` and the
        tensor count by `max_tensors` before anything is allocated, and nothing is ever evaluated.
        """
        check_keys(data, "manifest", required=("format", "version", "buckets"), optional=("handles", "checksums"))
        if type(data["format"]) is not str or data["format"] != FORMAT:
            raise ValueError(f"format: expected {FORMAT!r}, got {short.repr(data['format'])}")
        version = None if data["version"] is None else check_int(data["version"], "version")
        num_tensors = 0
        num_bytes = 0
        buckets = []
        for i, raw_bucket in enumerate(check_list(data["buckets"], "buckets")):
            path = f"buckets[{i}]"
            check_keys(raw_bucket, path, required=("nbytes", "tensors"))
            nbytes = check_int(raw_bucket["nbytes"], f"{path}.nbytes", maximum=max_bytes)
            num_bytes += nbytes
            if num_bytes > max_bytes:
                raise ValueError(f"{path}.nbytes: the buckets add up to {num_bytes} bytes, more than "
                                 f"max_bytes={max_bytes}")
            raw_tensors = check_list(raw_bucket["tensors"], f"{path}.tensors")
            num_tensors += len(raw_tensors)
            if num_tensors > max_tensors:
                raise ValueError(f"{path}.tensors: more than max_tensors={max_tensors} tensors in the manifest")
            tensors = tuple(parse_slot(raw, f"{path}.tensors[{j}]", max_bytes=max_bytes)
                            for j, raw in enumerate(raw_tensors))
            buckets.append(BucketLayout(nbytes=nbytes, tensors=tensors))
        handles = None
        if data.get("handles") is not None:
            handles = tuple(plain_json(raw, f"handles[{i}]", want=dict)
                            for i, raw in enumerate(check_list(data["handles"], "handles")))
        checksums = None
        if data.get("checksums") is not None:
            checksums = tuple(check_int64(c, f"checksums[{i}]") for i, c in enumerate(check_list(data["checksums"],
                                                                                                  "checksums")))
        return cls(version=version, buckets=tuple(buckets), handles=handles, checksums=checksums)


def check_layout(buckets: tuple[BucketLayout, ...]) -> None:
    """Unique names across buckets; each slot aligned, inside its bucket, and clear of the others."""
    first_seen: dict[str, str] = {}
    for i, bucket in enumerate(buckets):
        for j, slot in enumerate(bucket.tensors):
            path = f"buckets[{i}].tensors[{j}]"
            if slot.name in first_seen:
                raise ValueError(f"{path}.name: duplicate name {short.repr(slot.name)} "
                                 f"(also at {first_seen[slot.name]})")
            first_seen[slot.name] = path
            if slot.offset % ALIGN_BYTES:
                raise ValueError(f"{path}.offset: {slot.offset} is not a multiple of {ALIGN_BYTES}")
            if slot.offset + slot.nbytes > bucket.nbytes:
                raise ValueError(f"{path}.offset: the slot [{slot.offset}, {slot.offset + slot.nbytes}) reaches past "
                                 f"the bucket's nbytes={bucket.nbytes}")
        end = 0  # end of the slots so far, in offset order
        previous = -1
        for j in sorted(range(len(bucket.tensors)), key=lambda j: (bucket.tensors[j].offset, bucket.tensors[j].nbytes)):
            slot = bucket.tensors[j]
            if slot.offset < end:
                raise ValueError(f"buckets[{i}].tensors[{j}].offset: the slot at {slot.offset} overlaps "
                                 f"buckets[{i}].tensors[{previous}], which ends at {end}")
            if slot.offset + slot.nbytes > end:
                end = slot.offset + slot.nbytes
                previous = j


def parse_slot(raw: object, path: str, *, max_bytes: int) -> TensorSlot:
    check_keys(raw, path, required=("name", "shape", "dtype", "offset"))
    check_name(raw["name"], f"{path}.name", max_chars=MAX_NAME_CHARS)
    raw_shape = check_list(raw["shape"], f"{path}.shape")
    if len(raw_shape) > MAX_NDIM:
        raise ValueError(f"{path}.shape: {len(raw_shape)} dimensions, at most {MAX_NDIM} are supported")
    shape = tuple(check_int(d, f"{path}.shape[{k}]", maximum=max_bytes) for k, d in enumerate(raw_shape))
    if type(raw["dtype"]) is not str or raw["dtype"] not in DTYPES:
        raise ValueError(f"{path}.dtype: expected one of {sorted(DTYPES)}, got {short.repr(raw['dtype'])}")
    offset = check_int(raw["offset"], f"{path}.offset", maximum=max_bytes)
    return TensorSlot(name=raw["name"], shape=shape, dtype=raw["dtype"], offset=offset)
