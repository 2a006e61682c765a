"""Runs the model for a scheduled batch; owns the model's flat weights, the KV pool, the step inputs and the graphs."""

from __future__ import annotations

import torch

from colocate.engine.attention import AttentionMetadata, PagedAttention
from colocate.engine.config import EngineConfig
from colocate.engine.cuda_graph import DecodeGraphs
from colocate.engine.kv_cache import KVCachePool
from colocate.engine.sampler import sample
from colocate.engine.sequence import Sequence
from colocate.engine.step_inputs import StepInputs
from colocate.memory.flat import FlatParameters, materialize_buffers
from colocate.model import CausalLM, load_model
from colocate.model.quant import can_use_scaled_mm


class ModelRunner:
    """The model, its KV cache pool and its decode graphs: everything a step touches on the device.

    >>> runner = ModelRunner(config)          # loads the model into one flat buffer, sizes the pool, captures graphs
    >>> token_ids, logprobs = runner.run(seqs, is_prefill=False)
    >>> runner.free_kv_cache(); runner.drop_graphs()      # what the memory manager calls on release
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config, self.device = config, config.torch_device
        self.weights: FlatParameters | None = None
        if config.fp8_gemm == "scaled_mm" and not can_use_scaled_mm(self.device):
            raise ValueError(f"fp8_gemm='scaled_mm' needs a CUDA device of compute capability >= 8.9; {self.device} "
                             "has none: use fp8_gemm='dequantize'")
        self.model, self.tokenizer = load_model(config.model, device=self.device, dtype=config.torch_dtype,
                                                max_positions=config.max_model_len, seed=config.seed,
                                                materialize=self._materialize, quantization=config.quantization,
                                                fp8_gemm=config.fp8_gemm)
        config.check_model(self.model.config)
        model = self.model
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
        # One flat allocation for every parameter: release and resume move one block.
        self.weights = FlatParameters(meta_model)
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

    def free_kv_cache(self) -> int:
        return self.kv.free()

    def allocate_kv_cache(self) -> int:
        return self.kv.allocate()

    def device_bytes(self) -> dict[str, int]:
        return {"kv_cache": 0 if self.kv.tensor is None else self.kv.nbytes,
                "cuda_graph": 0 if self.graphs is None else self.graphs.pool_bytes}

    # -- run ------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> tuple[list[int], list[float]]:
        if is_prefill:
            input_ids, positions, meta, last = self.inputs.prefill(seqs)
            logits = self.forward(input_ids, positions, meta, last)
        elif self.graphs is not None and len(seqs) <= self.graphs.max_batch_size:
            logits = self.graphs.replay(seqs)
        else:
            input_ids, positions, meta = self.inputs.decode(seqs)
            logits = self.forward(input_ids, positions, meta, None)
        tokens, logprobs = sample(logits, self.inputs.sampling(seqs))
        # One device-to-host transfer (one sync) for both; token ids are exact in float64.
        host = torch.stack((tokens.double(), logprobs.double())).cpu()
        return [int(t) for t in host[0].tolist()], host[1].tolist()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                last: list[int] | None) -> torch.Tensor:
        self.attention.metadata = meta
        try:
            hidden = self.model(input_ids, positions, self.attention)
        finally:
            self.attention.metadata = None
        if last is not None:
            hidden = hidden[torch.tensor(last, device=hidden.device)]
        return self.model.compute_logits(hidden)
