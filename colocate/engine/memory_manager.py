"""Per-tag release and resume of an engine's device memory: KV cache, weights, decode graphs."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from colocate.engine.model_runner import ModelRunner
from colocate.memory.arena import HostArena
from colocate.memory.flat import FlatParameters
from colocate.memory.state import TAGS, MemoryReport, TagReport, TagState, WeightsMode


class ResumeOutOfMemoryError(RuntimeError):
    """A resume did not fit; what it took was freed and the tags are still paused. Retry after freeing memory."""


class MemoryManager:
    """Owns the state machine of the three tags; the caller guarantees no step runs meanwhile.

    Releasing `weights` or `kv_cache` also drops the decode graphs (they hold both addresses,
    which change on resume); graphs dropped that way are captured again as soon as what they
    point at is awake. `cuda_graph` is always resumed last.
    """

    def __init__(self, runner: ModelRunner, weights: FlatParameters) -> None:
        self.runner = runner
        self.weights = weights
        self.device = runner.device
        self.is_cuda = self.device.type == "cuda"
        self.state = dict.fromkeys(TAGS, TagState.AWAKE)
        self.arena = HostArena(pin=self.is_cuda)
        self.weights_mode: WeightsMode | None = None
        self.graphs_follow = False  # graphs were paused only because weights or kv_cache were
        self.side_stream = torch.cuda.Stream(self.device) if self.is_cuda else None

    @property
    def is_awake(self) -> bool:
        return all(s is TagState.AWAKE for s in self.state.values())

    def device_bytes(self) -> dict[str, int]:
        kv = self.runner.attention.kv_cache
        graphs = self.runner.graphs
        return {"kv_cache": 0 if kv is None else kv.numel() * kv.element_size(),
                "weights": 0 if self.weights.buffer is None else self.weights.nbytes,
                "cuda_graph": 0 if graphs is None else graphs.pool_bytes}

    def _free_memory(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0] if self.is_cuda else 0

    def _run_tag(self, report: MemoryReport, tag: str, target: TagState, action: Callable[[], tuple[int, int, str]],
                 ) -> None:
        before = self.state[tag]
        if before is target:
            verb = "paused" if target is TagState.PAUSED else "awake"
            report.tags[tag] = TagReport(before.value, before.value, message=f"no-op: already {verb}")
            return
        start, free_before = time.perf_counter(), self._free_memory()
        nbytes, host_bytes, message = action()
        self.state[tag] = target
        if self.is_cuda:
            torch.cuda.empty_cache()
            # Measured, not computed: what the device really got back (or gave).
            nbytes = abs(self._free_memory() - free_before)
        report.tags[tag] = TagReport(before.value, target.value, nbytes, host_bytes, time.perf_counter() - start,
                                     message)

    # -- release --------------------------------------------------------------------------
    def release(self, tags: tuple[str, ...], weights_to: WeightsMode) -> MemoryReport:
        report = MemoryReport("release", device_free_before=self._free_memory())
        start = time.perf_counter()
        if "cuda_graph" in tags:
            self.graphs_follow = False
        elif ("weights" in tags or "kv_cache" in tags) and self.state["cuda_graph"] is TagState.AWAKE:
            # Graphs hold the addresses that are about to go; they come back with what they point at.
            tags = ("cuda_graph", *tags)
            self.graphs_follow = True
        for tag in ("cuda_graph", "kv_cache", "weights"):
            if tag in tags:
                action = {"cuda_graph": self._release_graphs, "kv_cache": self._release_kv,
                          "weights": lambda: self._release_weights(weights_to)}[tag]
                self._run_tag(report, tag, TagState.PAUSED, action)
        report.seconds = time.perf_counter() - start
        report.device_free_after = self._free_memory()
        return report

    def _release_graphs(self) -> tuple[int, int, str]:
        graphs = self.runner.graphs
        self.runner.graphs = None
        if self.is_cuda and hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
            # cuBLAS keeps a workspace per stream it ran on, capture streams included.
            torch._C._cuda_clearCublasWorkspaces()
        if graphs is None:
            return 0, 0, "no decode graphs on this device" if not self.is_cuda else "graphs disabled"
        return graphs.pool_bytes, 0, "graphs dropped; captured again on resume"

    def _release_kv(self) -> tuple[int, int, str]:
        kv = self.runner.attention.kv_cache
        nbytes = kv.numel() * kv.element_size()
        self.runner.attention.kv_cache = None
        return nbytes, 0, ""

    def _release_weights(self, weights_to: WeightsMode) -> tuple[int, int, str]:
        host_bytes = 0
        if weights_to == "cpu":
            host = self.arena.reserve(self.weights.nbytes)
            if self.is_cuda:
                # The copy runs on a side stream after everything queued so far, and must finish
                # before the buffer is freed: the allocator would hand it out again at once.
                self.side_stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.side_stream):
                    host.copy_(self.weights.buffer, non_blocking=True)
                self.side_stream.synchronize()
            else:
                host.copy_(self.weights.buffer)
            host_bytes = self.weights.nbytes
        nbytes = self.weights.to_meta()
        self.weights_mode = weights_to
        message = "copied to host arena" if weights_to == "cpu" else "discarded; update_weights must refill them"
        return nbytes, host_bytes, message

    # -- resume ---------------------------------------------------------------------------
    def resume(self, tags: tuple[str, ...]) -> MemoryReport:
        paused_after = {t for t, s in self.state.items() if s is TagState.PAUSED} - set(tags)
        if "cuda_graph" in tags and self.state["cuda_graph"] is TagState.PAUSED and \
                paused_after & {"weights", "kv_cache"}:
            raise ValueError(f"cannot capture decode graphs while {sorted(paused_after & {'weights', 'kv_cache'})} "
                             "stay paused; resume them first or in the same call")
        if self.graphs_follow and "cuda_graph" not in tags and not paused_after & {"weights", "kv_cache"}:
            tags = (*tags, "cuda_graph")
        report = MemoryReport("resume", device_free_before=self._free_memory())
        start = time.perf_counter()
        resumed: list[str] = []
        try:
            for tag in ("weights", "kv_cache", "cuda_graph"):
                if tag in tags:
                    action = {"weights": self._resume_weights, "kv_cache": self._resume_kv,
                              "cuda_graph": self._resume_graphs}[tag]
                    was = self.state[tag]
                    self._run_tag(report, tag, TagState.AWAKE, action)
                    if was is TagState.PAUSED:
                        resumed.append(tag)
        except torch.OutOfMemoryError as e:
            needed = {"weights": self.weights.nbytes, "kv_cache": self.runner.kv_cache_nbytes()}
            failed = next(t for t in ("weights", "kv_cache", "cuda_graph") if t in tags and t not in resumed
                          and self.state[t] is TagState.PAUSED)
            self._roll_back(resumed)
            free = self._free_memory()
            raise ResumeOutOfMemoryError(
                f"out of device memory resuming {failed!r}: it needs {needed.get(failed, 0)} bytes "
                f"({', '.join(f'{t}={n}' for t, n in needed.items() if t in tags)}), the device has {free} free; "
                f"everything this resume took was freed and {sorted(set(tags) | set(resumed))} stay paused"
            ) from e
        if self.state["cuda_graph"] is TagState.AWAKE:
            self.graphs_follow = False
        if self.is_cuda:
            self.side_stream.synchronize()  # the report's time includes the copy back, and the arena is free again
        if "weights" in resumed and not self.runner.config.keep_host_arena:
            self.arena.release()  # pinning it again costs seconds at the next release; the user chose memory
        report.seconds = time.perf_counter() - start
        report.device_free_after = self._free_memory()
        return report

    def _roll_back(self, resumed: list[str]) -> None:
        if self.is_cuda:
            self.side_stream.synchronize()
        for tag in reversed(resumed):
            if tag == "cuda_graph":
                self.runner.graphs = None
            elif tag == "kv_cache":
                self.runner.attention.kv_cache = None
            else:
                self.weights.to_meta()  # the arena still holds the host copy
            self.state[tag] = TagState.PAUSED
        self.runner.graphs = None
        if self.is_cuda:
            torch.cuda.empty_cache()

    def _resume_weights(self) -> tuple[int, int, str]:
        buffer = self.weights.materialize(self.device)
        if self.weights_mode != "cpu":
            return self.weights.nbytes, 0, "allocated empty; update_weights must refill every parameter"
        host = self.arena.reserve(self.weights.nbytes)
        if self.is_cuda:
            # Host-to-device on the side stream; the default stream waits for it before any use.
            current = torch.cuda.current_stream(self.device)
            self.side_stream.wait_stream(current)
            with torch.cuda.stream(self.side_stream):
                buffer.copy_(host, non_blocking=True)
            current.wait_stream(self.side_stream)
            buffer.record_stream(self.side_stream)
        else:
            buffer.copy_(host)
        return self.weights.nbytes, self.weights.nbytes, "copied back from host arena"

    def _resume_kv(self) -> tuple[int, int, str]:
        self.runner.attention.kv_cache = self.runner.allocate_kv_cache()
        return self.runner.kv_cache_nbytes(), 0, ""

    def _resume_graphs(self) -> tuple[int, int, str]:
        if not (self.is_cuda and self.runner.config.enable_cuda_graph):
            return 0, 0, "no decode graphs on this device" if not self.is_cuda else "graphs disabled"
        self.runner.capture_graphs()
        return self.runner.graphs.pool_bytes, 0, f"captured {len(self.runner.graphs.sizes)} batch sizes"

    def release_host_arena(self) -> int:
        """Free the pinned host arena (a later release to cpu pins a new one)."""
        if self.state["weights"] is TagState.PAUSED and self.weights_mode == "cpu":
            raise RuntimeError("the host arena holds the paused weights; resume weights before releasing it")
        return self.arena.release()
