"""The Engine facade: generate with continuous batching; release and resume memory; update weights in place."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from typing import Any

import torch

from colocate.engine.block_manager import BlockManager
from colocate.engine.config import EngineConfig, SamplingParams
from colocate.engine.core import EngineCore, EnginePausedError, PauseTimeoutError
from colocate.engine.memory_manager import MemoryManager, ResumeOutOfMemoryError
from colocate.engine.model_runner import ModelRunner
from colocate.engine.request import Prompt, normalize_requests, tokenize_prompt
from colocate.engine.scheduler import Scheduler
from colocate.engine.sequence import GenerationOutput, Sequence
from colocate.engine.weight_update import Layout, WeightPlan, WeightUpdater
from colocate.memory.device import free_bytes
from colocate.memory.flat import FlatParameters, materialize_buffers
from colocate.memory.state import TAGS, MemoryReport, PauseMode, TagState, WeightsMode, check_tags
from colocate.model import CausalLM, load_model
from colocate.model.checkpoint import checkpoint_files, checkpoint_layout, read_safetensors

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
        self.config = config
        model, self.tokenizer = load_model(config.model, device=config.torch_device, dtype=config.torch_dtype,
                                           max_positions=config.max_model_len, seed=config.seed,
                                           materialize=self._materialize)
        self.model_config = mc = model.config
        if config.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's max_position_embeddings="
                             f"{mc.max_position_embeddings}; lower max_model_len")
        if mc.sliding_window is not None and mc.sliding_window < config.max_model_len:
            raise ValueError(f"the model uses sliding-window attention ({mc.sliding_window} tokens), which colocate "
                             f"does not implement; set max_model_len <= {mc.sliding_window}")
        self.runner = ModelRunner(config, model)
        self.memory = MemoryManager(self.runner, self._weights, keep_host_arena=config.keep_host_arena)
        self.updater = WeightUpdater(model)
        scheduler = Scheduler(block_manager=BlockManager(self.runner.kv.num_blocks, config.block_size),
                              max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                              max_model_len=config.max_model_len, eos_token_ids=mc.eos_token_id)
        self.core = EngineCore(self.runner, scheduler, can_step=self._can_step, refusal=self.refusal_reason,
                               paused_wait_s=config.paused_wait_s)
        self._control = threading.Lock()  # one release / resume / weight update at a time
        self._seq_ids = itertools.count()

    def _materialize(self, meta_model: CausalLM) -> None:
        # One flat allocation for every parameter: release and resume move one block.
        self._weights = FlatParameters(meta_model)
        self._weights.materialize(self.config.torch_device)
        materialize_buffers(meta_model, self.config.torch_device)

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
        """Generate for one prompt or a list (text or token ids); returns one output per prompt, in order."""
        seqs = self.submit(prompts, params)
        self.core.wait(seqs)
        return [self.output(seq) for seq in seqs]

    def submit(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None, *,
               on_finish: Callable[[Sequence], None] | None = None) -> list[Sequence]:
        """Validate every prompt, then queue them all (a bad one queues none); returns at once.

        `on_finish(seq)` runs once per sequence when it finishes, on the engine's notifier thread.
        """
        prompts, param_list = normalize_requests(prompts, params)
        token_lists = [tokenize_prompt(i, p, tokenizer=self.tokenizer, vocab_size=self.model_config.vocab_size,
                                       max_model_len=self.config.max_model_len) for i, p in enumerate(prompts)]
        seqs = []
        for tokens, sp in zip(token_lists, param_list):
            seq_id = next(self._seq_ids)
            seqs.append(Sequence(seq_id, tokens, sp, sp.seed if sp.seed is not None else
                                 (self.config.seed << 32) + seq_id))
            seqs[-1].on_finish = on_finish
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

    # -- memory ---------------------------------------------------------------------------
    def release_memory(self, tags: str | Seq[str] | None = None, *, weights_to: WeightsMode = "cpu",
                       mode: PauseMode = "wait", timeout_s: float = 60.0) -> MemoryReport:
        """Free the device memory of `tags` (default: all). Requests in flight are drained
        (`mode="wait"`, at most `timeout_s`, else PauseTimeoutError and the engine stays awake)
        or finished with finish_reason="abort" (`mode="abort"`). Pausing a paused tag is a no-op."""
        tags = check_tags(tags)
        if weights_to not in ("cpu", "meta"):
            raise ValueError(f"weights_to={weights_to!r} must be 'cpu' (pinned host copy) or 'meta' (discard)")
        if mode not in ("wait", "abort"):
            raise ValueError(f"mode={mode!r} must be 'wait' (drain in-flight requests) or 'abort'")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s!r} must be > 0")
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
                       ) -> dict[str, Any]:
        """Copy (HF name, tensor) pairs into the engine's parameters in place.

        The whole set is validated first (names, shapes, dtypes): a bad update raises
        ValueError and changes nothing. Tensors may live on any device; they are cast to
        the engine's dtype. Needs the weights tag awake. One update: begin, one load, finish.
        """
        start = time.perf_counter()
        named = list(named_tensors)
        bad = [f"{n!r}: expected a torch.Tensor, got {type(t).__name__}" for n, t in named
               if not isinstance(t, torch.Tensor)]
        if bad:
            raise ValueError(f"refused weight update ({len(bad)} bad tensor(s), nothing was copied): {'; '.join(bad[:8])}")
        self.begin_weight_update([(n, tuple(t.shape), t.dtype) for n, t in named], version=version)
        try:
            self.load_weight_bucket(named)
        except BaseException:
            self.abort_weight_update()
            raise
        result = self.finish_weight_update()
        return result | {"bytes": sum(t.numel() * t.element_size() for _, t in named),
                         "seconds": time.perf_counter() - start}

    def plan_weight_update(self, layout: Layout) -> WeightPlan:
        """Validate every (HF name, shape, dtype) of an update; the plan may be reused for later ones."""
        return self.updater.plan(layout)

    def begin_weight_update(self, plan: WeightPlan | Layout, *, version: int | None = None,
                            timeout_s: float = 120.0) -> None:
        """Open an update whose tensors arrive in buckets; `plan` (or a layout to plan) is checked before any copy.

        Until `finish_weight_update` no step runs (the weights are a mix). If no bucket arrives
        for `timeout_s`, or a bucket fails after copies began, the update is aborted and the
        engine refuses to generate until a complete update arrives.
        """
        plan = plan if isinstance(plan, WeightPlan) else self.updater.plan(plan)
        with self._control, self.core.parked():
            self._check_weights_awake()
            self.updater.begin(plan, version=version, timeout_s=timeout_s)

    def load_weight_bucket(self, named_tensors: Seq[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        """Copy one bucket of the open update in place (the tensors may be freed on return)."""
        with self._control:
            self._check_open()
            return self.updater.load(named_tensors)

    def finish_weight_update(self) -> dict[str, Any]:
        with self._control:
            self._check_open()
            result = self.updater.finish()
        self._wake_steps()
        return result

    def abort_weight_update(self) -> None:
        with self._control:
            self.updater.abort()
        self._wake_steps()

    def update_weights_from_disk(self, path: str, *, version: int | None = None) -> dict[str, Any]:
        """The slow path: load a safetensors folder in place, one file at a time.

        Every name, shape and dtype is checked from the file headers before the first copy.
        """
        start = time.perf_counter()
        files = checkpoint_files(path)
        layout = checkpoint_layout(files)
        if self.model_config.tie_word_embeddings and any(n == "model.embed_tokens.weight" for n, _, _ in layout):
            layout = [entry for entry in layout if entry[0] != "lm_head.weight"]
        expected = {name for name, _, _ in layout}
        self.begin_weight_update(layout, version=version)
        try:
            for file in files:
                self.load_weight_bucket([(n, t) for n, t in read_safetensors(file).items() if n in expected])
        except BaseException:
            self.abort_weight_update()
            raise
        return self.finish_weight_update() | {"seconds": time.perf_counter() - start}

    def _wake_steps(self) -> None:
        with self.core.cond:
            self.core.cond.notify_all()

    def _check_weights_awake(self) -> None:
        self._check_open()
        if self.memory.state["weights"] is TagState.PAUSED:
            raise RuntimeError("the engine's weights are paused; call resume_memory(('weights',)) "
                               "before updating them")

    # -- status and lifecycle ---------------------------------------------------------------
    def memory_status(self) -> dict[str, Any]:
        """Bytes per tag on device and host, each tag's state, and the device's free and total memory.

        Read without the engine's locks: it answers at once even while a step or a release runs.
        """
        device = self.config.torch_device
        total = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else _host_memory()[1]
        free = free_bytes(device) if device.type == "cuda" else _host_memory()[0]
        return {**self.memory.status(), "device": str(device), "device_free_bytes": free,
                "device_total_bytes": total, "weights_version": self.weights_version,
                "num_missing_weights": len(self.updater.unwritten),
                "weight_update_in_progress": self.updater.open is not None,
                "num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting) + len(self.core.held)}

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
            self.memory.arena.release()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _host_memory() -> tuple[int, int]:
    """(available, total) bytes of host memory, from /proc/meminfo where there is one."""
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines() if ":" in line)
        return int(info["MemAvailable"].split()[0]) * 1024, int(info["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0, 0
