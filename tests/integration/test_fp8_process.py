"""An fp8 engine in a child process: buckets travel in the compute dtype and are quantized on receive."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from colocate import Engine, EngineConfig, SamplingParams, launch_engine
from colocate.model import build_model, init_random_weights, preset_config, save_preset

PROMPTS = ["Hello world", [5, 6, 7, 8], "fp8"]
PARAMS = [SamplingParams(max_new_tokens=8, temperature=0.0), SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)]


def fp8_config(model: Path) -> EngineConfig:
    return EngineConfig(model=str(model), device="cpu", dtype="bfloat16", max_model_len=64, kv_cache_bytes=8 << 20,
                        quantization="fp8")


def tokens(engine: object) -> list[list[int]]:
    return [o.token_ids for params in PARAMS for o in engine.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def bf16_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return (save_preset("tiny", tmp_path_factory.mktemp("fp8p-a"), seed=0, dtype=torch.bfloat16),
            save_preset("tiny", tmp_path_factory.mktemp("fp8p-b"), seed=1, dtype=torch.bfloat16))


def test_fp32_trainer_update_of_an_fp8_engine_process(bf16_checkpoints: tuple[Path, Path]) -> None:
    fresh = Engine(fp8_config(bf16_checkpoints[0]))
    expected = tokens(fresh)
    fresh.shutdown()
    trainer = build_model(preset_config("tiny"), device="cpu", dtype=torch.float32, max_positions=1)
    init_random_weights(trainer, seed=0)  # checkpoint A's weights before their rounding to bf16
    with launch_engine(fp8_config(bf16_checkpoints[1])) as engine:
        # The sender casts to the engine's compute dtype, never to fp8: the engine quantizes what it receives.
        assert engine._sender.dtype == torch.bfloat16
        status = engine.memory_status()
        assert status["weight_bytes_by_dtype"]["float8_e4m3fn"] > status["weight_bytes_by_dtype"]["bfloat16"]
        assert tokens(engine) != expected
        result = engine.update_weights(trainer.hf_named_tensors(), version=2, bucket_bytes=512 << 10)
        assert result["num_buckets"] > 3 and result["version"] == 2
        assert tokens(engine) == expected
        engine.release_memory(weights_to="cpu")
        engine.resume_memory()
        assert tokens(engine) == expected
