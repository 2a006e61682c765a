"""Runs the model for a scheduled batch; owns the model's flat weights, the KV pool, the step inputs and the graphs."""

from __future__ import annotations

import dataclasses

import torch

from colocate.engine.attention import AttentionMetadata, PagedAttention
from colocate.engine.config import EngineConfig
from colocate.engine.cuda_graph import DecodeGraphs
from colocate.engine.kv_cache import KVCachePool
from colocate.engine.logprobs import score_prompts, step_output, wants_prompt_logprobs
from colocate.engine.sampler import sample_with_top
from colocate.engine.scheduler import ScheduledBatch
from colocate.engine.sequence import StepOutput
from colocate.engine.step_inputs import StepInputs
from colocate.memory.device import limit_device_memory
from colocate.memory.flat import FlatParameters, materialize_buffers
from colocate.memory.layer_stream import LayerStreamer, stream_layers
from colocate.model import CausalLM, ModelConfig, load_model, resolve_config
from colocate.model.quant import can_use_scaled_mm


class ModelRunner:
    """The model, its KV cache pool and its decode graphs: everything a step touches on the device.

    >>> runner = ModelRunner(config)          # loads the model into one flat buffer, sizes the pool, captures graphs
    >>> out = runner.run(batch)                           # a StepOutput: token ids, logprobs, alternatives
    >>> runner.free_kv_cache(); runner.drop_graphs()      # what the memory manager calls on release
    `runner.config` is the config with max_model_len resolved (EngineConfig.max_model_len None:
    the longest the model and the KV cache allow; `max_model_len_reason` says which bound it is).
    """

    def __init__(self, config: EngineConfig) -> None:
        # The config as given until the model is loaded (materialize reads it), then max_model_len resolved.
        self.config, self.device = config, config.torch_device
        if config.memory_limit is not None:  # before anything is allocated (the cap is the whole process's)
            limit_device_memory(self.device, config.memory_limit)
        self.weights: FlatParameters | None = None
        self.streamer: LayerStreamer | None = None  # with weights_offload: the host-resident layers
        if config.fp8_gemm == "scaled_mm" and not can_use_scaled_mm(self.device):
            raise ValueError(f"fp8_gemm='scaled_mm' needs a CUDA device of compute capability >= 8.9; {self.device} "
                             "has none: use fp8_gemm='dequantize'")
        limit, why = (config.max_model_len, "as configured") if config.max_model_len is not None \
            else config.model_limit(resolve_config(config.model)[0])
        self.model, self.tokenizer = load_model(config.model, device=self.device, dtype=config.torch_dtype,
                                                max_positions=limit, seed=config.seed, materialize=self._materialize,
                                                quantization=config.quantization, fp8_gemm=config.fp8_gemm)
        model = self.model
        if config.max_model_len is None:
            config, why = fit_max_model_len(config, model.config, limit, why)
        config.check_model(model.config)
        self.config, self.max_model_len_reason = config, why
        self.kv = KVCachePool(config, model.config)
        self.kv.allocate()
        self.inputs = StepInputs(self.device, block_size=config.block_size,
                                 max_blocks_per_seq=-(-config.max_model_len // config.block_size),
                                 sink_block=self.kv.sink_block)
        self.attention = PagedAttention(self.kv, scale=model.config.head_dim ** -0.5,
                                        use_triton=self.device.type == "cuda")
        self.graphs: DecodeGraphs | None = None
        self.capture_graphs()

    def _materialize(self, meta_model: CausalLM) -> None:
        # One flat allocation for every resident parameter: release and resume move one block. Layers chosen
        # by weights_offload get pinned host buffers instead; the loader then writes them there directly.
        self.streamer = stream_layers(meta_model.model, self.device, self.config.weights_offload,
                                      prefetch=self.config.weights_prefetch)
        self.weights = FlatParameters(meta_model, exclude=self.streamer.layers if self.streamer else ())
        self.weights.materialize(self.device, fixed_address=self.has_fixed_addresses)
        materialize_buffers(meta_model, self.device)

    # -- memory ---------------------------------------------------------------------------
    @property
    def has_fixed_addresses(self) -> bool:
        """Weights and KV pool keep their addresses across release and resume: graphs stay valid."""
        return self.config.fixed_addresses and self.device.type == "cuda"

    @property
    def can_capture(self) -> bool:
        return self.device.type == "cuda" and self.config.enable_cuda_graph

    def capture_graphs(self) -> int:
        """Capture decode graphs (CUDA with graphs enabled; else nothing). Returns the bytes they took."""
        if not self.can_capture:
            return 0
        max_bs = min(self.config.cuda_graph_max_batch_size or self.config.max_num_seqs, self.config.max_num_seqs)
        self.graphs = DecodeGraphs(self.forward, self.inputs, max_batch_size=max_bs, device=self.device)
        return self.graphs.pool_bytes

    def drop_graphs(self) -> int:
        """Drop the graphs and their static inputs; returns the bytes they held."""
        freed = 0 if self.graphs is None else self.graphs.pool_bytes
        self.graphs = None
        self.inputs.free_static()
        return freed

    def close(self) -> None:
        """Drop the graphs, the weights and the pool, fixed address ranges included (shutdown)."""
        self.drop_graphs()
        self.kv.close()
        if self.weights is not None:
            self.weights.close()
        if self.streamer is not None:
            self.streamer.close()

    def free_kv_cache(self) -> int:
        return self.kv.free()

    def allocate_kv_cache(self) -> int:
        return self.kv.allocate()

    def host_bytes(self) -> dict[str, int]:
        """Host memory the model lives in while awake: the streamed layers' pinned buffers."""
        return {} if self.streamer is None else {"weights_offloaded": self.streamer.host_bytes}

    def device_bytes(self) -> dict[str, int]:
        staging = {} if self.streamer is None else {"weights_staging": self.streamer.staging_bytes}
        return {**staging, "kv_cache": 0 if self.kv.tensor is None else self.kv.nbytes,
                "cuda_graph": 0 if self.graphs is None else self.graphs.pool_bytes}

    # -- run ------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepOutput:
        """One step of the batch's rows; responses forked from a prefill row are sampled from its logits."""
        seqs, is_prefill = batch.seqs, batch.is_prefill
        prompt = {}
        if is_prefill:
            input_ids, positions, meta, last = self.inputs.prefill(seqs)
            if any(wants_prompt_logprobs(seq) for seq in seqs):  # every position's logits, for the asking rows
                hidden = self.hidden(input_ids, positions, meta)
                logits = self.model.compute_logits(hidden[torch.tensor(last, device=hidden.device)])
                prompt = score_prompts(self.model.compute_logits, hidden, seqs, meta.cu_seqlens)
            else:
                logits = self.forward(input_ids, positions, meta, last)
        elif self.graphs is not None and len(seqs) <= self.graphs.max_batch_size:
            logits = self.graphs.replay(seqs)
        else:
            input_ids, positions, meta = self.inputs.decode(seqs)
            logits = self.forward(input_ids, positions, meta, None)
        if batch.forks:
            rows = [row for row, _ in batch.forks]
            logits = torch.cat([logits, logits[torch.tensor(rows, device=logits.device)]])
            prompt |= {len(seqs) + i: prompt[row] for i, row in enumerate(rows) if row in prompt}
        if batch.copies:  # the prompt's partial last block, written by this forward, for each response
            self.kv.copy_blocks(batch.copies)
        sampled = batch.sampled
        tokens, logprobs, top = sample_with_top(logits, self.inputs.sampling(sampled))
        return step_output(sampled, tokens, logprobs, top, prompt)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                last: list[int] | None) -> torch.Tensor:
        hidden = self.hidden(input_ids, positions, meta)
        if last is not None:
            hidden = hidden[torch.tensor(last, device=hidden.device)]
        return self.model.compute_logits(hidden)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        self.attention.metadata = meta
        try:
            return self.model(input_ids, positions, self.attention)
        finally:
            self.attention.metadata = None


def fit_max_model_len(config: EngineConfig, model_config: ModelConfig, limit: int, why: str,
                      ) -> tuple[EngineConfig, str]:
    """`config` with max_model_len = `limit` if the KV pool holds that many tokens, else the longest
    whole number of blocks it holds; and the reason for the number."""

    def fits(num_tokens: int) -> bool:
        try:
            KVCachePool(dataclasses.replace(config, max_model_len=num_tokens), model_config)  # sizes, allocates nothing
        except ValueError:
            return False
        return True

    if fits(limit):
        return dataclasses.replace(config, max_model_len=limit), why
    bs = config.block_size
    if not fits(bs):
        KVCachePool(dataclasses.replace(config, max_model_len=bs), model_config)  # raises: not even one block
    # On CPU the pool's size grows with max_model_len until its byte budget binds, so search rather than divide.
    lo, hi = 1, -(-limit // bs)  # in blocks: lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * bs) else (lo, mid)
    config = dataclasses.replace(config, max_model_len=lo * bs)
    pool_tokens = KVCachePool(config, model_config).num_tokens
    return config, f"capped by the KV cache ({pool_tokens} tokens; {why} allows {limit})"
