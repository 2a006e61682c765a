"""In-place weight updates for one engine: plan, begin, load bucket by bucket, finish; and which weights are valid."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from colocate.model import CausalLM, LogprobProbe, sequence_logprobs
from colocate.model.loader import (
    Destination,
    WeightKey,
    all_weight_keys,
    covered_keys,
    finite_probe,
    key_to_hf_name,
    plan_weights,
    write_weights,
)

Layout = Sequence[tuple[str, tuple[int, ...], torch.dtype]]
AfterCopy = Callable[[], Callable[[], None]]  # see WeightUpdater.load


@dataclass(frozen=True, eq=False)
class WeightPlan:
    """A validated update layout: every announced (name, shape, dtype) and the model weight it writes.

    Plain metadata, no tensors: a plan may be kept across releases of the weights (a trainer
    sends the same layout every step) without keeping released memory alive.
    """

    expected: dict[str, tuple[tuple[int, ...], torch.dtype]]
    keys: dict[str, WeightKey]
    kept: tuple[str, ...] = ()  # weights a partial update leaves as they are (HF names)


@dataclass
class _OpenUpdate:
    plan: WeightPlan
    destinations: dict[str, Destination]  # name -> view into its parameter (fp8: its rows and scales)
    version: int | None
    timeout_s: float
    probe: LogprobProbe | None = None  # scored at finish, before the new weights count as valid
    loaded: set[str] = field(default_factory=set)
    written: set[WeightKey] = field(default_factory=set)
    deadline: float = 0.0

    def touch(self) -> None:
        self.deadline = time.monotonic() + self.timeout_s


class WeightUpdater:
    """Applies updates to a model in place and knows which weight shards hold valid values.

    >>> plan = updater.plan([(name, shape, dtype), ...])     # ValueError naming every bad entry
    >>> updater.begin(plan, version=3, timeout_s=120)
    >>> updater.load(bucket_views); updater.finish()
    After a release of the weights to meta, or an update that failed after its first copy,
    every shard is invalid until an update writes it: the engine must not sample from them.
    While an update is open the weights are a mix of old and new, so no step runs.
    """

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.is_cuda = next(model.buffers()).is_cuda
        self.unwritten: set[WeightKey] = set()
        self.refusal: str | None = None  # why the weights were refused, when a check (not a copy) refused them
        self.open: _OpenUpdate | None = None
        self.version: int | None = None
        # Destination views of the last plan, valid until the parameters move (a release or resume).
        self._views: tuple[WeightPlan, dict[str, Destination]] | None = None

    # -- state ----------------------------------------------------------------------------
    def expire_stale(self) -> None:
        """Abort an open update whose producer went silent past its timeout."""
        if self.open is not None and time.monotonic() > self.open.deadline:
            self.abort()

    @property
    def is_ready(self) -> bool:
        self.expire_stale()
        return self.open is None and not self.unwritten

    @property
    def is_invalid(self) -> bool:
        """No update is open, yet some weights hold no valid values: generation must be refused, not wait."""
        self.expire_stale()
        return self.open is None and bool(self.unwritten)

    def forget_parameters(self) -> None:
        """Drop cached views into the parameters: they would keep released weight memory alive."""
        self._views = None

    def mark_all_unwritten(self, reason: str | None = None) -> None:
        self.unwritten = all_weight_keys(self.model)
        self.refusal = reason

    def unwritten_message(self) -> str:
        if self.refusal is not None:
            return f"{self.refusal}; call update_weights with every parameter before generate"
        names = sorted(key_to_hf_name(self.model, k) for k in self.unwritten)
        return (f"{len(names)} weight(s) hold no valid values (released to meta, or an update failed part-way), "
                f"e.g. {names[:3]}; call update_weights with every parameter before generate")

    def _check_probe_fits(self, probe: LogprobProbe) -> None:
        if len(probe.token_ids) > self.model.max_positions or max(probe.token_ids) >= self.model.config.vocab_size:
            raise ValueError(f"the probe's {len(probe.token_ids)} tokens (largest id {max(probe.token_ids)}) do not "
                             f"fit this model ({self.model.max_positions} positions, vocabulary "
                             f"{self.model.config.vocab_size})")

    def check_probe(self, probe: LogprobProbe) -> dict[str, Any]:
        """Score the probe's tokens with the weights as they are now; a mismatch refuses them (ValueError)."""
        self._check_probe_fits(probe)
        result = probe.compare(sequence_logprobs(self.model, probe.token_ids))
        if not result["probe_ok"]:
            self.mark_all_unwritten(
                f"the last weight update failed its logprob probe (mean |difference| "
                f"{result['probe_mean_abs_diff']:.3g} nats > tolerance {probe.tolerance:g}; max "
                f"{result['probe_max_abs_diff']:.3g}): these are not the weights the sender scored")
            raise ValueError(self.unwritten_message())
        return result

    def check_not_open(self) -> None:
        self.expire_stale()
        if self.open is not None:
            raise RuntimeError("a weight update is in progress; finish or abort it first")

    # -- one update ------------------------------------------------------------------------
    def plan(self, layout: Layout, *, partial: bool = False) -> WeightPlan:
        """Validate every (name, shape, dtype) against the model; raises ValueError naming each bad entry.

        An update must write every weight: one that leaves some out is refused, unless `partial`,
        and then the plan lists the weights it keeps (a checkpoint missing a layer must not turn
        into a model that is half old, half new without anyone having asked for it).
        """
        if not layout:
            raise ValueError("an update must name at least one tensor")
        stand_ins = [(name, torch.empty(shape, dtype=dtype, device="meta")) for name, shape, dtype in layout]
        copies = plan_weights(self.model, stand_ins)  # nothing is copied; raises before anything changes
        keys = {c.name: c.key for c in copies}
        destinations = {c.name: c.dst for c in copies}
        missing = all_weight_keys(self.model) - covered_keys(self.model, set(keys.values()))
        kept = tuple(sorted(key_to_hf_name(self.model, k) for k in missing))
        if kept and not partial:
            raise ValueError(f"refused weight update: it leaves {len(kept)} weight(s) unwritten, e.g. {list(kept[:5])};"
                             " send every weight, or mark the update partial to keep the others as they are")
        plan = WeightPlan(expected={n: (tuple(s), d) for n, s, d in layout}, keys=keys, kept=kept)
        self._views = (plan, destinations)  # begin uses them unless the parameters move first
        return plan

    def begin(self, plan: WeightPlan, *, version: int | None, timeout_s: float,
              probe: LogprobProbe | None = None) -> None:
        self.check_not_open()
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s!r} must be > 0")
        if probe is not None:
            self._check_probe_fits(probe)
        if self._views is None or self._views[0] is not plan:
            self._views = (plan, self._destinations(plan))
        # The views stay valid for the whole update: nothing may release or resume the weights while it is open.
        self.open = _OpenUpdate(plan, self._views[1], version, timeout_s, probe)
        self.open.touch()

    def _destinations(self, plan: WeightPlan) -> dict[str, Destination]:
        stand_ins = [(name, torch.empty(shape, dtype=dtype, device="meta"))
                     for name, (shape, dtype) in plan.expected.items()]
        return {c.name: c.dst for c in plan_weights(self.model, stand_ins)}

    def load(self, named_tensors: Sequence[tuple[str, torch.Tensor]], *, check_first: bool = False,
             after_copy: AfterCopy | None = None) -> dict[str, Any]:
        """Copy one bucket of the open update in place (casts, and fp8 quantization, included); returns once
        the copies are done.

        Values that are NaN or infinite are refused. With `check_first` the sources are checked before
        any copy, so a refusal changes nothing (an extra pass and sync: for whole updates). Otherwise
        the destinations are checked after the copy, in the synchronisation it needs anyway (the
        streaming path): a refusal then aborts the update, and the engine refuses to generate until a
        complete update arrives, as for any bucket that fails part-way.

        `after_copy()` is called once the copies are issued, on the same stream (e.g. to launch a checksum
        of the source bucket, ordered after the copies that read it); the callable it returns runs after
        the one synchronisation, and an exception from it aborts the update like a failed copy. An
        `after_copy` with a `copy_and_check(destinations, sources)` method (`weight_sync.BucketCheck`) is
        offered the copies first: where it takes them, its one pass also checks for NaN and infinity.
        """
        update = self.open
        if update is None:
            raise RuntimeError("no weight update is open; call begin_weight_update first")
        for name, tensor in named_tensors:
            announced = update.plan.expected.get(name)
            if announced is None:
                raise ValueError(f"{name!r} was not announced in begin_weight_update")
            if name in update.loaded:
                raise ValueError(f"{name!r} was already loaded in this update")
            if (tuple(tensor.shape), tensor.dtype) != announced:
                raise ValueError(f"{name!r}: {tuple(tensor.shape)} {tensor.dtype} differs from the announced "
                                 f"{announced[0]} {announced[1]}")
        if check_first:
            _check_finite(named_tensors)
        destinations = [(name, update.destinations[name]) for name, _ in named_tensors]
        # Counted as written before the copy: one that fails part-way leaves these weights a mix.
        update.written.update(update.plan.keys[name] for name, _ in named_tensors)
        try:
            judge = None if check_first else _offer_copies(after_copy, destinations, named_tensors)
            if judge is not None:  # one pass did the copies and both checks; judge() is the synchronisation
                _refuse_non_finite([named_tensors[i][0] for i in judge()])
            else:
                self._copy_then_check(destinations, named_tensors, check_first=check_first, after_copy=after_copy)
        except BaseException:
            self.abort()
            raise
        update.loaded.update(name for name, _ in named_tensors)
        update.touch()
        return {"num_tensors": len(named_tensors), "num_loaded": len(update.loaded),
                "num_expected": len(update.plan.expected), "one_pass": judge is not None}

    def _copy_then_check(self, destinations: list[tuple[str, Destination]],
                         named_tensors: Sequence[tuple[str, torch.Tensor]], *, check_first: bool,
                         after_copy: AfterCopy | None) -> None:
        write_weights([dst for _, dst in destinations], [tensor for _, tensor in named_tensors])
        check = after_copy() if after_copy is not None else None
        # Also the synchronisation the bucket's producer needs: it may reuse the memory once we return.
        if not check_first:
            _check_finite([(name, finite_probe(dst)) for name, dst in destinations])
        elif self.is_cuda:
            torch.cuda.synchronize(next(self.model.buffers()).device)
        if check is not None:
            check()

    def finish(self) -> dict[str, Any]:
        update = self.open
        if update is None:
            raise RuntimeError("no weight update is open")
        missing = sorted(set(update.plan.expected) - update.loaded)
        if missing:
            self.abort()
            raise ValueError(f"update finished without {len(missing)} announced tensor(s): {missing[:5]}; "
                             "the engine refuses to generate until a complete update arrives")
        self.open = None
        self.unwritten -= covered_keys(self.model, update.written)
        if not self.unwritten:
            self.refusal = None
        checked = {} if update.probe is None else self.check_probe(update.probe)  # a mismatch raises: no version
        if update.version is not None:
            self.version = update.version
        result = {"version": self.version, "num_tensors": len(update.loaded), "num_missing": len(self.unwritten)}
        return result | checked | ({"kept": list(update.plan.kept)} if update.plan.kept else {})

    def abort(self) -> None:
        """Close an open update; if anything was copied, no weight counts as valid any more."""
        update, self.open = self.open, None
        if update is not None and update.written:
            self.mark_all_unwritten()


