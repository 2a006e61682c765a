"""Shared fixtures: small random checkpoints of each family, written by transformers itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

VOCAB = 300
LENGTHS = (64, 37)  # two sequences, the second padded on the right up to 64
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
# Llama-3 scaling with a 32-token original context: positions up to 64 go past it, and the
# low-frequency bands (wavelength > 32) are rescaled at every position.
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# family -> transformers config kwargs beyond _COMMON
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(rope_parameters=_LLAMA3, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True),  # qkv bias
    "qwen3": dict(head_dim=24, tie_word_embeddings=False),  # q/k RMSNorm; 4 * 24 != 64
    "mistral": dict(sliding_window=None, tie_word_embeddings=False),  # GQA 4:2
}
EXPECTED_BIAS = {"llama": False, "qwen2": True, "qwen3": False, "mistral": False}


@pytest.fixture(scope="session")
def transformers() -> Any:
    return pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def hf_checkpoints(transformers: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    """family -> (a random transformers model in float32, its save_pretrained folder)."""
    out = {}
    for i, (family, extra) in enumerate(FAMILIES.items()):
        hf_config = transformers.AutoConfig.for_model(family, **_COMMON, **extra)
        torch.manual_seed(i)
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
        # transformers starts norms at one and biases at zero; random values make a swapped
        # q_norm/k_norm or a dropped bias visible in the logits.
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in hf_model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
                elif name.endswith(".bias"):
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        folder = tmp_path_factory.mktemp(f"hf-{family}")
        hf_model.save_pretrained(folder)
        out[family] = (hf_model, folder)
    return out


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny preset saved twice as HF checkpoint folders: A (seed 0) and B (seed 1)."""
    from colocate.model import save_preset

    return (save_preset("tiny", tmp_path_factory.mktemp("tiny-a"), seed=0),
            save_preset("tiny", tmp_path_factory.mktemp("tiny-b"), seed=1))
