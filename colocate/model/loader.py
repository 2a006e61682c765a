"""Weights by HF name: one `load_weights` path for start-up, resume after a meta pause and updates."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from colocate.model.checkpoint import checkpoint_files, read_safetensors
from colocate.model.config import ModelConfig
from colocate.model.decoder import CausalLM

WeightKey = tuple[str, int | None]  # (our parameter name, shard index or None)


@dataclass(frozen=True)
class WeightCopy:
    key: WeightKey
    name: str  # as the caller named it
    dst: torch.Tensor  # a view into the parameter
    src: torch.Tensor


def plan_weights(model: CausalLM, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[WeightCopy]:
    """Validate a whole set of named tensors against the model; return the copies to make.

    Raises ValueError naming every bad entry (unknown name, wrong shape, non-float dtype,
    duplicate) before anything is copied, so a refused update changes nothing.
    """
    params = dict(model.named_parameters())
    plan: list[WeightCopy] = []
    seen: dict[WeightKey, str] = {}
    errors: list[str] = []
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            errors.append(f"{name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
            continue
        key = model.hf_to_param(name)
        param = params.get(key[0])
        if param is None:
            errors.append(f"{name!r}: no such parameter in this {model.config.model_type} model")
            continue
        dst = param.data
        sizes = model.shard_sizes(key[0])
        if sizes is not None and key[1] is None and tuple(tensor.shape) != tuple(dst.shape):
            errors.append(f"{name!r}: shape {tuple(tensor.shape)} != fused {tuple(dst.shape)}")
            continue
        if key[1] is not None:
            dst = dst.split(sizes, dim=0)[key[1]]
        # A shard overlaps its whole fused parameter, and a whole fused parameter overlaps each of its shards.
        overlaps = ([key, (key[0], None)] if key[1] is not None
                    else [key] + [(key[0], i) for i in range(len(sizes or []))])
        clash = next((seen[k] for k in overlaps if k in seen), None)
        if tuple(tensor.shape) != tuple(dst.shape):
            errors.append(f"{name!r}: shape {tuple(tensor.shape)}, the model expects {tuple(dst.shape)}")
        elif not tensor.dtype.is_floating_point:
            errors.append(f"{name!r}: dtype {tensor.dtype} is not a floating-point type")
        elif clash is not None:
            errors.append(f"{name!r}: written twice in one update (also as {clash!r})")
        else:
            seen[key] = name
            plan.append(WeightCopy(key, name, dst, tensor))
    if errors:
        shown = "; ".join(errors[:8]) + (f"; and {len(errors) - 8} more" if len(errors) > 8 else "")
        raise ValueError(f"refused weight update ({len(errors)} bad tensor(s), nothing was copied): {shown}")
    return plan


@torch.no_grad()
def apply_weights(plan: list[WeightCopy]) -> set[WeightKey]:
    """Copy a validated plan in place (dtype cast on the fly); returns the keys written."""
    for copy in plan:
        copy.dst.copy_(copy.src, non_blocking=True)
    return {copy.key for copy in plan}


def load_weights(model: CausalLM, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[WeightKey]:
    """Validate, then copy named tensors (HF or our fused names) into the model in place."""
    return apply_weights(plan_weights(model, named_tensors))


def all_weight_keys(model: CausalLM) -> set[WeightKey]:
    """Every key a complete set of weights writes (fused parameters count per shard)."""
    keys: set[WeightKey] = set()
    for name, _ in model.named_parameters():
        sizes = model.shard_sizes(name)
        keys.update([(name, None)] if sizes is None else [(name, i) for i in range(len(sizes))])
    return keys


def covered_keys(model: CausalLM, written: set[WeightKey]) -> set[WeightKey]:
    """Expand whole-parameter writes of fused parameters to their shards."""
    out: set[WeightKey] = set()
    for name, shard in written:
        sizes = model.shard_sizes(name)
        out.update([(name, shard)] if sizes is None or shard is not None else [(name, i) for i in range(len(sizes))])
    return out


def key_to_hf_name(model: CausalLM, key: WeightKey) -> str:
    name, shard = key
    if shard is None:
        return name
    hf = {".qkv_proj.": ("q_proj", "k_proj", "v_proj"), ".gate_up_proj.": ("gate_proj", "up_proj")}
    for fused, parts in hf.items():
        if fused in name:
            return name.replace(fused, f".{parts[shard]}.")
    return name


def build_meta_model(config: ModelConfig, *, dtype: torch.dtype, max_positions: int | None = None) -> CausalLM:
    """The model on meta in `dtype` (rotary tables stay float32): no memory yet, shapes only."""
    with torch.device("meta"):
        model = CausalLM(config, max_positions=max_positions)
    model.to(dtype=dtype)
    model.model.rotary_emb.float()
    return model.eval().requires_grad_(False)


def build_model(config: ModelConfig, *, device: str | torch.device, dtype: torch.dtype,
                max_positions: int | None = None) -> CausalLM:
    """Build on meta, materialise with `to_empty` on `device` (contents uninitialised), buffers set."""
    model = build_meta_model(config, dtype=dtype, max_positions=max_positions)
    model.to_empty(device=device)
    model.reset_buffers()
    return model


def load_checkpoint(model: CausalLM, path: str | Path) -> None:
    """Fill every parameter of `model` from a checkpoint folder, one shard at a time; raise naming any missing."""
    written: set[WeightKey] = set()
    for file in checkpoint_files(path):
        tensors = read_safetensors(file)
        # Checkpoints with tied embeddings may still carry lm_head.weight, equal to the embedding.
        if model.config.tie_word_embeddings and "model.embed_tokens.weight" in tensors:
            tensors.pop("lm_head.weight", None)
        written |= load_weights(model, tensors.items())
    missing = all_weight_keys(model) - covered_keys(model, written)
    if missing:
        names = sorted(key_to_hf_name(model, k) for k in missing)
        raise ValueError(f"checkpoint {str(path)!r} lacks {len(names)} tensor(s): {names[:8]}")


@torch.no_grad()
def init_random_weights(model: CausalLM, *, seed: int = 0, std: float = 0.02) -> None:
    """Random initialisation like transformers': normal(0, std) matrices, ones for norms, zeros for biases."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            # Draw in float32 so the values do not depend on the parameter dtype.
            param.copy_(torch.empty(param.shape, device=device).normal_(0.0, std, generator=gen))
