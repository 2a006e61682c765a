"""The Engine facade: generate with continuous batching; release and resume memory; update weights in place."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from typing import Any

import torch

from colocate.engine.block_manager import BlockManager
from colocate.engine.config import EngineConfig, SamplingParams
from colocate.engine.memory_manager import MemoryManager, ResumeOutOfMemoryError
from colocate.engine.model_runner import ModelRunner
from colocate.engine.request import Prompt, normalize_requests, tokenize_prompt
from colocate.engine.sampler import derive_seed
from colocate.engine.scheduler import Scheduler
from colocate.engine.sequence import GenerationOutput, Sequence
from colocate.memory.flat import FlatParameters, materialize_buffers
from colocate.memory.state import MemoryReport, PauseMode, TagState, WeightsMode, check_tags
from colocate.engine.weight_update import Layout, WeightUpdater
from colocate.model import CausalLM, load_model

__all__ = ["Engine", "EnginePausedError", "PauseTimeoutError", "ResumeOutOfMemoryError"]
_CPU_DEFAULT_KV_BYTES = 256 << 20


class EnginePausedError(RuntimeError):
    """Retryable: the engine stayed paused longer than a request waits (EngineConfig.paused_wait_s)."""


class PauseTimeoutError(RuntimeError):
    """release_memory(mode="wait") could not drain in-flight requests in time; the engine stays awake."""


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
        weights: list[FlatParameters] = []

        def materialize(meta_model: CausalLM) -> None:
            # One flat allocation for every parameter: release and resume move one block.
            flat = FlatParameters(meta_model)
            flat.materialize(config.torch_device)
            materialize_buffers(meta_model, config.torch_device)
            weights.append(flat)

        model, self.tokenizer = load_model(config.model, device=config.torch_device, dtype=config.torch_dtype,
                                           max_positions=config.max_model_len, seed=config.seed,
                                           materialize=materialize)
        mc = model.config
        self.model_config = mc
        if config.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's max_position_embeddings="
                             f"{mc.max_position_embeddings}; lower max_model_len")
        if mc.sliding_window is not None and mc.sliding_window < config.max_model_len:
            raise ValueError(f"the model uses sliding-window attention ({mc.sliding_window} tokens), which colocate "
                             f"does not implement; set max_model_len <= {mc.sliding_window}")
        num_blocks = self._num_kv_blocks(model)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(block_manager=self.block_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=config.max_model_len, eos_token_ids=mc.eos_token_id)
        self.runner = ModelRunner(config, model, num_blocks)
        self.memory = MemoryManager(self.runner, weights[0])
        self.updater = WeightUpdater(model)
        self._cond = threading.Condition(threading.RLock())  # guards everything below and the scheduler
        self._control = threading.Lock()  # one release / resume / update at a time
        self._held: dict[int, Sequence] = {}  # arrived while pausing or paused; admitted on resume
        self._accepting = True
        self._seq_ids = itertools.count()
        self._is_shut_down = False

    def _num_kv_blocks(self, model: CausalLM) -> int:
        cfg = self.config
        per_block = ModelRunner.kv_bytes_per_block(cfg, model)
        max_useful = cfg.max_num_seqs * -(-cfg.max_model_len // cfg.block_size)
        if cfg.kv_cache_bytes is not None:
            budget, source = cfg.kv_cache_bytes, f"kv_cache_bytes={cfg.kv_cache_bytes}"
        elif cfg.torch_device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(cfg.torch_device)
            budget, source = int(free * cfg.kv_cache_fraction), f"kv_cache_fraction={cfg.kv_cache_fraction}"
        else:
            budget, source = _CPU_DEFAULT_KV_BYTES, "the CPU default of 256 MiB (set kv_cache_bytes)"
            budget = min(budget, (max_useful + 1) * per_block)
        num_blocks = budget // per_block - 1  # one block is the CUDA-graph padding sink
        if num_blocks * cfg.block_size < cfg.max_model_len:
            raise ValueError(
                f"the KV cache from {source} holds {max(num_blocks, 0) * cfg.block_size} tokens, fewer than "
                f"max_model_len={cfg.max_model_len}; give it more memory or lower max_model_len")
        return num_blocks

    @property
    def weights_version(self) -> int | None:
        return self.updater.version

    @property
    def state(self) -> dict[str, TagState]:
        """Each tag's state (AWAKE or PAUSED)."""
        return dict(self.memory.state)

    # -- generation -----------------------------------------------------------------------
    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 ) -> list[GenerationOutput]:
        """Generate for one prompt or a list (text or token ids); returns one output per prompt, in order."""
        seqs = self.add_requests(prompts, params)
        self.run_until_finished(seqs)
        return [self._output(seq) for seq in seqs]

    def add_requests(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None,
                     ) -> list[Sequence]:
        """Validate every prompt first, then queue them all (a bad one queues none)."""
        prompts, param_list = normalize_requests(prompts, params)
        token_lists = [tokenize_prompt(i, p, tokenizer=self.tokenizer, vocab_size=self.model_config.vocab_size,
                                       max_model_len=self.config.max_model_len) for i, p in enumerate(prompts)]
        with self._cond:
            self._check_open()
            if self._weights_invalid():
                raise RuntimeError(self.updater.unwritten_message())
            seqs = []
            for tokens, sp in zip(token_lists, param_list):
                seq_id = next(self._seq_ids)
                seed = sp.seed if sp.seed is not None else derive_seed(self.config.seed, seq_id)
                seqs.append(Sequence(seq_id, tokens, sp, seed))
            for seq in seqs:
                if self._accepting:
                    self.scheduler.add(seq)
                else:
                    self._held[seq.seq_id] = seq
        return seqs

    def run_until_finished(self, seqs: list[Sequence]) -> None:
        """Drive engine steps (for every caller's requests) until all of `seqs` finish.

        While the engine is paused this waits; past `paused_wait_s` the requests still held
        are withdrawn and EnginePausedError is raised, so the caller can retry them.
        """
        deadline = time.monotonic() + self.config.paused_wait_s
        while True:
            with self._cond:
                if all(seq.is_finished for seq in seqs):
                    return
                self._check_open()
                if self._can_step():
                    if self.step() == 0:
                        self._cond.wait(0.01)  # ours are held by a pause in progress
                    continue
                held = [seq for seq in seqs if seq.seq_id in self._held]
                if self._weights_invalid():
                    self._withdraw(held)
                    raise RuntimeError(self.updater.unwritten_message())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._withdraw(held)
                    raise EnginePausedError(
                        f"the engine has been paused for over {self.config.paused_wait_s} s "
                        f"(state: { {t: s.value for t, s in self.memory.state.items()} }); "
                        "retry after resume_memory()")
                self._cond.wait(min(remaining, 0.1))

    def _withdraw(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self._held.pop(seq.seq_id, None)
            seq.finish("abort")

    def _can_step(self) -> bool:
        return self.memory.is_awake and self.updater.is_ready

    def _weights_invalid(self) -> bool:
        # Awake, no update under way, yet some weights hold no valid values: refuse, do not wait.
        return self.memory.is_awake and self.updater.stream is None and bool(self.updater.unwritten)

    def step(self) -> int:
        """One scheduler step: a prefill batch or a decode step. Returns the number of sequences run."""
        with self._cond:
            if not self._can_step():
                return 0
            batch = self.scheduler.schedule()
            if batch is None:
                return 0
            try:
                token_ids, logprobs = self.runner.run(batch.seqs, batch.is_prefill)
            except BaseException:
                # Leave no caller waiting on sequences whose step failed.
                for seq in batch.seqs:
                    if seq in self.scheduler.running:
                        self.scheduler.running.remove(seq)
                        self.block_manager.free(seq)
                    seq.finish("abort")
                self._cond.notify_all()
                raise
            finished = self.scheduler.postprocess(batch.seqs, token_ids, logprobs)
            if finished:
                self._cond.notify_all()
            return len(batch.seqs)

    def _output(self, seq: Sequence) -> GenerationOutput:
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
            with self._cond:
                self._check_open()
                self.updater.check_no_stream()
                if all(self.memory.state[t] is TagState.PAUSED for t in tags):
                    return self.memory.release(tags, weights_to)  # every tag reports its no-op
                self._accepting = False
            try:
                num_aborted = self._quiesce(mode, timeout_s)
                with self._cond:
                    assert self.scheduler.num_unfinished == 0, f"{self.scheduler.num_unfinished=} after quiescing"
                    if "weights" in tags:
                        self.updater.forget_parameters()
                    report = self.memory.release(tags, weights_to)
                    report.num_aborted = num_aborted
                    self._cond.notify_all()
                    return report
            except BaseException:
                with self._cond:
                    self._admit_held_if_awake()
                raise

    def _quiesce(self, mode: PauseMode, timeout_s: float) -> int:
        if mode == "abort":
            with self._cond:
                aborted = self.scheduler.abort_all()
                self._cond.notify_all()
                return len(aborted)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._cond:
                if self.scheduler.num_unfinished == 0:
                    return 0
                if time.monotonic() > deadline:
                    raise PauseTimeoutError(
                        f"{self.scheduler.num_unfinished} request(s) still in flight after timeout_s={timeout_s}; "
                        "the engine stays awake. Raise timeout_s or pass mode='abort'")
                self.step()

    def resume_memory(self, tags: str | Seq[str] | None = None) -> MemoryReport:
        """Take back device memory for `tags` (default: all), in the order weights, kv_cache, cuda_graph.

        Out of memory: what this call took is freed, the tags stay paused, and
        ResumeOutOfMemoryError says how many bytes were needed and free. Resuming an awake tag is a no-op.
        """
        tags = check_tags(tags)
        with self._control, self._cond:
            self._check_open()
            self.updater.check_no_stream()
            weights_were_paused = "weights" in tags and self.memory.state["weights"] is TagState.PAUSED
            report = self.memory.resume(tags)
            if weights_were_paused and self.memory.weights_mode == "meta":
                self.updater.mark_all_unwritten()
            self._admit_held_if_awake()
            return report

    def _admit_held_if_awake(self) -> None:
        if self.memory.is_awake:
            self._accepting = True
            for seq in self._held.values():
                self.scheduler.add(seq)
            self._held.clear()
        self._cond.notify_all()

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: int | None = None,
                       ) -> dict[str, Any]:
        """Copy (HF name, tensor) pairs into the engine's parameters in place.

        The whole set is validated first (names, shapes, dtypes): a bad update raises
        ValueError and changes nothing. Tensors may live on any device; they are cast to
        the engine's dtype. Needs the weights tag awake.
        """
        with self._control, self._cond:
            self._check_weights_awake()
            result = self.updater.apply(named_tensors, version)
            self._cond.notify_all()
            return result

    def begin_weight_update(self, layout: Layout, *, version: int | None = None, timeout_s: float = 120.0) -> None:
        """Announce an update that arrives in buckets: every (HF name, shape, dtype), validated before any copy.

        Until `finish_weight_update` no step runs (the weights are a mix). If no bucket arrives
        for `timeout_s`, or a bucket fails after copies began, the update is aborted and the
        engine refuses to generate until a complete update arrives.
        """
        with self._control, self._cond:
            self._check_weights_awake()
            self.updater.begin(layout, version=version, timeout_s=timeout_s)

    def load_weight_bucket(self, named_tensors: Seq[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        """Copy one bucket of the announced update in place (the tensors may be freed on return)."""
        with self._control, self._cond:
            self._check_open()
            return self.updater.load_bucket(named_tensors)

    def finish_weight_update(self) -> dict[str, Any]:
        with self._control, self._cond:
            self._check_open()
            try:
                return self.updater.finish()
            finally:
                self._cond.notify_all()

    def abort_weight_update(self) -> None:
        with self._control, self._cond:
            self.updater.abort("aborted by the producer")
            self._cond.notify_all()

    def update_weights_from_disk(self, path: str, *, version: int | None = None) -> dict[str, Any]:
        """The slow path: load a safetensors folder in place, one file at a time.

        Every name, shape and dtype is checked from the file headers before the first copy.
        """
        start = time.perf_counter()
        layout, files = self.updater.disk_layout(path)
        self.begin_weight_update(layout, version=version)
        try:
            for file in files:
                with self._control, self._cond:
                    self.updater.load_disk_file(file)
        except BaseException:
            self.abort_weight_update()
            raise
        result = self.finish_weight_update()
        result["seconds"] = time.perf_counter() - start
        return result

    def _check_weights_awake(self) -> None:
        self._check_open()
        if self.memory.state["weights"] is TagState.PAUSED:
            raise RuntimeError("the engine's weights are paused; call resume_memory(('weights',)) "
                               "before updating them")

    def memory_status(self) -> dict[str, Any]:
        """Bytes per tag on device and host, each tag's state, and the device's free and total memory."""
        with self._cond:
            if self.config.torch_device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.config.torch_device)
            else:
                free, total = _host_memory()
            return {
                "state": {t: s.value for t, s in self.memory.state.items()},
                "is_awake": self.memory.is_awake,
                "device": str(self.config.torch_device),
                "device_bytes": self.memory.device_bytes(),
                "host_bytes": {"weights": self.memory.arena.nbytes},
                "device_free_bytes": free,
                "device_total_bytes": total,
                "weights_mode": self.memory.weights_mode,
                "weights_version": self.weights_version,
                "num_missing_weights": len(self.updater.unwritten),
                "weight_update_in_progress": self.updater.stream is not None,
                "num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting) + len(self._held),
            }

    def release_host_arena(self) -> int:
        """Free the pinned host arena kept for fast cycles; returns its bytes."""
        with self._control, self._cond:
            return self.memory.release_host_arena()

    # -- lifecycle ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._is_shut_down:
            raise RuntimeError("this Engine was shut down; create a new one")

    def shutdown(self) -> None:
        """Abort queued requests and free the model, the KV cache, the graphs and the arena. Idempotent."""
        with self._cond:
            if self._is_shut_down:
                return
            self._is_shut_down = True
            self.scheduler.abort_all()
            self._withdraw(list(self._held.values()))
            self.runner.graphs = None
            self.runner.attention.kv_cache = None
            self.updater.forget_parameters()
            self.memory.weights.to_meta()
            self.memory.arena.release()
            self._cond.notify_all()
        if self.config.torch_device.type == "cuda":
            torch.cuda.empty_cache()

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
