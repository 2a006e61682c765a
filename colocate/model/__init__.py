"""Llama-family decoders from HF checkpoints or built-in presets; weights loaded by HF name."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import torch

from colocate.model.attention import AttentionBackend, DenseCausalAttention
from colocate.model.checkpoint import iter_checkpoint, save_checkpoint
from colocate.model.config import ModelConfig
from colocate.model.decoder import CausalLM
from colocate.model.loader import build_meta_model, build_model, init_random_weights, load_checkpoint, load_weights
from colocate.model.presets import PRESETS, preset_config, save_preset
from colocate.model.probe import LogprobProbe, make_probe, probe_token_ids, sequence_logprobs
from colocate.model.quant import Fp8Gemm
from colocate.model.tokenizer import (ByteTokenizer, ChatTemplateSource, Tokenizer, byte_chat_template,
                                      load_chat_template, load_tokenizer)

__all__ = [
    "AttentionBackend", "ByteTokenizer", "CausalLM", "ChatTemplateSource", "DenseCausalAttention", "LogprobProbe",
    "ModelConfig", "PRESETS", "Tokenizer", "build_meta_model", "build_model", "init_random_weights", "iter_checkpoint",
    "load_checkpoint", "load_model", "load_weights", "make_probe", "preset_config", "probe_token_ids",
    "resolve_chat_template", "resolve_config", "save_checkpoint", "save_preset", "sequence_logprobs",
]


def resolve_config(model: str) -> tuple[ModelConfig, Tokenizer | None]:
    """A preset name or a checkpoint folder -> its config and tokenizer (None if it has none)."""
    if model in PRESETS:
        return preset_config(model), ByteTokenizer()
    path = Path(model)
    if not path.exists():
        raise ValueError(f"model {model!r} is neither a preset ({sorted(PRESETS)}) nor an existing folder")
    return ModelConfig.from_pretrained(path), load_tokenizer(path)


def resolve_chat_template(model: str) -> ChatTemplateSource | None:
    """A preset's chat template (plain "role: content" lines) or a checkpoint folder's; None if it has none."""
    if model in PRESETS:
        return byte_chat_template()
    return load_chat_template(model)


def load_model(model: str, *, device: str | torch.device, dtype: torch.dtype, max_positions: int | None = None,
               seed: int = 0, materialize: Callable[[CausalLM], None] | None = None,
               quantization: str | None = None, fp8_gemm: Fp8Gemm = "dequantize",
               skip_tensors: Collection[str] = (),
               ) -> tuple[CausalLM, Tokenizer | None]:
    """Build a model on `device`: a preset gets random weights from `seed`, a folder its checkpoint.

    `materialize(meta_model)` replaces the default `to_empty(device=device)`, e.g. to place
    every parameter in one flat buffer; it must leave parameters and buffers on `device`.
    `quantization="fp8"`: the decoder's linears hold fp8 weights and scales from the meta build on; the
    checkpoint's tensors stay in host memory and are quantized on `device` as each one is written, so
    the device never holds more than the fp8 model and one chunk of one tensor in `dtype`.
    `skip_tensors`: checkpoint names that are not the decoder's, ignored (`load_checkpoint`).
    """
    config, tokenizer = resolve_config(model)
    module = build_meta_model(config, dtype=dtype, max_positions=max_positions, quantization=quantization,
                              fp8_gemm=fp8_gemm)
    if materialize is None:
        module.to_empty(device=device)
    else:
        materialize(module)
    module.reset_buffers()
    if model in PRESETS:
        init_random_weights(module, seed=seed)
    else:
        load_checkpoint(module, model, skip=skip_tensors)
    return module, tokenizer
