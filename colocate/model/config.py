"""ModelConfig: the decoder shape, read from and written to an HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# model_type -> (HF architecture class name, qkv bias default, q/k RMSNorm)
ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {
    "llama": ("LlamaForCausalLM", False, False),
    "qwen2": ("Qwen2ForCausalLM", True, False),
    "qwen3": ("Qwen3ForCausalLM", False, True),
    "mistral": ("MistralForCausalLM", False, False),
}
_ARCH_TO_TYPE = {cls: model_type for model_type, (cls, _, _) in ARCHITECTURES.items()}
ROPE_TYPES = ("default", "llama3")


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of a Llama-family decoder.

    >>> cfg = ModelConfig(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
    ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> cfg.head_dim
    16
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", "factor": ..., ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None  # None: the family's default (qwen2: True)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; colocate supports {sorted(ARCHITECTURES)} "
                "(Llama, Qwen2, Qwen3 and Mistral families)"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                                 f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.attention_bias is None:
            self.attention_bias = ARCHITECTURES[self.model_type][1]
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"unsupported rope scaling {rope_type!r}; supported: {ROPE_TYPES}")
            if rope_type == "default":
                self.rope_scaling = None
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]

    @property
    def qk_norm(self) -> bool:
        return ARCHITECTURES[self.model_type][2]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_parameters(self) -> int:
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            attn += 2 * self.head_dim
        layer = attn + 3 * self.hidden_size * self.intermediate_size + 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size
        return self.num_hidden_layers * layer + embed * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type")
        if model_type is None:
            archs = d.get("architectures") or []
            model_type = next((_ARCH_TO_TYPE[a] for a in archs if a in _ARCH_TO_TYPE), None)
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture (model_type={d.get('model_type')!r}, "
                f"architectures={d.get('architectures')!r}); colocate supports {sorted(ARCHITECTURES)}"
            )
        # transformers >= 5 writes rope_parameters; older versions rope_theta + rope_scaling.
        rope = dict(d.get("rope_parameters") or {})
        rope_theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = rope if rope.get("rope_type", "default") != "default" else d.get("rope_scaling")
        sliding = d.get("sliding_window")
        if model_type == "qwen2" or model_type == "qwen3":
            sliding = sliding if d.get("use_sliding_window") else None
        eos = d.get("eos_token_id")
        kwargs = dict(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=sliding,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"),
        )
        if "attention_bias" in d and model_type != "qwen2":
            kwargs["attention_bias"] = bool(d["attention_bias"])
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d['hidden_act']!r}; colocate implements 'silu'")
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ValueError(f"no config.json in {str(path)!r}: pass an HF checkpoint folder or a preset name")
        return cls.from_hf_dict(json.loads(file.read_text()))

    def to_hf_dict(self) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(self.rope_scaling)
        d: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type][0]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "sliding_window": self.sliding_window,
            "use_sliding_window": self.sliding_window is not None,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else (self.eos_token_id or None),
            "torch_dtype": self.torch_dtype,
            "initializer_range": 0.02,
        }
        return d

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

