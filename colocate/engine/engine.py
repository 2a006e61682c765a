"""The Engine facade: generate with continuous batching; release and resume memory; update weights in place."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from typing import Any

import torch

from colocate.engine.block_manager import BlockManager
from colocate.engine.config import EngineConfig, SamplingParams
from colocate.engine.core import EngineCore, EnginePausedError, PauseTimeoutError
from colocate.engine.memory_manager import MemoryManager, ResumeOutOfMemoryError
from colocate.engine.model_runner import ModelRunner
from colocate.engine.request import Prompt, SequenceFactory
from colocate.engine.scheduler import Scheduler
from colocate.engine.sequence import GenerationOutput, Sequence
from colocate.engine.weight_sources import update_from_disk, update_whole
from colocate.engine.weight_update import AfterCopy, Layout, WeightPlan, WeightUpdater
from colocate.memory.device import memory_info
from colocate.model import LogprobProbe
from colocate.memory.state import TAGS, MemoryReport, PauseMode, TagState, WeightsMode, check_release, check_tags

__all__ = ["Engine", "EnginePausedError", "PauseTimeoutError", "ResumeOutOfMemoryError"]


class Engine:
    """An LLM engine for Llama/Qwen-family checkpoints that can give its device memory back.

    >>> engine = Engine(EngineConfig(model="tiny", device="cpu"))
    >>> out = engine.generate(["Hello"], SamplingParams(max_new_tokens=8, temperature=0.0))[0]
    >>> engine.release_memory(weights_to="cpu")           # KV cache, weights and graphs freed
    >>> engine.resume_memory(("weights",))               # staged: weights first ...
    >>> engine.update_weights(trainer.named_parameters(), version=1)
    >>> engine.resume_memory(("kv_cache", "cuda_graph"))  # ... then the KV cache
    `generate` may be called from several threads at once: their requests join one batch.
    Requests that arrive while the engine is paused wait for it (EngineConfig.paused_wait_s),
    then fail with the retryable EnginePausedError; none is dropped silently.
    """

    def __init__(self, config: EngineConfig) -> None:
        if config.torch_device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={config.device!r} but torch sees no CUDA device; use device='cpu' "
                             "or install a CUDA build of torch")
        self.runner = ModelRunner(config)  # the model, its flat weights, the KV pool and the graphs
        self.config = config = self.runner.config  # max_model_len resolved (None: what the model and pool allow)
        self.tokenizer, self.model_config = self.runner.tokenizer, self.runner.model.config
        self.memory = MemoryManager(self.runner, keep_host_arena=config.keep_host_arena)
        self.updater = WeightUpdater(self.runner.model)
        scheduler = Scheduler(block_manager=BlockManager(self.runner.kv.num_blocks, config.block_size),
                              max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                              max_model_len=config.max_model_len, eos_token_ids=self.model_config.eos_token_id)
        self.core = EngineCore(self.runner, scheduler, can_step=self._can_step, refusal=self.refusal_reason,
                               paused_wait_s=config.paused_wait_s)
        self._control = threading.Lock()  # one release / resume / weight update at a time
        self.requests = SequenceFactory(tokenizer=self.tokenizer, vocab_size=self.model_config.vocab_size,
                                        max_model_len=config.max_model_len, seed=config.seed)

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def weights_version(self) -> int | None:
        return self.updater.version

    @property
    def state(self) -> dict[str, TagState]:
        """Each tag's state (AWAKE or PAUSED)."""
        return dict(self.memory.state)

    def refusal_reason(self) -> str | None:
        """Why `generate` is refused now (shut down, or awake with weights that hold no valid values), or None.

        A paused engine does not refuse: its requests wait for the resume.
        """
        if self.core.is_shut_down:
            return "this Engine was shut down; create a new one"
        if self.memory.is_awake and self.updater.is_invalid:
            return self.updater.unwritten_message()
        return None

    def _can_step(self) -> bool:
        return self.memory.is_awake and self.updater.is_ready

    # -- generation -----------------------------------------------------------------------
    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 ) -> list[GenerationOutput]:
        """Generate for one prompt or a list (text or token ids); returns `SamplingParams.n` outputs per prompt
        (one by default), prompt-major, in order."""
        seqs = self.submit(prompts, params)
        self.core.wait(seqs)
        return [self.output(seq) for seq in seqs]

    def submit(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None, *,
               on_finish: Callable[[Sequence], None] | None = None,
               on_update: Callable[[Sequence], None] | None = None) -> list[Sequence]:
        """Validate every prompt, then queue them all (a bad one queues none); returns at once.

        `on_finish(seq)` runs once per sequence when it finishes, on the engine's notifier thread.
        `on_update(seq)` runs there after each step that appended a token to it (the last one before
        `on_finish`); `seq.delta(start)` reads what is new. Updates may lag the step thread, so a
        later delta may hold several tokens and an earlier one none.
        """
        seqs = self.requests.make(prompts, params, on_finish=on_finish, on_update=on_update)
        self.core.submit(seqs)
        return seqs

    def abort(self, seqs: Seq[Sequence]) -> None:
        """Finish these requests now with finish_reason="abort" (e.g. their client disconnected)."""
        self.core.abort(list(seqs))

    def output(self, seq: Sequence) -> GenerationOutput:
        out = seq.output()
        if self.tokenizer is not None:
            out.text = self.tokenizer.decode(out.token_ids)
        return out

    def limits(self) -> dict[str, Any]:
        """The longest context (max_model_len, and what set it) and the KV cache's capacity in tokens."""
        return {"max_model_len": self.config.max_model_len, "max_model_len_reason": self.runner.max_model_len_reason,
                "kv_cache_tokens": self.runner.kv.num_tokens}

    # -- memory ---------------------------------------------------------------------------
    def release_memory(self, tags: str | Seq[str] | None = None, *, weights_to: WeightsMode = "cpu",
                       mode: PauseMode = "wait", timeout_s: float = 60.0) -> MemoryReport:
        """Free the device memory of `tags` (default: all). Requests in flight are drained
        (`mode="wait"`, at most `timeout_s`, else PauseTimeoutError and the engine stays awake)
        or finished with finish_reason="abort" (`mode="abort"`). Pausing a paused tag is a no-op."""
        tags = check_release(tags, weights_to, mode, timeout_s)
        with self._control:
            self._check_open()
            self.updater.check_not_open()
            if all(self.memory.state[t] is TagState.PAUSED for t in tags):
                return self.memory.release(tags, weights_to)  # every tag reports its no-op
            try:
                num_aborted = self.core.quiesce(mode, timeout_s)
                with self.core.parked():
                    if "weights" in tags:
                        self.updater.forget_parameters()
                    return self.memory.release(tags, weights_to, num_aborted=num_aborted)
            finally:
                if self.memory.is_awake:  # refused or failed: nothing was paused, take requests again
                    self.core.admit_held()

    def resume_memory(self, tags: str | Seq[str] | None = None) -> MemoryReport:
        """Take back device memory for `tags` (default: all), in the order weights, kv_cache, cuda_graph.

        Out of memory: what this call took is freed, the tags stay paused, and
        ResumeOutOfMemoryError says how many bytes were needed and free. Resuming an awake tag is a no-op.
        """
        tags = check_tags(tags)
        with self._control, self.core.parked():
            self._check_open()
            self.updater.check_not_open()
            weights_were_paused = "weights" in tags and self.memory.state["weights"] is TagState.PAUSED
            report = self.memory.resume(tags)
            if weights_were_paused:
                self.updater.forget_parameters()
                if self.memory.weights_mode == "meta":
                    self.updater.mark_all_unwritten()
        if self.memory.is_awake:
            self.core.admit_held()
        return report

    def release_host_arena(self) -> int:
        """Free the pinned host arena kept for fast cycles; returns its bytes."""
        with self._control:
            return self.memory.release_host_arena()

    # -- weights ----------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: int | None = None,
                       partial: bool = False, verify: LogprobProbe | None = None) -> dict[str, Any]:
        """Copy (HF name, tensor) pairs into the engine's parameters in place.

        The whole set is validated first (names, shapes, dtypes): a bad update raises
        ValueError and changes nothing. Tensors may live on any device; they are cast to
        the engine's dtype (an fp8 engine quantizes its linear weights from them, on its device). Needs the weights tag awake. One update: plan, begin, one load, finish.
        Every weight must be in the set unless `partial` (the result then lists those kept). NaN or
        infinity is refused; for host tensors into a GPU engine that is found after the copy, and the
        engine then refuses to generate until a complete update arrives. `verify`: a `LogprobProbe` of the
        sender's weights (`colocate.model.make_probe`), scored after the copy; a mismatch refuses the weights.
        """
        return update_whole(self, named_tensors, version=version, partial=partial, verify=verify)

    def check_logprob_probe(self, probe: LogprobProbe) -> dict[str, Any]:
        """Score `probe`'s tokens with the current weights (no KV cache needed); above its tolerance the
        weights are refused, generate fails with the reason until a complete update arrives, and this raises
        ValueError. Returns the mean and max |logprob difference|."""
        with self._control, self.core.parked():
            self._check_weights_awake()
            return self.updater.check_probe(probe)

    def plan_weight_update(self, layout: Layout, *, partial: bool = False) -> WeightPlan:
        """Validate every (HF name, shape, dtype) of an update; the plan may be reused for later ones."""
        return self.updater.plan(layout, partial=partial)

    def begin_weight_update(self, plan: WeightPlan | Layout, *, version: int | None = None, timeout_s: float = 120.0,
                            partial: bool = False, verify: LogprobProbe | None = None) -> None:
        """Open an update whose tensors arrive in buckets; `plan` (or a layout to plan) is checked before any copy.

        Until `finish_weight_update` no step runs (the weights are a mix). If no bucket arrives
        for `timeout_s`, or a bucket fails after copies began, the update is aborted and the
        engine refuses to generate until a complete update arrives.
        """
        plan = plan if isinstance(plan, WeightPlan) else self.updater.plan(plan, partial=partial)
        with self._control, self.core.parked():
            self._check_weights_awake()
            self.updater.begin(plan, version=version, timeout_s=timeout_s, probe=verify)

    def load_weight_bucket(self, named_tensors: Seq[tuple[str, torch.Tensor]], *, check_first: bool = False,
                           after_copy: AfterCopy | None = None) -> dict[str, Any]:
        """Copy one bucket of the open update in place (the tensors may be freed on return); NaN/inf refused.

        `after_copy`: a check issued behind the copies and judged after their one synchronisation
        (see `WeightUpdater.load`); the importer verifies the bucket's checksum this way.
        """
        with self._control:
            self._check_open()
            return self.updater.load(named_tensors, check_first=check_first, after_copy=after_copy)

    def finish_weight_update(self) -> dict[str, Any]:
        """Close the update (every announced tensor must have arrived); an update begun with `verify` has its
        probe scored here, before any step runs on the new weights (see `check_logprob_probe`)."""
        with self._control, self.core.parked():
            self._check_open()
            result = self.updater.finish()
        self.core.wake()
        return result

    def abort_weight_update(self) -> None:
        with self._control:
            self.updater.abort()
        self.core.wake()

    def update_weights_from_disk(self, path: str, *, version: int | None = None, partial: bool = False,
                                 ) -> dict[str, Any]:
        """The slow path: load a safetensors folder in place, one file at a time, headers checked first."""
        return update_from_disk(self, path, version=version, partial=partial)

    def _check_weights_awake(self) -> None:
        self._check_open()
        if self.memory.state["weights"] is TagState.PAUSED:
            raise RuntimeError("the engine's weights are paused; call resume_memory(('weights',)) "
                               "before updating them")

    # -- status and lifecycle ---------------------------------------------------------------
    def memory_status(self) -> dict[str, Any]:
        """Bytes per tag on device and host, each tag's state, the device's free and total memory (host on CPU).

        Read without the engine's locks: it answers at once even while a step or a release runs.
        """
        free, total = memory_info(self.config.torch_device)
        return {**self.memory.status(), "device": self.config.device, "device_free_bytes": free,
                "device_total_bytes": total, "weights_version": self.weights_version,
                "num_missing_weights": len(self.updater.unwritten),
                "weight_update_in_progress": self.updater.open is not None,
                "num_running": len(self.scheduler.running),
                "num_waiting": self.scheduler.num_unfinished - len(self.scheduler.running) + len(self.core.held)}

    def _check_open(self) -> None:
        if self.core.is_shut_down:
            raise RuntimeError("this Engine was shut down; create a new one")

    def shutdown(self) -> None:
        """Abort queued requests and free the model, the KV cache, the graphs and the arena. Idempotent."""
        with self._control:
            if self.core.is_shut_down:
                return
            self.core.shutdown()
            self.updater.forget_parameters()
            self.memory.release(TAGS, weights_to="meta")  # through the state machine: every tag reads PAUSED
            self.runner.close()  # what a release keeps: graphs and address ranges at fixed addresses
            self.memory.arena.release()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
