"""The JSON-safe description of a weight update: buckets of aligned tensor slots, and its strict parser."""

from __future__ import annotations

import copy
import math
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

FORMAT = "colocate.weights/1"
ALIGN = 256  # bytes; every slot offset is a multiple, so every view of a slot is aligned for any dtype
SUPPORTED_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                            "float16": torch.float16}
MAX_NAME_CHARS = 512
MAX_NDIM = 16
_MAX_HANDLE_DEPTH = 4  # handles are flat dicts today; a little nesting is allowed, unbounded nesting is not

_short = reprlib.Repr()  # untrusted values in error messages: quoted, escaped, cut short
_short.maxstring = _short.maxother = 60


@dataclass(frozen=True, kw_only=True)
class TensorSlot:
    """Where one tensor lies in a bucket: `nbytes` bytes from `offset`, row-major, of `dtype`."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # a key of SUPPORTED_DTYPES
    offset: int  # bytes from the bucket start, a multiple of ALIGN

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SUPPORTED_DTYPES[self.dtype].itemsize


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

    def __post_init__(self) -> None:
        _check_layout(self.buckets)
        if self.handles is not None and len(self.handles) != len(self.buckets):
            raise ValueError(f"handles: {len(self.handles)} handles for {len(self.buckets)} buckets; "
                             "send one handle per bucket, or none")

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
        return out

    @classmethod
    def from_dict(cls, data: object, *, max_tensors: int = 1_000_000, max_bytes: int = 1 << 42) -> WeightManifest:
        """Parse JSON (as `json.loads` returns it) into a manifest, or raise ValueError naming the bad field.

        This is the trust boundary for manifests that arrive over HTTP: only plain JSON types are
        accepted (no subclasses, no bools for ints), every size is bounded by `max_bytes` and the
        tensor count by `max_tensors` before anything is allocated, and nothing is ever evaluated.
        """
        _check_keys(data, "manifest", required=("format", "version", "buckets"), optional=("handles",))
        if type(data["format"]) is not str or data["format"] != FORMAT:
            raise ValueError(f"format: expected {FORMAT!r}, got {_short.repr(data['format'])}")
        version = None if data["version"] is None else _int(data["version"], "version")
        num_tensors = 0
        num_bytes = 0
        buckets = []
        for i, raw_bucket in enumerate(_list(data["buckets"], "buckets")):
            path = f"buckets[{i}]"
            _check_keys(raw_bucket, path, required=("nbytes", "tensors"))
            nbytes = _int(raw_bucket["nbytes"], f"{path}.nbytes", maximum=max_bytes)
            num_bytes += nbytes
            if num_bytes > max_bytes:
                raise ValueError(f"{path}.nbytes: the buckets add up to {num_bytes} bytes, more than "
                                 f"max_bytes={max_bytes}")
            raw_tensors = _list(raw_bucket["tensors"], f"{path}.tensors")
            num_tensors += len(raw_tensors)
            if num_tensors > max_tensors:
                raise ValueError(f"{path}.tensors: more than max_tensors={max_tensors} tensors in the manifest")
            tensors = tuple(_parse_slot(raw, f"{path}.tensors[{j}]", max_bytes=max_bytes)
                            for j, raw in enumerate(raw_tensors))
            buckets.append(BucketLayout(nbytes=nbytes, tensors=tensors))
        handles = None
        if data.get("handles") is not None:
            handles = tuple(_plain_json(raw, f"handles[{i}]", want=dict)
                            for i, raw in enumerate(_list(data["handles"], "handles")))
        return cls(version=version, buckets=tuple(buckets), handles=handles)


def plan_buckets(named_shapes: Iterable[tuple[str, tuple[int, ...]]], *, dtype: torch.dtype,
                 bucket_bytes: int = 512 << 20) -> tuple[BucketLayout, ...]:
    """Group tensors, in order, into buckets of at most `bucket_bytes` (greedy; slots aligned to ALIGN).

    A tensor larger than `bucket_bytes` gets a bucket of its own. Every slot has `dtype`: the
    producer casts into it (`fill_bucket`), so the engine receives its own dtype.
    """
    if type(bucket_bytes) is not int or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive number of bytes, got {bucket_bytes!r}")
    dtype_names = {v: k for k, v in SUPPORTED_DTYPES.items()}
    if dtype not in dtype_names:
        raise ValueError(f"dtype {dtype} is not supported for weight sync; use one of {sorted(SUPPORTED_DTYPES)}")
    buckets = []
    slots: list[TensorSlot] = []
    end = 0
    seen = set()
    for name, shape in named_shapes:
        _check_name(name, "name")
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}: every tensor of an update needs a unique name")
        seen.add(name)
        if not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"{name!r}: shape {tuple(shape)} must be a sequence of non-negative ints")
        slot = TensorSlot(name=name, shape=tuple(shape), dtype=dtype_names[dtype], offset=_align(end))
        if slots and slot.offset + slot.nbytes > bucket_bytes:
            buckets.append(BucketLayout(nbytes=end, tensors=tuple(slots)))
            slots = []
            slot = TensorSlot(name=slot.name, shape=slot.shape, dtype=slot.dtype, offset=0)
        slots.append(slot)
        end = slot.offset + slot.nbytes
    if not slots:
        raise ValueError("plan_buckets needs at least one tensor")
    buckets.append(BucketLayout(nbytes=end, tensors=tuple(slots)))
    return tuple(buckets)


def fill_bucket(layout: BucketLayout, tensors: Mapping[str, torch.Tensor], buffer: torch.Tensor) -> None:
    """Copy each tensor of the layout into its slot of `buffer`, cast to the slot's dtype (any source device).

    Every name and shape is checked before the first copy, so a bad call leaves `buffer` unchanged.
    On CUDA this returns only once the bytes are in memory (see the comment at the end).
    """
    views = bucket_views(layout, buffer)
    sources = []
    for slot in layout.tensors:
        source = tensors.get(slot.name)
        if not isinstance(source, torch.Tensor):
            raise ValueError(f"fill_bucket: no tensor named {slot.name!r} (the layout lists {len(layout.tensors)})")
        if tuple(source.shape) != slot.shape:
            raise ValueError(f"fill_bucket: {slot.name!r} has shape {tuple(source.shape)}, "
                             f"the layout says {slot.shape}")
        sources.append(source)
    with torch.no_grad():
        same = [(view, src) for (_, view), src in zip(views, sources)
                if src.device.type == buffer.device.type or src.dtype == view.dtype]
        # A copy that changes both device and dtype casts on the source's side first: from a
        # trainer offloaded to host memory that is a slow CPU cast, then a pageable transfer
        # (10x slower than the PCIe floor, measured). Move the bytes as they are (pinned: at
        # full speed), then cast on the device; one tensor at a time bounds the extra memory.
        for (_, view), src in zip(views, sources):
            if src.device.type != buffer.device.type and src.dtype != view.dtype:
                # Non-blocking only towards CUDA (stream-ordered); a copy to the host must be done before it is read.
                view.copy_(src.to(buffer.device, non_blocking=buffer.device.type == "cuda"))
        if same:
            # One multi-tensor launch instead of one copy per tensor: a bucket holds dozens.
            torch._foreach_copy_([view for view, _ in same], [src for _, src in same])
    if buffer.device.type == "cuda":
        # The IPC event in a CUDA handle was recorded when the bucket was exported, before this
        # fill, so it does not order the consumer after these copies; and the consumer runs in
        # another process, on its own streams. Wait here: "fill_bucket returned" then means the
        # bytes are visible to whoever opens the handle next.
        torch.cuda.current_stream(buffer.device).synchronize()


def bucket_views(layout: BucketLayout, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, view of its slot with the slot's dtype and shape) for each slot, in layout order; no copy.

    The views alias `buffer`: they are valid only while the bucket stays open (shared memory or
    CUDA IPC mapping), so copy out of them before closing it.
    """
    if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 1 \
            or not buffer.is_contiguous():
        described = (f"{buffer.dtype} {tuple(buffer.shape)} contiguous={buffer.is_contiguous()}"
                     if isinstance(buffer, torch.Tensor) else type(buffer).__name__)
        raise ValueError(f"the bucket buffer must be a contiguous 1-D uint8 tensor, got {described}")
    if buffer.numel() < layout.nbytes:
        raise ValueError(f"the bucket buffer holds {buffer.numel()} bytes, the layout needs {layout.nbytes}")
    views = []
    for slot in layout.tensors:
        flat = buffer[slot.offset:slot.offset + slot.nbytes]  # [nbytes] uint8
        views.append((slot.name, flat.view(SUPPORTED_DTYPES[slot.dtype]).view(slot.shape)))
    return views


