"""The Llama-family decoder (Llama, Qwen2, Qwen3, Mistral) with fused qkv and gate/up projections."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from colocate.model import kernels
from colocate.model.attention import AttentionBackend
from colocate.model.config import ModelConfig
from colocate.model.rotary import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or (norm(x + residual), x + residual) with the add fused in."""
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary = [rotary]  # a list, so the shared tables are not registered once per layer

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary[0](positions, q, k)
        out = attn.attend(self.layer_idx, q, k, v)  # [N, Hq, D]
        return self.o_proj(out.reshape(n, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream is carried separately so each add fuses into the next norm:
        # returns (this layer's MLP output, the stream before adding it).
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, attn)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(config, i, self.rotary_emb) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Where the forward takes its layers from: None, this module's; or a callable given the layers that
        # yields each one ready to run (e.g. `LayerStreamer.run`, which stages host-resident weights).
        self.layer_source: Callable[[nn.ModuleList], Iterable[nn.Module]] | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers if self.layer_source is None else self.layer_source(self.layers):
            x, residual = layer(x, residual, positions, attn)
        return self.norm(x, residual)[0]


# HF projection name -> (our fused parameter, index of the shard inside it)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


class CausalLM(nn.Module):
    """A decoder-only language model built from a `ModelConfig`.

    >>> with torch.device("meta"):
    ...     model = CausalLM(config, max_positions=2048)
    >>> model.to_empty(device="cuda"); model.reset_buffers()
    >>> load_weights(model, safetensors_tensors)            # HF names; fused layouts handled here
    >>> hidden = model(input_ids, positions, attention)    # [N] ids and positions -> [N, hidden]
    >>> logits = model.compute_logits(hidden)              # [N, vocab]
    """

    def __init__(self, config: ModelConfig, *, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.max_positions = max_positions or config.max_position_embeddings
        self.model = Decoder(config, self.max_positions)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        return self.model(input_ids, positions, attn)

    def to_empty(self, *, device: torch.device | str | int | None, recurse: bool = True) -> CausalLM:
        # Moving off meta makes a new Parameter per module: a tied lm_head would get a tensor of its own
        # (as large as the embedding, on the device until it is tied again). Materialise it once.
        tied = self.config.tie_word_embeddings
        if tied:
            self.lm_head._parameters["weight"] = None
        try:
            super().to_empty(device=device, recurse=recurse)
        finally:
            if tied:
                self.lm_head.weight = self.model.embed_tokens.weight
        return self

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def reset_buffers(self) -> None:
        """Recompute non-parameter state (rotary tables), e.g. after `to_empty`."""
        self.model.rotary_emb.reset_buffers()

    # -- HF names ------------------------------------------------------------------------
    def hf_to_param(self, name: str) -> tuple[str, int | None]:
        """Map an HF parameter name to (our parameter name, shard index or None for the whole)."""
        if name.startswith("model.layers."):
            for hf, (ours, shard) in _FUSED.items():
                if f".{hf}." in name:
                    return name.replace(f".{hf}.", f".{ours}."), shard
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return "model.embed_tokens.weight", None
        return name, None

    def shard_sizes(self, param_name: str) -> list[int] | None:
        """Row sizes of the shards fused into a parameter, or None if it is not fused."""
        if ".qkv_proj." in param_name:
            return [self.config.q_size, self.config.kv_size, self.config.kv_size]
        if ".gate_up_proj." in param_name:
            return [self.config.intermediate_size] * 2
        return None

    def hf_named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Parameters under their HF names; fused ones split into views (no copy).

        Tied embeddings appear once, as `model.embed_tokens.weight` (HF checkpoints omit lm_head then).
        """
        inverse = {(ours, shard): hf for hf, (ours, shard) in _FUSED.items()}
        for name, param in self.named_parameters():
            sizes = self.shard_sizes(name)
            if sizes is None:
                yield name, param.detach()
                continue
            prefix, _, leaf = name.rpartition(".")  # leaf: weight | bias
            layer_prefix, _, proj = prefix.rpartition(".")
            layer_prefix, _, block = layer_prefix.rpartition(".")
            for shard, part in enumerate(param.detach().split(sizes, dim=0)):
                yield f"{layer_prefix}.{inverse[(f'{block}.{proj}', shard)]}.{leaf}", part
