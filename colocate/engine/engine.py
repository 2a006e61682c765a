"""The Engine facade: load a model, size the KV cache, and generate with continuous batching."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence as Seq

import torch

from colocate.engine.block_manager import BlockManager
from colocate.engine.config import EngineConfig, SamplingParams
from colocate.engine.model_runner import ModelRunner
from colocate.engine.scheduler import Scheduler
from colocate.engine.sequence import GenerationOutput, Sequence
from colocate.model import load_model

Prompt = str | list[int]
_CPU_DEFAULT_KV_BYTES = 256 << 20


class Engine:
    """An LLM engine for Llama/Qwen-family checkpoints.

    >>> engine = Engine(EngineConfig(model="tiny", device="cpu"))
    >>> out = engine.generate(["Hello"], SamplingParams(max_new_tokens=8, temperature=0.0))[0]
    >>> out.token_ids, out.logprobs, out.finish_reason
    `generate` may be called from several threads at once: their requests join one batch.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        model, self.tokenizer = load_model(config.model, device=config.torch_device, dtype=config.torch_dtype,
                                           max_positions=config.max_model_len, seed=config.seed)
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
        self._lock = threading.RLock()  # one step at a time; guards the scheduler
        self._seq_ids = itertools.count()
        self._is_shut_down = False

    def _num_kv_blocks(self, model: torch.nn.Module) -> int:
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
            budget = min(budget, max_useful * per_block)
        num_blocks = budget // per_block - 1  # one block is the CUDA-graph padding sink
        if num_blocks * cfg.block_size < cfg.max_model_len:
            raise ValueError(
                f"the KV cache from {source} holds {max(num_blocks, 0) * cfg.block_size} tokens, fewer than "
                f"max_model_len={cfg.max_model_len}; give it more memory or lower max_model_len")
        return num_blocks

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
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a string, a list of token ids, or a list of either; "
                             f"got {type(prompts).__name__}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("generate() got no prompts; pass a string, a list of token ids, or a list of either")
        if params is None:
            params = SamplingParams()
        param_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(param_list) != len(prompts):
            raise ValueError(f"got {len(param_list)} SamplingParams for {len(prompts)} prompts; pass one or one each")
        token_lists = [self._tokenize(i, p) for i, p in enumerate(prompts)]
        with self._lock:
            self._check_open()
            seqs = []
            for tokens, sp in zip(token_lists, param_list):
                seq_id = next(self._seq_ids)
                seed = sp.seed if sp.seed is not None else (self.config.seed << 32) + seq_id
                seqs.append(Sequence(seq_id, tokens, sp, seed))
            for seq in seqs:
                self.scheduler.add(seq)
        return seqs

    def _tokenize(self, index: int, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is text but {self.config.model!r} has no tokenizer.json; "
                                 "pass token ids instead")
            tokens = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            tokens = list(prompt)
        else:
            raise ValueError(f"prompt {index} must be a string or a list of int token ids, got {type(prompt).__name__}")
        if not tokens:
            raise ValueError(f"prompt {index} is empty; give at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {index} has token ids outside the vocabulary [0, {vocab}): {bad[:8]}")
        if len(tokens) >= self.config.max_model_len:
            raise ValueError(f"prompt {index} has {len(tokens)} tokens, but max_model_len={self.config.max_model_len} "
                             "leaves no room to generate; shorten the prompt or raise max_model_len")
        return tokens

    def run_until_finished(self, seqs: list[Sequence]) -> None:
        """Drive engine steps (for every caller's requests) until all of `seqs` finish."""
        for seq in seqs:
            while not seq.is_finished:
                with self._lock:
                    if seq.is_finished:
                        break
                    self._check_open()
                    self.step()

    def step(self) -> int:
        """One scheduler step: a prefill batch or a decode step. Returns the number of sequences run."""
        with self._lock:
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
                raise
            self.scheduler.postprocess(batch.seqs, token_ids, logprobs)
            return len(batch.seqs)

    def _output(self, seq: Sequence) -> GenerationOutput:
        out = seq.output()
        if self.tokenizer is not None:
            out.text = self.tokenizer.decode(out.token_ids)
        return out

    # -- lifecycle ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._is_shut_down:
            raise RuntimeError("this Engine was shut down; create a new one")

    def shutdown(self) -> None:
        """Abort queued requests and free the model, the KV cache and the graphs. Idempotent."""
        with self._lock:
            if self._is_shut_down:
                return
            self._is_shut_down = True
            self.scheduler.abort_all()
            self.runner.graphs = None
            del self.runner
        if self.config.torch_device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