def _align(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _check_layout(buckets: tuple[BucketLayout, ...]) -> None:
    """Unique names across buckets; each slot aligned, inside its bucket, and clear of the others."""
    first_seen: dict[str, str] = {}
    for i, bucket in enumerate(buckets):
        for j, slot in enumerate(bucket.tensors):
            path = f"buckets[{i}].tensors[{j}]"
            if slot.name in first_seen:
                raise ValueError(f"{path}.name: duplicate name {_short.repr(slot.name)} "
                                 f"(also at {first_seen[slot.name]})")
            first_seen[slot.name] = path
            if slot.offset % ALIGN:
                raise ValueError(f"{path}.offset: {slot.offset} is not a multiple of {ALIGN}")
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


def _parse_slot(raw: object, path: str, *, max_bytes: int) -> TensorSlot:
    _check_keys(raw, path, required=("name", "shape", "dtype", "offset"))
    _check_name(raw["name"], f"{path}.name")
    raw_shape = _list(raw["shape"], f"{path}.shape")
    if len(raw_shape) > MAX_NDIM:
        raise ValueError(f"{path}.shape: {len(raw_shape)} dimensions, at most {MAX_NDIM} are supported")
    shape = tuple(_int(d, f"{path}.shape[{k}]", maximum=max_bytes) for k, d in enumerate(raw_shape))
    if type(raw["dtype"]) is not str or raw["dtype"] not in SUPPORTED_DTYPES:
        raise ValueError(f"{path}.dtype: expected one of {sorted(SUPPORTED_DTYPES)}, got {_short.repr(raw['dtype'])}")
    offset = _int(raw["offset"], f"{path}.offset", maximum=max_bytes)
    return TensorSlot(name=raw["name"], shape=shape, dtype=raw["dtype"], offset=offset)


def _check_keys(raw: object, path: str, *, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    if type(raw) is not dict:
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    unknown = [key for key in raw if key not in required and key not in optional]
    if unknown:
        raise ValueError(f"{path}: unknown key {_short.repr(unknown[0])}; expected {list(required + optional)}")
    missing = [key for key in required if key not in raw]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}")


def _check_name(name: object, path: str) -> None:
    if type(name) is not str or not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise ValueError(f"{path}: expected a non-empty printable string of at most {MAX_NAME_CHARS} characters, "
                         f"got {_short.repr(name)}")


def _int(value: object, path: str, *, maximum: int | None = None) -> int:
    # type(), not isinstance(): True is an int to isinstance, and must not pass for a size.
    if type(value) is not int:
        raise ValueError(f"{path}: expected a non-negative integer, got {type(value).__name__} {_short.repr(value)}")
    if value < 0 or (maximum is not None and value > maximum):
        raise ValueError(f"{path}: {value} is out of range [0, {maximum if maximum is not None else 'inf'}]")
    return value


def _list(value: object, path: str) -> list:
    if type(value) is not list:
        raise ValueError(f"{path}: expected a JSON array, got {type(value).__name__}")
    return value


def _plain_json(value: object, path: str, *, want: type | None = None, depth: int = 0) -> object:
    """A deep copy of `value` if it is made of plain JSON types only (dicts with str keys), else ValueError."""
    if want is not None and type(value) is not want:
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    if depth > _MAX_HANDLE_DEPTH:
        raise ValueError(f"{path}: nested deeper than {_MAX_HANDLE_DEPTH} levels")
    if value is None or type(value) in (str, int, float, bool):
        return value
    if type(value) is list:
        return [_plain_json(item, f"{path}[{k}]", depth=depth + 1) for k, item in enumerate(value)]
    if type(value) is dict:
        for key in value:
            if type(key) is not str:
                raise ValueError(f"{path}: keys must be strings, got {type(key).__name__} {_short.repr(key)}")
        return {key: _plain_json(item, f"{path}.{key if key.isidentifier() else _short.repr(key)}", depth=depth + 1)
                for key, item in value.items()}
    raise ValueError(f"{path}: {type(value).__name__} is not a JSON type")
