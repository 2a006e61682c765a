"""EngineConfig and SamplingParams: keyword-only, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from colocate.dtypes import DTYPES
from colocate.memory.layer_stream import check_fraction
from colocate.model.config import ModelConfig
from colocate.model.quant import FP8_GEMMS, QUANTIZATIONS

MAX_N = 1024  # responses per prompt
# Alternatives reported per token: each costs a host transfer per row and step, so the engine bounds it.
MAX_TOP_LOGPROBS = 64


@dataclass(kw_only=True)
class SamplingParams:
    """How to sample one request.

    >>> SamplingParams(max_new_tokens=32, temperature=0.0)            # greedy
    >>> SamplingParams(temperature=1.0, top_p=0.9, seed=7)             # reproducible sampling
    >>> SamplingParams(top_logprobs=5, presence_penalty=1.0)            # 5 alternatives per token, fewer repeats
    temperature 0 is greedy; top_k 0 and top_p 1 keep the whole vocabulary. `seed` fixes the
    request's random stream whatever else is in the batch (None: drawn from the engine's seed).
    `top_logprobs` k reports the k most likely tokens of the distribution each token was sampled
    from; `prompt_logprobs` k (None: off) scores the prompt tokens too, with k alternatives each.
    `presence_penalty` and `frequency_penalty` (OpenAI's, in [-2, 2]) lower the logit of every
    token already generated, by a constant and per occurrence; they apply to greedy requests too.
    `n` responses share the prompt's prefill and KV blocks; response i of a request with seed s is
    exactly the response of a request with seed s + i.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = True
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    n: int = 1  # responses to the prompt; they share its KV blocks (see `Engine.generate`)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n={self.n!r} must be an integer in [1, {MAX_N}]")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]; use 1.0 to keep every token")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 1 << 63:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0; use 0 to keep every token")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(1 << 63) <= self.seed < 1 << 63):
            raise ValueError(f"seed={self.seed!r} must be a 64-bit integer or None")
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("top_logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_TOP_LOGPROBS):
                raise ValueError(f"{name}={k!r} must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:  # also rejects NaN
                raise ValueError(f"{name}={getattr(self, name)!r} must be in [-2, 2] (0 turns it off)")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass(kw_only=True)
class EngineConfig:
    """Everything the built-in engine needs to start.

    >>> Engine(EngineConfig(model="tiny", device="cpu"))
    >>> Engine(EngineConfig(model="/ckpt/Qwen2.5-1.5B", device="cuda", dtype="bfloat16", kv_cache_fraction=0.5))
    `model` is a preset name (see `colocate.model.PRESETS`) or an HF checkpoint folder.
    On CUDA the KV cache takes `kv_cache_fraction` of the device memory free after the weights
    are loaded; on CPU it takes `kv_cache_bytes` (default 256 MiB). `kv_cache_bytes` overrides
    the fraction on CUDA too.
    `quantization="fp8"` stores the decoder layers' linear weights as float8_e4m3fn with one float32
    scale per output channel (embeddings, LM head and norms stay in `dtype`, which stays the compute
    dtype and the dtype updates are sent in); loads and updates quantize what they receive, on the device.
    """

    model: str = "tiny"
    device: str = "auto"  # "auto": cuda if available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu
    kv_cache_fraction: float = 0.5
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: the model's limit, capped by the KV cache (see above)
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    seed: int = 0
    enable_cuda_graph: bool = True
    cuda_graph_max_batch_size: int = 0  # 0: max_num_seqs
    paused_wait_s: float = 300.0  # how long a request that arrives while paused waits for resume
    keep_host_arena: bool = True  # False: free the pinned host copy of the weights after each resume
    # CUDA: weights and KV pool at addresses fixed for the engine's life (virtual memory, remapped on resume),
    # so the decode graphs are captured once and survive every release. Off until it is proven on your GPU.
    fixed_addresses: bool = False
    quantization: str | None = None  # "fp8": decoder linear weights in float8_e4m3fn with per-channel scales
    # The fp8 GEMM: "dequantize" (fp8 -> dtype, then a dense GEMM; every device) or "scaled_mm" (rowwise
    # torch._scaled_mm with per-token fp8 activations; CUDA compute capability >= 8.9). Not yet measured on a
    # GPU, so "dequantize" is the default there too.
    fp8_gemm: str = "dequantize"
    # The fraction of the decoder layers whose weights live in pinned host memory and are copied to the device
    # for each forward, `weights_prefetch` layers ahead (staging slots), while earlier layers compute. Embeddings,
    # LM head and norms of the other layers stay resident. 0: every weight on the device.
    weights_offload: float = 0.0
    weights_prefetch: int = 2
    # CUDA: bytes this process may hold on its device (the caching allocator's cap, set at start-up); the KV
    # cache's kv_cache_fraction is then of what is free within it. None: no cap. No effect on CPU.
    memory_limit: int | None = None

    def __post_init__(self) -> None:
        if self.device == "auto":  # resolved where the config is made; name the device for remote workers
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(self.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: colocate runs on 'cpu' or 'cuda[:N]'")
        # Whether CUDA is there is checked where the engine is built: a config may be made on a
        # machine without a GPU (a Ray driver) for workers that have one.
        if self.dtype == "auto":
            self.dtype = "bfloat16" if device.type == "cuda" else "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {sorted(DTYPES)} or 'auto'")
        if not 0 < self.kv_cache_fraction < 1:
            raise ValueError(f"kv_cache_fraction={self.kv_cache_fraction!r} must be in (0, 1), e.g. 0.5")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes={self.kv_cache_bytes!r} must be positive or None")
        if self.memory_limit is not None and (type(self.memory_limit) is not int or self.memory_limit < 1):
            raise ValueError(f"memory_limit={self.memory_limit!r} must be a positive number of bytes or None")
        if self.memory_limit is not None and self.fixed_addresses:
            raise ValueError("memory_limit caps the caching allocator, and fixed_addresses maps its memory outside "
                             "it: use one or the other")
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is None and name == "max_model_len":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1" +
                                 (" or None (the model's limit)" if name == "max_model_len" else ""))
        if self.max_model_len is not None and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"max_model_len={self.max_model_len} so the longest prompt can be prefilled")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size!r} must be a power of two, e.g. 16")
        if not self.paused_wait_s >= 0:
            raise ValueError(f"paused_wait_s={self.paused_wait_s!r} must be >= 0 (seconds)")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={self.quantization!r} must be None or one of {list(QUANTIZATIONS)}")
        if self.fp8_gemm not in FP8_GEMMS:
            raise ValueError(f"fp8_gemm={self.fp8_gemm!r} must be one of {list(FP8_GEMMS)}")
        if self.fp8_gemm == "scaled_mm" and (self.quantization != "fp8" or device.type != "cuda"
                                             or self.dtype != "bfloat16"):
            raise ValueError("fp8_gemm='scaled_mm' needs quantization='fp8', device='cuda' and dtype='bfloat16'; "
                             "use fp8_gemm='dequantize' otherwise")
        check_fraction("weights_offload", self.weights_offload)
        if isinstance(self.weights_prefetch, bool) or not isinstance(self.weights_prefetch, int) \
                or self.weights_prefetch < 1:
            raise ValueError(f"weights_prefetch={self.weights_prefetch!r} must be an integer >= 1 (layers copied "
                             "ahead of the one computing; 1: no overlap with the layer before)")
        if self.cuda_graph_max_batch_size < 0:
            raise ValueError(f"cuda_graph_max_batch_size={self.cuda_graph_max_batch_size} must be >= 0")

    def model_limit(self, model: ModelConfig) -> tuple[int, str]:
        """The longest max_model_len this config allows for `model` before the KV cache: (tokens, why)."""
        limit, why = model.max_position_embeddings, f"the model's max_position_embeddings={model.max_position_embeddings}"
        if model.sliding_window is not None and model.sliding_window < limit:
            limit, why = model.sliding_window, f"the model's sliding window ({model.sliding_window} tokens)"
        if self.max_num_batched_tokens < limit:
            limit, why = self.max_num_batched_tokens, f"max_num_batched_tokens={self.max_num_batched_tokens}"
        return limit, why

    def check_model(self, model: ModelConfig) -> None:
        """ValueError unless this config fits the model it loads (context length, attention kind)."""
        assert self.max_model_len is not None, "resolve max_model_len (model_limit) first"
        if self.max_model_len > model.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings="
                             f"{model.max_position_embeddings}; lower max_model_len")
        if model.sliding_window is not None and model.sliding_window < self.max_model_len:
            raise ValueError(f"the model uses sliding-window attention ({model.sliding_window} tokens), which "
                             f"colocate does not implement; set max_model_len <= {model.sliding_window}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)
