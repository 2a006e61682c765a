"""Weights by HF name: one `load_weights` path for start-up, resume after a meta pause and updates."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from colocate.model.checkpoint import checkpoint_files, read_safetensors
from colocate.model.config import ModelConfig
from colocate.model.decoder import CausalLM
from colocate.model.quant import Fp8Gemm, Fp8Linear, Fp8Slice, fp8_linears, quantize_linears

WeightKey = tuple[str, int | None]  # (our parameter name, shard index or None)
# Where one named tensor is written: a view into a parameter (copied, cast on the fly), or the fp8 rows and
# scales of a quantized linear (quantized on the destination's device).
Destination = torch.Tensor | Fp8Slice


@dataclass(frozen=True)
class WeightCopy:
    key: WeightKey
    name: str  # as the caller named it
    dst: Destination
    src: torch.Tensor


def plan_weights(model: CausalLM, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[WeightCopy]:
    """Validate a whole set of named tensors against the model; return the copies to make.

    Raises ValueError naming every bad entry (unknown name, wrong shape, non-float or fp8 dtype,
    duplicate, a quantization scale) before anything is copied, so a refused update changes nothing.
    The weights of quantized linears are planned as `Fp8Slice`s: the sources stay in the sender's
    dtype and are quantized as they are written.
    """
    params = dict(model.named_parameters())
    quantized = dict(fp8_linears(model))
    scales = _scale_names(model)
    device = model.model.embed_tokens.weight.device  # the engine's device: streamed layers quantize there too
    plan: list[WeightCopy] = []
    seen: dict[WeightKey, str] = {}
    errors: list[str] = []
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            errors.append(f"{name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
            continue
        key = model.hf_to_param(name)
        param = params.get(key[0])
        if param is None or key[0] in scales:
            why = ("is a quantization scale, which the engine computes: send the weight in bf16 or fp32"
                   if param is not None else f"no such parameter in this {model.config.model_type} model")
            errors.append(f"{name!r}: {why}")
            continue
        sizes = model.shard_sizes(key[0])
        if sizes is not None and key[1] is None and tuple(tensor.shape) != tuple(param.shape):
            errors.append(f"{name!r}: shape {tuple(tensor.shape)} != fused {tuple(param.shape)}")
            continue
        dst = _destination(param, quantized.get(key[0]), sizes, key[1], device)
        # A shard overlaps its whole fused parameter, and a whole fused parameter overlaps each of its shards.
        overlaps = ([key, (key[0], None)] if key[1] is not None
                    else [key] + [(key[0], i) for i in range(len(sizes or []))])
        clash = next((seen[k] for k in overlaps if k in seen), None)
        if tuple(tensor.shape) != tuple(dst.shape):
            errors.append(f"{name!r}: shape {tuple(tensor.shape)}, the model expects {tuple(dst.shape)}")
        elif not tensor.dtype.is_floating_point:
            errors.append(f"{name!r}: dtype {tensor.dtype} is not a floating-point type")
        elif tensor.dtype.itemsize == 1:
            errors.append(f"{name!r}: dtype {tensor.dtype} carries no scale here; send bf16 or fp32 weights "
                          "(an fp8 engine quantizes what it receives)")
        elif clash is not None:
            errors.append(f"{name!r}: written twice in one update (also as {clash!r})")
        else:
            seen[key] = name
            plan.append(WeightCopy(key, name, dst, tensor))
    if errors:
        shown = "; ".join(errors[:8]) + (f"; and {len(errors) - 8} more" if len(errors) > 8 else "")
        raise ValueError(f"refused weight update ({len(errors)} bad tensor(s), nothing was copied): {shown}")
    return plan


def _destination(param: torch.Tensor, quantized: Fp8Linear | None, sizes: list[int] | None, shard: int | None,
                 device: torch.device) -> Destination:
    """The view of `param` (or of its fp8 rows and scales) one named tensor writes."""
    if quantized is None:
        return param.data if shard is None else param.data.split(sizes, dim=0)[shard]
    qweight, scale = param.data, quantized.weight_scale.data
    if shard is not None:
        qweight, scale = qweight.split(sizes, dim=0)[shard], scale.split(sizes, dim=0)[shard]
    same = device == qweight.device or device.type == "meta"  # meta: paused weights, nothing is written now
    return Fp8Slice(qweight, scale, quantized.dtype, None if same else device)


@torch.no_grad()
def write_weights(destinations: list[Destination], sources: list[torch.Tensor], *,
                  non_blocking: bool = False) -> None:
    """The one write path: plain views are copied (cast on the fly), fp8 slices quantized on their device."""
    plain = [(d, s) for d, s in zip(destinations, sources) if isinstance(d, torch.Tensor)]
    if plain:
        # One multi-tensor launch for dozens of copies; across devices it falls back to one copy each.
        torch._foreach_copy_([d for d, _ in plain], [s for _, s in plain], non_blocking=non_blocking)
    for dst, src in zip(destinations, sources):
        if isinstance(dst, Fp8Slice):
            dst.write(src, non_blocking=non_blocking)


def finite_probe(dst: Destination) -> torch.Tensor:
    """What holds NaN or infinity after a write exactly when the written source did."""
    return dst.finite_probe if isinstance(dst, Fp8Slice) else dst


def apply_weights(plan: list[WeightCopy]) -> set[WeightKey]:
    """Write a validated plan in place (cast or quantized on the fly); returns the keys written."""
    write_weights([c.dst for c in plan], [c.src for c in plan], non_blocking=True)
    return {copy.key for copy in plan}


def load_weights(model: CausalLM, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[WeightKey]:
    """Validate, then copy named tensors (HF or our fused names) into the model in place."""
    return apply_weights(plan_weights(model, named_tensors))


def all_weight_keys(model: CausalLM) -> set[WeightKey]:
    """Every key a complete set of weights writes (fused parameters count per shard; scales come with weights)."""
    keys: set[WeightKey] = set()
    for name in update_names(model):
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


def update_names(model: CausalLM) -> list[str]:
    """Our names of the parameters an update writes, in parameter order: all but the quantization scales."""
    scales = _scale_names(model)
    return [name for name, _ in model.named_parameters() if name not in scales]


def _scale_names(model: CausalLM) -> set[str]:
    return {name.removesuffix("weight") + "weight_scale" for name, _ in fp8_linears(model)}


def key_to_hf_name(model: CausalLM, key: WeightKey) -> str:
    name, shard = key
    if shard is None:
        return name
    hf = {".qkv_proj.": ("q_proj", "k_proj", "v_proj"), ".gate_up_proj.": ("gate_proj", "up_proj")}
    for fused, parts in hf.items():
        if fused in name:
            return name.replace(fused, f".{parts[shard]}.")
    return name


def build_meta_model(config: ModelConfig, *, dtype: torch.dtype, max_positions: int | None = None,
                     quantization: str | None = None, fp8_gemm: Fp8Gemm = "dequantize") -> CausalLM:
    """The model on meta in `dtype` (rotary tables stay float32): no memory yet, shapes only.

    `quantization="fp8"`: the decoder layers' linears become `Fp8Linear`s (fp8 weights and float32
    scales as parameters), so a flat buffer of this model is fp8-sized.
    """
    if quantization not in (None, "fp8"):
        raise ValueError(f"quantization={quantization!r} must be None or 'fp8'")
    with torch.device("meta"):
        model = CausalLM(config, max_positions=max_positions)
    model.to(dtype=dtype)  # before quantizing: Module.to would cast the fp8 weights and scales too
    model.model.rotary_emb.float()
    if quantization == "fp8":
        quantize_linears(model, gemm=fp8_gemm)
    return model.eval().requires_grad_(False)


def build_model(config: ModelConfig, *, device: str | torch.device, dtype: torch.dtype,
                max_positions: int | None = None, quantization: str | None = None) -> CausalLM:
    """Build on meta, materialise with `to_empty` on `device` (contents uninitialised), buffers set."""
    model = build_meta_model(config, dtype=dtype, max_positions=max_positions, quantization=quantization)
    model.to_empty(device=device)
    model.reset_buffers()
    return model


def load_checkpoint(model: CausalLM, path: str | Path, *, skip: Collection[str] = ()) -> None:
    """Fill every parameter of `model` from a checkpoint folder, one shard at a time; raise naming any missing.

    `skip`: HF names in the checkpoint that are not the decoder's (a reward model's `score.weight`).
    """
    written: set[WeightKey] = set()
    for file in checkpoint_files(path):
        tensors = read_safetensors(file)
        # Checkpoints with tied embeddings may still carry lm_head.weight, equal to the embedding.
        if model.config.tie_word_embeddings and "model.embed_tokens.weight" in tensors:
            tensors.pop("lm_head.weight", None)
        for name in skip:
            tensors.pop(name, None)
        written |= load_weights(model, tensors.items())
    missing = all_weight_keys(model) - covered_keys(model, written)
    if missing:
        names = sorted(key_to_hf_name(model, k) for k in missing)
        raise ValueError(f"checkpoint {str(path)!r} lacks {len(names)} tensor(s): {names[:8]}")


@torch.no_grad()
def init_random_weights(model: CausalLM, *, seed: int = 0, std: float = 0.02) -> None:
    """Random initialisation like transformers': normal(0, std) matrices, ones for norms, zeros for biases.

    Values are drawn in float32 and written through the loader, one tensor at a time, so they do not
    depend on the parameter dtype and an fp8 model holds the quantized weights of the same draw.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    params = dict(model.named_parameters())
    for name in update_names(model):
        shape = params[name].shape
        if name.endswith("norm.weight"):
            value = torch.ones(shape, device=device)
        elif name.endswith(".bias"):
            value = torch.zeros(shape, device=device)
        else:
            value = torch.empty(shape, device=device).normal_(0.0, std, generator=gen)
        load_weights(model, [(name, value)])
