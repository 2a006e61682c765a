"""In-place weight updates for one engine: whole sets, bucket by bucket, or from disk; and which weights are valid."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from colocate.model import CausalLM
from colocate.model.checkpoint import checkpoint_files, read_safetensors
from colocate.model.loader import (
    WeightKey,
    all_weight_keys,
    apply_weights,
    covered_keys,
    key_to_hf_name,
    plan_weights,
)

Layout = Sequence[tuple[str, tuple[int, ...], torch.dtype]]
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


@dataclass
class StreamingUpdate:
    """An update announced whole (validated before the first copy) whose tensors arrive in buckets."""

    expected: dict[str, tuple[tuple[int, ...], torch.dtype]]
    version: int | None
    timeout_s: float
    destinations: dict[str, tuple[WeightKey, torch.Tensor]] = field(default_factory=dict)  # name -> (key, view)
    loaded: set[str] = field(default_factory=set)
    written: set[WeightKey] = field(default_factory=set)
    deadline: float = 0.0

    def touch(self) -> None:
        self.deadline = time.monotonic() + self.timeout_s


class WeightUpdater:
    """Applies updates to a model in place and knows which weight shards hold valid values.

    After a release of the weights to meta, or an update that failed after its first copy,
    every shard is invalid until an update writes it: the engine must not sample from them.
    While a streaming update is open the weights are a mix of old and new, so no step runs.
    """

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.is_cuda = next(model.buffers()).is_cuda
        self.unwritten: set[WeightKey] = set()
        self.stream: StreamingUpdate | None = None
        self.version: int | None = None
        self._plan_cache: tuple[tuple, tuple[int, ...], dict[str, tuple[WeightKey, torch.Tensor]]] | None = None

    # -- state ----------------------------------------------------------------------------
    def expire_stale_stream(self) -> None:
        """Abort a streaming update whose producer went silent past its timeout."""
        if self.stream is not None and time.monotonic() > self.stream.deadline:
            self.abort("no bucket arrived within timeout_s; the producer may have exited")

    @property
    def is_ready(self) -> bool:
        self.expire_stale_stream()
        return self.stream is None and not self.unwritten

    def forget_parameters(self) -> None:
        """Drop cached views into the parameters: they would keep released weight memory alive."""
        self._plan_cache = None

    def mark_all_unwritten(self) -> None:
        self.unwritten = all_weight_keys(self.model)

    def unwritten_message(self) -> str:
        names = sorted(key_to_hf_name(self.model, k) for k in self.unwritten)
        return (f"{len(names)} weight(s) hold no valid values (released to meta, or an update failed part-way), "
                f"e.g. {names[:3]}; call update_weights with every parameter before generate")

    def _sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(next(self.model.buffers()).device)

    def check_no_stream(self) -> None:
        self.expire_stale_stream()
        if self.stream is not None:
            raise RuntimeError("a streaming weight update is in progress; finish or abort it first")

    # -- whole updates --------------------------------------------------------------------
    def apply(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None) -> dict[str, Any]:
        """Validate the whole set, then copy it in place; a refused set changes nothing."""
        self.check_no_stream()
        start = time.perf_counter()
        plan = plan_weights(self.model, named_tensors)
        try:
            written = apply_weights(plan)
            self._sync()
        except BaseException:
            # Some parameters may hold new values and others old ones: refuse to serve the mix.
            self.mark_all_unwritten()
            raise
        self.unwritten -= covered_keys(self.model, written)
        if version is not None:
            self.version = version
        return {"version": self.version, "num_tensors": len(plan),
                "bytes": sum(c.dst.numel() * c.dst.element_size() for c in plan),
                "seconds": time.perf_counter() - start, "num_missing": len(self.unwritten)}

    # -- streaming updates ----------------------------------------------------------------
    def begin(self, layout: Layout, *, version: int | None, timeout_s: float) -> None:
        """Announce every (name, shape, dtype) of an update; validated against the model before any copy."""
        self.check_no_stream()
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s!r} must be > 0")
        if not layout:
            raise ValueError("an update must name at least one tensor")
        key = tuple((n, tuple(s), d) for n, s, d in layout)
        # A trainer sends the same layout every step: reuse the validated plan while the
        # parameters it points into are the same (a resume of the weights replaces them).
        pointers = tuple(p.data_ptr() for p in self.model.parameters())
        if self._plan_cache is not None and self._plan_cache[0] == key and self._plan_cache[1] == pointers:
            destinations = self._plan_cache[2]
        else:
            stand_ins = [(name, torch.empty(shape, dtype=dtype, device="meta")) for name, shape, dtype in layout]
            plan = plan_weights(self.model, stand_ins)  # raises naming every bad entry; nothing copied yet
            destinations = {c.name: (c.key, c.dst) for c in plan}
            self._plan_cache = (key, pointers, destinations)
        # The destinations are views into the live parameters; they stay valid for the whole
        # update because nothing may release or resume the weights while it is open.
        self.stream = StreamingUpdate({n: (s, d) for n, s, d in key}, version, timeout_s, destinations=destinations)
        self.stream.touch()

    def load_bucket(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        """Copy one bucket of an announced update in place."""
        stream = self.stream
        if stream is None:
            raise RuntimeError("no streaming weight update is open; call begin_weight_update first")
        for name, tensor in named_tensors:
            announced = stream.expected.get(name)
            if announced is None:
                raise ValueError(f"{name!r} was not announced in begin_weight_update")
            if name in stream.loaded:
                raise ValueError(f"{name!r} was already loaded in this update")
            if (tuple(tensor.shape), tensor.dtype) != announced:
                raise ValueError(f"{name!r}: {tuple(tensor.shape)} {tensor.dtype} differs from the announced "
                                 f"{announced[0]} {announced[1]}")
        try:
            targets = [stream.destinations[name] for name, _ in named_tensors]
            with torch.no_grad():
                # One multi-tensor launch for the bucket's dozens of copies (casts included).
                torch._foreach_copy_([dst for _, dst in targets], [tensor for _, tensor in named_tensors])
            stream.written.update(key for key, _ in targets)
            self._sync()  # the bucket's memory may be reused or released as soon as we return
        except BaseException:
            self.abort("a bucket failed while being copied")
            raise
        stream.loaded.update(name for name, _ in named_tensors)
        stream.touch()
        return {"num_tensors": len(named_tensors), "num_loaded": len(stream.loaded),
                "num_expected": len(stream.expected)}

    def finish(self) -> dict[str, Any]:
        stream = self.stream
        if stream is None:
            raise RuntimeError("no streaming weight update is open")
        missing = sorted(set(stream.expected) - stream.loaded)
        if missing:
            self.abort("finished with tensors missing")
            raise ValueError(f"update finished without {len(missing)} announced tensor(s): {missing[:5]}; "
                             "the engine refuses to generate until a complete update arrives")
        self.unwritten -= covered_keys(self.model, stream.written)
        if stream.version is not None:
            self.version = stream.version
        self.stream = None
        return {"version": self.version, "num_tensors": len(stream.loaded), "num_missing": len(self.unwritten)}

    def abort(self, reason: str) -> None:
        """Close an open streaming update; if anything was copied, no weight counts as valid any more."""
        stream, self.stream = self.stream, None
        if stream is not None and stream.written:
            self.mark_all_unwritten()

    # -- from disk ------------------------------------------------------------------------
    def disk_layout(self, path: str | Path) -> tuple[list[tuple[str, tuple[int, ...], torch.dtype]], list[Path]]:
        """Names, shapes and dtypes of a safetensors folder, read from the headers only."""
        from safetensors import safe_open

        files = checkpoint_files(path)
        layout = []
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(part.get_dtype())
                    if dtype is None:
                        raise ValueError(f"{file.name}: {name!r} has unsupported dtype {part.get_dtype()}")
                    layout.append((name, tuple(part.get_shape()), dtype))
        if self.model.config.tie_word_embeddings and any(n == "model.embed_tokens.weight" for n, _, _ in layout):
            layout = [entry for entry in layout if entry[0] != "lm_head.weight"]
        return layout, files

    def load_disk_file(self, file: Path) -> dict[str, Any]:
        tensors = read_safetensors(file)
        named = [(n, t) for n, t in tensors.items() if n in self.stream.expected]
        return self.load_bucket(named)