def _offer_copies(after_copy: AfterCopy | None, destinations: list[tuple[str, Destination]],
                  named_tensors: Sequence[tuple[str, torch.Tensor]]) -> Callable[[], list[int]] | None:
    """The judge of `after_copy.copy_and_check` if it took the copies (plain destinations only), else None."""
    fused = getattr(after_copy, "copy_and_check", None)
    if fused is None or not all(isinstance(dst, torch.Tensor) for _, dst in destinations):
        return None
    return fused([dst for _, dst in destinations], [tensor for _, tensor in named_tensors])


def _refuse_non_finite(bad: list[str]) -> None:
    if bad:
        raise ValueError(f"refused weight update: {len(bad)} tensor(s) hold NaN or infinity, e.g. {bad[:5]}")


def _check_finite(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
    """ValueError naming the tensors holding NaN or infinity: one reduction over the bucket, one sync."""
    if not named_tensors:
        return
    # The infinity norm is NaN or inf exactly when a tensor holds one, and never overflows.
    norms = torch._foreach_norm([t for _, t in named_tensors], float("inf"))
    # A bucket's norms share a dtype and device; a trainer's own tensors, or host-resident streamed layers, may not.
    if len({(n.dtype, n.device) for n in norms}) > 1:
        norms = [n.to(norms[0].device, torch.float32) for n in norms]
    if bool(torch.stack(norms).isfinite().all()):
        return
    _refuse_non_finite([name for (name, _), n in zip(named_tensors, norms) if not bool(n.isfinite())])
