"""Built-in model shapes, random-initialised, and saving them as real HF checkpoint folders."""

from __future__ import annotations

from pathlib import Path

import torch

from colocate.model.checkpoint import save_checkpoint
from colocate.model.config import ModelConfig
from colocate.model.loader import build_model, init_random_weights
from colocate.model.tokenizer import BYTE_BOS, BYTE_EOS, byte_chat_template, byte_tokenizer_json

_QWEN25 = dict(model_type="qwen2", rope_theta=1_000_000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
               bos_token_id=BYTE_BOS, eos_token_id=[BYTE_EOS])

PRESETS: dict[str, ModelConfig] = {
    # A few million parameters: CI, laptops, the PPO example on CPU.
    "tiny": ModelConfig(model_type="qwen2", vocab_size=320, hidden_size=256, intermediate_size=768,
                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                        rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=True,
                        bos_token_id=BYTE_BOS, eos_token_id=[BYTE_EOS], torch_dtype="float32"),
    # About 104M parameters with the byte vocabulary: big enough to learn arithmetic from a short
    # warm start on one GPU, small enough for a whole warm start + RL run in minutes.
    "byte-100m": ModelConfig(model_type="qwen2", vocab_size=320, hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                             rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=True,
                             bos_token_id=BYTE_BOS, eos_token_id=[BYTE_EOS], torch_dtype="bfloat16"),
    # Shapes of public checkpoints, for benchmarks (random weights, byte tokenizer).
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, **_QWEN25),
    "qwen2.5-1.5b": ModelConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, **_QWEN25),
    "qwen2.5-7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                              num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, **_QWEN25),
    "llama-3-8b": ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                              rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                              bos_token_id=BYTE_BOS, eos_token_id=[BYTE_EOS]),
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or pass a checkpoint folder")
    return PRESETS[name].replace()


def save_preset(name: str, path: str | Path, *, seed: int = 0, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu", max_shard_bytes: int | None = None) -> Path:
    """Random-initialise a preset and save it as an HF checkpoint folder (with tokenizer.json).

    >>> save_preset("tiny", "/tmp/tiny")  # then EngineConfig(model="/tmp/tiny")
    """
    config = preset_config(name)
    dtype = dtype or getattr(torch, config.torch_dtype)
    config = config.replace(torch_dtype=str(dtype).removeprefix("torch."))
    model = build_model(config, device=device, dtype=dtype, max_positions=1)
    init_random_weights(model, seed=seed)
    chat = byte_chat_template()
    return save_checkpoint(path, config, model.hf_named_tensors(), tokenizer_json=byte_tokenizer_json(),
                           tokenizer_config={"chat_template": chat.template, **chat.special_tokens},
                           max_shard_bytes=max_shard_bytes)
