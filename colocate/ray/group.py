"""The driver's handle on N colocated workers: a placement group, one actor per bundle, `async_` calls to all."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from colocate.ray.worker import ColocatedWorker, WorkerConfig

if TYPE_CHECKING:  # colocate imports without Ray; only this module's callers need it
    from ray import ObjectRef
    from ray.actor import ActorHandle
    from ray.util.placement_group import PlacementGroup


class WorkerCrashedError(RuntimeError):
    """A worker's process (or its engine's) died; the message names the worker, its node and the phase."""


class WorkerGroup:
    """N `ColocatedWorker` actors, one per bundle of a placement group, trained data-parallel.

    >>> group = WorkerGroup(config, num_workers=4, num_gpus_per_worker=1)   # 4 GPUs, one bundle each
    >>> group.get(group.async_call("generate", iteration))                  # one result per worker
    >>> group.shutdown()
    GPU workers take bundles {"GPU": 1, "CPU": cpus_per_worker}; CPU workers {"CPU": cpus_per_worker}.
    The placement group packs bundles onto as few nodes as fit and spreads over more when it must,
    so the same code runs on one machine or a cluster; torch.distributed meets at rank 0's node.
    """

    def __init__(self, config: WorkerConfig, *, num_workers: int, num_gpus_per_worker: int = 1,
                 cpus_per_worker: int = 1, ready_timeout_s: float = 120.0) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers} must be >= 1")
        if num_gpus_per_worker not in (0, 1):
            raise ValueError(f"num_gpus_per_worker={num_gpus_per_worker} must be 1 (one worker per GPU) or 0 (CPU)")
        if cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker={cpus_per_worker} must be >= 1")
        if not ray.is_initialized():
            ray.init()
        self.num_workers = num_workers
        bundle = {"CPU": cpus_per_worker, **({"GPU": 1} if num_gpus_per_worker else {})}
        self.placement_group: PlacementGroup = placement_group([dict(bundle) for _ in range(num_workers)],
                                                               strategy="PACK")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=ready_timeout_s)
        if not ready:
            ray.util.remove_placement_group(self.placement_group)
            raise RuntimeError(f"{num_workers} bundles of {bundle} could not be placed within {ready_timeout_s:.0f} s; "
                               f"the cluster has {ray.cluster_resources()}. Ask for fewer workers or add nodes.")
        actor_cls = ray.remote(ColocatedWorker)
        self.workers: list[ActorHandle] = [
            actor_cls.options(num_cpus=cpus_per_worker, num_gpus=num_gpus_per_worker, max_restarts=0,
                              scheduling_strategy=PlacementGroupSchedulingStrategy(
                                  placement_group=self.placement_group, placement_group_bundle_index=rank),
                              ).remote(config, rank=rank, world_size=num_workers)
            for rank in range(num_workers)]
        self.node_ips: list[str] = ["?"] * num_workers
        try:
            addresses = self.get(self.async_call("address"), "address")
            self.node_ips = [ip for ip, _ in addresses]
            if num_workers > 1:
                addr, port = addresses[0]
                self.get([w.init_process_group.remote(addr, port) for w in self.workers], "init_process_group")
            self.setup_results = self.get(self.async_call("setup"), "setup")
        except BaseException:
            self.shutdown()
            raise

    def async_call(self, method: str, *args: Any, **kwargs: Any) -> list[ObjectRef]:
        """Call `method` on every worker; one object ref per worker, in rank order."""
        return [getattr(w, method).remote(*args, **kwargs) for w in self.workers]

    def get(self, refs: list[ObjectRef], phase: str = "call", timeout_s: float | None = None) -> list[Any]:
        """Results in rank order. A dead worker raises WorkerCrashedError at once instead of a hang,
        and the remaining calls are not waited for."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=remaining)
            if not done:
                raise GetTimeoutError(f"{len(pending)} of {len(refs)} workers did not finish {phase!r} within "
                                      f"{timeout_s} s")
            try:
                ray.get(done[0])
            except RayActorError as e:
                raise WorkerCrashedError(f"{self._describe(refs.index(done[0]))} died during {phase!r}: "
                                         f"{_first_line(e)}") from e
            except RayTaskError as e:
                raise WorkerCrashedError(f"{self._describe(refs.index(done[0]))} failed in {phase!r}: "
                                         f"{type(e.cause).__name__}: {_first_line(e.cause)}") from e
        return ray.get(refs)

    def _describe(self, rank: int) -> str:
        return f"worker {rank} of {self.num_workers} (node {self.node_ips[rank]})"

    def run(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """`async_call` then `get`: one phase on every worker, results in rank order."""
        return self.get(self.async_call(method, *args, **kwargs), method)

    def shutdown(self) -> None:
        """Stop every engine and actor and free the bundles; safe to call twice, and after a crash."""
        import ray

        workers = getattr(self, "workers", [])
        # Every worker at once and one bounded wait: after a crash the others may be stuck in a
        # collective, and a shutdown queued behind it would wait forever; they are killed instead.
        refs = []
        for worker in workers:
            try:
                refs.append(worker.shutdown.remote())
            except Exception:  # noqa: BLE001, S110 - a dead worker takes no more calls
                pass
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=60)
        for worker in workers:
            ray.kill(worker)
        self.workers = []
        if getattr(self, "placement_group", None) is not None:
            ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None


def _first_line(e: BaseException | None) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)
