"""Per-tag release and resume of an engine's device memory: KV cache, weights, decode graphs."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from colocate.engine.model_runner import ModelRunner
from colocate.memory.arena import HostArena
from colocate.memory.device import SideStream, free_bytes, give_back_cached, memory_info
from colocate.memory.state import TAGS, MemoryReport, TagReport, TagState, WeightsMode


class ResumeOutOfMemoryError(RuntimeError):
    """A resume did not fit; what it took was freed and the tags are still paused. Retry after freeing memory."""


class MemoryManager:
    """Owns the state machine of the three tags; the caller guarantees no step runs meanwhile.

    >>> manager.release(("kv_cache", "weights"), weights_to="cpu")   # the graphs go too: they hold both addresses
    >>> manager.resume(("weights", "kv_cache"))                       # ... and come back with them
    Graphs released only because weights or kv_cache were are recorded in `graphs_dropped_with`;
    they are captured again as soon as every tag there is awake. `cuda_graph` is always resumed last.
    """

    def __init__(self, runner: ModelRunner, *, keep_host_arena: bool) -> None:
        self.runner, self.weights = runner, runner.weights
        self.device = runner.device
        self.keep_host_arena = keep_host_arena
        self.state = dict.fromkeys(TAGS, TagState.AWAKE)
        self.arena = HostArena(pin=self.device.type == "cuda")
        self.weights_mode: WeightsMode | None = None
        self.graphs_dropped_with: frozenset[str] = frozenset()  # tags whose release took the graphs along
        self.side = SideStream(self.device)

    @property
    def is_awake(self) -> bool:
        return all(s is TagState.AWAKE for s in self.state.values())

    def _free(self) -> int:
        # What memory_status() reports too: the device's free memory, or the host's on CPU (not 0).
        return memory_info(self.device)[0]

    def device_bytes(self) -> dict[str, int]:
        return {"weights": 0 if self.weights.buffer is None else self.weights.nbytes, **self.runner.device_bytes()}

    def _run_tag(self, report: MemoryReport, tag: str, target: TagState, action: Callable[[], tuple[int, int, str]],
                 ) -> None:
        before = self.state[tag]
        if before is target:
            verb = "paused" if target is TagState.PAUSED else "awake"
            report.tags[tag] = TagReport(before.value, before.value, message=f"no-op: already {verb}")
            return
        start, free_before = time.perf_counter(), free_bytes(self.device)
        nbytes, host_bytes, message = action()
        self.state[tag] = target
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            # Measured, not computed: what the device really got back (or gave).
            nbytes = abs(free_bytes(self.device) - free_before)
        report.tags[tag] = TagReport(before.value, target.value, nbytes, host_bytes, time.perf_counter() - start,
                                     message)

    # -- release --------------------------------------------------------------------------
    def release(self, tags: tuple[str, ...], weights_to: WeightsMode, *, num_aborted: int = 0) -> MemoryReport:
        report = MemoryReport("release", device_free_before=self._free(), num_aborted=num_aborted)
        start = time.perf_counter()
        if "cuda_graph" in tags:
            self.graphs_dropped_with = frozenset()
        elif self.state["cuda_graph"] is TagState.AWAKE and {"weights", "kv_cache"} & set(tags) \
                and not self.runner.has_fixed_addresses:
            # Graphs hold the addresses that are about to go; they come back with what they point at.
            self.graphs_dropped_with = frozenset({"weights", "kv_cache"} & set(tags))
            tags = ("cuda_graph", *tags)
        actions = {"cuda_graph": self._release_graphs, "kv_cache": self._release_kv,
                   "weights": lambda: self._release_weights(weights_to)}
        for tag in ("cuda_graph", "kv_cache", "weights"):
            if tag in tags:
                self._run_tag(report, tag, TagState.PAUSED, actions[tag])
        report.seconds = time.perf_counter() - start
        report.device_free_after = self._free()
        return report

    def _release_graphs(self) -> tuple[int, int, str]:
        if self.runner.has_fixed_addresses and self.runner.graphs is not None:
            # What the graphs point at keeps its address: they stay valid, captured once for the engine's life.
            return 0, 0, f"kept: valid across release at fixed addresses ({self.runner.graphs.pool_bytes >> 20} MiB)"
        nbytes = self.runner.drop_graphs()
        give_back_cached(self.device)  # cuBLAS workspaces of the capture streams
        if not self.runner.can_capture:
            return 0, 0, "graphs disabled" if self.device.type == "cuda" else "no decode graphs on this device"
        return nbytes, 0, "graphs dropped; captured again on resume"

    def _release_kv(self) -> tuple[int, int, str]:
        return self.runner.free_kv_cache(), 0, ""

    def _release_weights(self, weights_to: WeightsMode) -> tuple[int, int, str]:
        host_bytes = 0
        if weights_to == "cpu":
            host = self.arena.reserve(self.weights.nbytes)
            self.side.copy(host, self.weights.buffer, wait=True)  # done before the buffer is freed below
            host_bytes = self.weights.nbytes
        nbytes = self.weights.to_meta()
        self.weights_mode = weights_to
        message = "copied to host arena" if weights_to == "cpu" else "discarded; update_weights must refill them"
        streamer = self.runner.streamer
        if streamer is not None:
            # The streamed layers already live in pinned host memory and stay there in both modes (pinning them
            # again would cost more than the copy). Graphs kept at fixed addresses still read the staging slots.
            if not self.runner.has_fixed_addresses:
                nbytes += streamer.free_staging()
            message += f"; {streamer.host_bytes} bytes of streamed layers stay in host memory"
        return nbytes, host_bytes, message

    # -- resume ---------------------------------------------------------------------------
    def resume(self, tags: tuple[str, ...]) -> MemoryReport:
        paused_after = {t for t, s in self.state.items() if s is TagState.PAUSED} - set(tags)
        if "cuda_graph" in tags and self.state["cuda_graph"] is TagState.PAUSED and \
                paused_after & {"weights", "kv_cache"}:
            raise ValueError(f"cannot capture decode graphs while {sorted(paused_after & {'weights', 'kv_cache'})} "
                             "stay paused; resume them first or in the same call")
        if self.graphs_dropped_with and "cuda_graph" not in tags and not paused_after & {"weights", "kv_cache"}:
            tags = (*tags, "cuda_graph")
        report = MemoryReport("resume", device_free_before=self._free())
        start = time.perf_counter()
        resumed: list[str] = []
        actions = {"weights": self._resume_weights, "kv_cache": self._resume_kv, "cuda_graph": self._resume_graphs}
        try:
            for tag in ("weights", "kv_cache", "cuda_graph"):
                if tag in tags:
                    was = self.state[tag]
                    self._run_tag(report, tag, TagState.AWAKE, actions[tag])
                    if was is TagState.PAUSED:
                        resumed.append(tag)
        except torch.OutOfMemoryError as e:
            raise self._out_of_memory(tags, resumed) from e
        if self.state["cuda_graph"] is TagState.AWAKE:
            self.graphs_dropped_with = frozenset()
        self.side.synchronize()  # the report's time includes the copy back, and the arena is free again
        if "weights" in resumed and not self.keep_host_arena:
            self.arena.release()  # pinning it again costs seconds at the next release; the user chose memory
        report.seconds = time.perf_counter() - start
        report.device_free_after = self._free()
        return report

    def _out_of_memory(self, tags: tuple[str, ...], resumed: list[str]) -> ResumeOutOfMemoryError:
        needed = {"weights": self.weights.nbytes, "kv_cache": self.runner.kv.nbytes}
        failed = next(t for t in ("weights", "kv_cache", "cuda_graph") if t in tags and t not in resumed
                      and self.state[t] is TagState.PAUSED)
        self._roll_back(resumed)
        return ResumeOutOfMemoryError(
            f"out of device memory resuming {failed!r}: it needs {needed.get(failed, 0)} bytes "
            f"({', '.join(f'{t}={n}' for t, n in needed.items() if t in tags)}), the device has "
            f"{free_bytes(self.device)} free; everything this resume took was freed and "
            f"{sorted(set(tags) | set(resumed))} stay paused")

    def _roll_back(self, resumed: list[str]) -> None:
        self.side.synchronize()
        keep_graphs = self.runner.has_fixed_addresses  # nothing was captured: the graphs were kept
        undo = {"cuda_graph": (lambda: None) if keep_graphs else self.runner.drop_graphs,
                "kv_cache": self.runner.free_kv_cache, "weights": self.weights.to_meta}  # the arena keeps the host copy
        for tag in reversed(resumed):
            undo[tag]()
            self.state[tag] = TagState.PAUSED
        if not keep_graphs:
            self.runner.drop_graphs()  # a capture that failed part-way may have left some
        give_back_cached(self.device)

    def _resume_weights(self) -> tuple[int, int, str]:
        if self.runner.streamer is not None:
            self.runner.streamer.allocate_staging()
        buffer = self.weights.materialize(self.device)
        if self.weights_mode != "cpu":
            return self.weights.nbytes, 0, "allocated empty; update_weights must refill every parameter"
        # The current stream waits for the copy before any use of the weights.
        self.side.copy(buffer, self.arena.reserve(self.weights.nbytes), wait=False)
        return self.weights.nbytes, self.weights.nbytes, "copied back from host arena"

    def _resume_kv(self) -> tuple[int, int, str]:
        return self.runner.allocate_kv_cache(), 0, ""

    def _resume_graphs(self) -> tuple[int, int, str]:
        if self.runner.graphs is not None:
            return 0, 0, "kept: no capture"
        if not self.runner.can_capture:
            return 0, 0, "graphs disabled" if self.device.type == "cuda" else "no decode graphs on this device"
        nbytes = self.runner.capture_graphs()
        return nbytes, 0, f"captured {len(self.runner.graphs.sizes)} batch sizes"

    def release_host_arena(self) -> int:
        """Free the pinned host arena (a later release to cpu pins a new one)."""
        if self.state["weights"] is TagState.PAUSED and self.weights_mode == "cpu":
            raise RuntimeError("the host arena holds the paused weights; resume weights before releasing it")
        return self.arena.release()

    def status(self) -> dict[str, object]:
        """The memory part of Engine.memory_status (read without a lock: plain field reads)."""
        return {"state": {t: s.value for t, s in self.state.items()}, "is_awake": self.is_awake,
                "device_bytes": self.device_bytes(), "host_bytes": {"weights": self.arena.nbytes,
                                                                   **self.runner.host_bytes()},
                "weights_mode": self.weights_mode, "weight_bytes_by_dtype": self.weights.bytes_by_dtype()}
