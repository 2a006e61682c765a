"""The paged KV cache pool: how many blocks fit, the one tensor that holds them, and its padding sink."""

from __future__ import annotations

import torch

from colocate.engine.config import EngineConfig
from colocate.memory.device import empty_own_segment
from colocate.memory.vmm import FixedBuffer
from colocate.model import ModelConfig

# On CPU there is no device to measure: the pool takes this much unless kv_cache_bytes says otherwise.
CPU_DEFAULT_KV_BYTES = 256 << 20


class KVCachePool:
    """Every layer's keys and values in one tensor [2, num_layers, num_blocks + 1, block_size, Hkv, D].

    >>> pool = KVCachePool(config, model.config)      # sized from kv_cache_fraction of free memory (CPU: bytes)
    >>> pool.allocate(); pool.tensor[0, layer]       # the keys of one layer
    >>> pool.free()                                   # one block back to the allocator
    The extra last block is a sink: padded rows of a captured decode graph write their keys
    there, so padding never touches a live sequence's cache. The scheduler hands out blocks
    [0, num_blocks) only.
    """

    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        self.config = config
        self.dtype, self.device, self.block_size = config.torch_dtype, config.torch_device, config.block_size
        mc = model_config
        self.block_shape = (config.block_size, mc.num_key_value_heads, mc.head_dim)
        self.num_layers = mc.num_hidden_layers
        self.num_blocks = self._size()
        self.tensor: torch.Tensor | None = None  # None while the kv_cache tag is released
        # With fixed addresses the pool's range is reserved once (CUDA VMM): only its memory comes and goes.
        self.fixed = (FixedBuffer(self.nbytes, self.device, map_now=False)
                      if config.fixed_addresses and self.device.type == "cuda" else None)

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.num_layers * torch.Size(self.block_shape).numel() * self.dtype.itemsize

    @property
    def shape(self) -> tuple[int, ...]:
        return (2, self.num_layers, self.num_blocks + 1, *self.block_shape)

    @property
    def nbytes(self) -> int:
        return (self.num_blocks + 1) * self.bytes_per_block

    @property
    def sink_block(self) -> int:
        return self.num_blocks

    @property
    def sink_slot(self) -> int:
        return self.sink_block * self.block_size

    @property
    def num_tokens(self) -> int:
        """Tokens the pool holds at once (its capacity across every sequence)."""
        return self.num_blocks * self.block_size

    def _size(self) -> int:
        cfg = self.config
        per_block = self.bytes_per_block
        if cfg.kv_cache_bytes is not None:
            budget, source = cfg.kv_cache_bytes, f"kv_cache_bytes={cfg.kv_cache_bytes}"
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if cfg.memory_limit is not None:  # what is free within this process's cap
                free = max(0, min(free, cfg.memory_limit - torch.cuda.memory_reserved(self.device)))
            budget, source = int(free * cfg.kv_cache_fraction), f"kv_cache_fraction={cfg.kv_cache_fraction}"
        else:
            # No more than the running sequences can use: the CPU default is a ceiling, not a target.
            max_useful = cfg.max_num_seqs * -(-cfg.max_model_len // cfg.block_size)
            budget = min(CPU_DEFAULT_KV_BYTES, (max_useful + 1) * per_block)
            source = "the CPU default of 256 MiB (set kv_cache_bytes)"
        num_blocks = budget // per_block - 1  # one block is the padding sink
        if num_blocks * cfg.block_size < cfg.max_model_len:
            raise ValueError(
                f"the KV cache from {source} holds {max(num_blocks, 0) * cfg.block_size} tokens, fewer than "
                f"max_model_len={cfg.max_model_len}; give it more memory or lower max_model_len")
        return num_blocks

    def allocate(self) -> int:
        """Allocate the pool (contents uninitialised); raises torch.OutOfMemoryError with nothing changed."""
        assert self.tensor is None, "the KV cache is already allocated"
        if self.fixed is not None:
            self.fixed.map()
            self.tensor = self.fixed.tensor.view(self.dtype).view(self.shape)
        else:
            self.tensor = empty_own_segment(self.shape, dtype=self.dtype, device=self.device)
        return self.nbytes

    def free(self) -> int:
        """Drop the pool; returns the bytes it held (0 if it was not allocated)."""
        freed = 0 if self.tensor is None else self.nbytes
        self.tensor = None
        if self.fixed is not None:
            self.fixed.unmap()
        return freed

    def close(self) -> None:
        self.free()
        if self.fixed is not None:
            self.fixed.close()
            self.fixed = None

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy every layer's keys and values of block src into block dst, for each (src, dst): one indexed copy."""
        assert self.tensor is not None, "the KV cache is released; no step may run"
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        self.tensor[:, :, dst] = self.tensor[:, :, src]

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one layer, each [num_blocks + 1, block_size, Hkv, D]."""
        assert self.tensor is not None, "the KV cache is released; no step may run"
        return self.tensor[0, layer_idx], self.tensor[1, layer_idx]
