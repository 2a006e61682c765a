"""fp8 engine on CPU (dequantize GEMM): quantization, loading, bit-exact quantize-on-receive updates, sleep/wake."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from colocate import Engine, EngineConfig, SamplingParams
from colocate.memory.flat import FlatParameters
from colocate.model import build_meta_model, build_model, init_random_weights, preset_config, save_preset
from colocate.model.quant import FP8_DTYPE, FP8_MAX, Fp8Linear, Fp8Slice, quantize_into, quantize_rows
from colocate.weight_sync import BucketImporter, BucketSender
from tests.local_transport import LocalTransport

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5)
PROMPTS = ["Hello world", [5, 6, 7, 8], "fp8 sleeps"]
ALL = ("kv_cache", "weights", "cuda_graph")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: torch.equal has no fp8 kernel on CPU, and bytes compare NaN exactly."""
    return t.detach().contiguous().view(torch.uint8)


def same_bits(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of the parameters whose bytes differ between two models of one layout."""
    pb = dict(b.named_parameters())
    return [n for n, p in a.named_parameters() if not torch.equal(bits(p), bits(pb[n]))]


def outputs(engine: Engine) -> list[tuple[list[int], list[float]]]:
    """Greedy and seeded-sampled tokens with their logprobs: equal only if the forward passes are."""
    return [(o.token_ids, o.logprobs) for params in (GREEDY, SAMPLED) for o in engine.generate(PROMPTS, params)]


def fp8_engine(model: str | Path, **kwargs: Any) -> Engine:
    return Engine(EngineConfig(**{"model": str(model), "device": "cpu", "dtype": "bfloat16", "max_model_len": 64,
                                  "kv_cache_bytes": 8 << 20, "quantization": "fp8", **kwargs}))


@pytest.fixture(scope="module")
def bf16_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny preset saved in bfloat16: A (seed 0) and B (seed 1)."""
    return (save_preset("tiny", tmp_path_factory.mktemp("fp8-a"), seed=0, dtype=torch.bfloat16),
            save_preset("tiny", tmp_path_factory.mktemp("fp8-b"), seed=1, dtype=torch.bfloat16))


@pytest.fixture(scope="module")
def reference(bf16_checkpoints: tuple[Path, Path]) -> Iterator[tuple[Engine, list]]:
    """A fresh fp8 engine loading checkpoint A from disk, and its outputs."""
    engine = fp8_engine(bf16_checkpoints[0])
    yield engine, outputs(engine)
    engine.shutdown()


def trainer_tensors(seed: int, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """A 'trainer' of the tiny preset in `dtype`: the weights checkpoint A holds when seed is 0."""
    model = build_model(preset_config("tiny"), device="cpu", dtype=dtype, max_positions=1)
    init_random_weights(model, seed=seed)
    return list(model.hf_named_tensors())


# -- quantization -----------------------------------------------------------------------------
def test_quantize_rows_scales_per_output_channel_within_fp8_precision() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=gen) * torch.logspace(-4, 2, 32)[:, None]  # rows six decades apart
    w[5] = 0.0
    q, scale = quantize_rows(w, round_to=torch.float32)
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (32,)
    amax = w.abs().amax(dim=1)
    live = amax > 0
    assert torch.equal(scale[live], amax[live] / FP8_MAX)
    assert scale[5] == 1.0 and not q[5].float().any()
    # Each row's largest magnitude lands on the top of the fp8 range.
    assert torch.equal(q.float().abs().amax(dim=1)[live], torch.full((31,), FP8_MAX))
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, and subnormals (below 2^-6) are 2^-9 apart.
    error = (q.float() * scale[:, None] - w).abs()
    bound = torch.maximum(w.abs() * 2.0 ** -4, scale[:, None] * 2.0 ** -10)
    assert bool((error <= bound * (1 + 1e-6)).all()), float((error / bound).max())


def test_quantize_into_is_the_same_bits_for_any_chunking_sharding_and_source_dtype() -> None:
    gen = torch.Generator().manual_seed(1)
    w32 = torch.randn(40, 32, generator=gen)
    w16 = w32.to(torch.bfloat16)

    def written() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty(40, 32, dtype=FP8_DTYPE), torch.empty(40)

    whole = written()
    quantize_into(*whole, w16, round_to=torch.bfloat16)
    chunked = written()
    quantize_into(*chunked, w16, round_to=torch.bfloat16, max_chunk_elements=3 * 32)  # 3 rows a chunk
    sharded = written()
    for rows, q, s in zip(w16.split([16, 8, 16]), sharded[0].split([16, 8, 16]), sharded[1].split([16, 8, 16])):
        Fp8Slice(q, s, torch.bfloat16).write(rows)
    from_fp32 = written()  # a float32 trainer's tensor, rounded to the model dtype on the way in
    quantize_into(*from_fp32, w32, round_to=torch.bfloat16)
    for other in (chunked, sharded, from_fp32):
        assert torch.equal(bits(other[0]), bits(whole[0])) and torch.equal(other[1], whole[1])
    assert torch.equal(bits(whole[0]), bits(quantize_rows(w16, round_to=torch.bfloat16)[0]))


def test_rows_with_nan_or_infinity_get_non_finite_scales() -> None:
    w = torch.ones(4, 8)
    w[1, 3], w[2, 0] = float("nan"), float("inf")
    _, scale = quantize_rows(w, round_to=torch.float32)
    assert scale.isfinite().tolist() == [True, False, False, True]


def test_fp8_meta_build_puts_fp8_weights_and_scales_in_the_flat_buffer() -> None:
    config = preset_config("tiny")
    model = build_meta_model(config, dtype=torch.bfloat16, quantization="fp8")
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    linear_elems = h * (q + 2 * kv) + q * h + h * 2 * i + i * h  # qkv, o, gate_up, down
    out_channels = (q + 2 * kv) + h + 2 * i + h
    by_dtype = FlatParameters(model).bytes_by_dtype()
    assert by_dtype["float8_e4m3fn"] == config.num_hidden_layers * linear_elems
    assert by_dtype["float32"] == config.num_hidden_layers * out_channels * 4
    norms_and_biases = config.num_hidden_layers * (2 * h + q + 2 * kv) + h
    assert by_dtype["bfloat16"] == 2 * (config.vocab_size * h + norms_and_biases)  # tied: embedding once
    assert isinstance(model.model.layers[0].mlp.down_proj, Fp8Linear)
    assert model.lm_head.weight is model.model.embed_tokens.weight


# -- engine -----------------------------------------------------------------------------------
def test_fp8_engine_holds_the_quantized_bf16_model(reference: tuple[Engine, list],
                                                   bf16_checkpoints: tuple[Path, Path]) -> None:
    engine, _ = reference
    status = engine.memory_status()
    assert status["weight_bytes_by_dtype"]["float8_e4m3fn"] > 0
    assert status["device_bytes"]["weights"] == engine.memory.weights.nbytes
    bf16 = Engine(EngineConfig(model=str(bf16_checkpoints[0]), device="cpu", dtype="bfloat16", max_model_len=64,
                               kv_cache_bytes=8 << 20))
    preset = fp8_engine("tiny", seed=0)  # random init of the same draw, quantized as it is written
    try:
        assert engine.memory.weights.nbytes < 0.53 * bf16.memory.weights.nbytes  # fp8 is half of bf16, plus scales
        fp8_params = dict(engine.runner.model.named_parameters())
        for name, param in bf16.runner.model.named_parameters():
            if name in fp8_params and fp8_params[name].dtype == FP8_DTYPE:
                q, scale = quantize_rows(param, round_to=torch.bfloat16)
                assert torch.equal(bits(fp8_params[name]), bits(q)), name
                assert torch.equal(fp8_params[name.replace("weight", "weight_scale")], scale), name
            else:
                assert torch.equal(fp8_params[name], param), name
        assert same_bits(preset.runner.model, engine.runner.model) == []
        greedy = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
        assert all(len(t) == GREEDY.max_new_tokens for t in greedy)
    finally:
        bf16.shutdown()
        preset.shutdown()


def _update(engine: Engine, how: str, checkpoint: Path) -> dict[str, Any]:
    if how == "bf16 tensors":
        return engine.update_weights(trainer_tensors(0, torch.bfloat16), version=1)
    if how == "fp32 tensors":  # rounded to bf16 on the way in: the same fp8 bits as the bf16 checkpoint
        return engine.update_weights(trainer_tensors(0, torch.float32), version=1)
    if how == "disk":
        return engine.update_weights_from_disk(str(checkpoint), version=1)
    # Streamed buckets in the engine's compute dtype (bf16, never fp8), checked after each copy.
    sender = BucketSender(LocalTransport(BucketImporter(engine, device=engine.config.torch_device)),
                          device=torch.device("cpu"), dtype=engine.config.torch_dtype, bucket_bytes=256 << 10)
    return sender.send(trainer_tensors(0, torch.float32), version=1)


@pytest.mark.parametrize("how", ["bf16 tensors", "fp32 tensors", "disk", "buckets"])
def test_update_gives_the_bits_of_a_fresh_fp8_load(reference: tuple[Engine, list], bf16_checkpoints: tuple[Path, Path],
                                                   how: str) -> None:
    ref, ref_outputs = reference
    engine = fp8_engine(bf16_checkpoints[1])
    try:
        assert same_bits(engine.runner.model, ref.runner.model) != []
        assert _update(engine, how, bf16_checkpoints[0])["version"] == 1
        assert same_bits(engine.runner.model, ref.runner.model) == []
        assert outputs(engine) == ref_outputs
    finally:
        engine.shutdown()


def test_update_of_one_shard_requantizes_its_rows_only(bf16_checkpoints: tuple[Path, Path]) -> None:
    engine = fp8_engine(bf16_checkpoints[0])
    qkv = engine.runner.model.model.layers[1].self_attn.qkv_proj
    q_size = engine.model_config.q_size
    before_q, before_scale = qkv.weight.detach().clone(), qkv.weight_scale.detach().clone()
    new_q = torch.randn(q_size, qkv.in_features, dtype=torch.bfloat16)
    try:
        result = engine.update_weights([("model.layers.1.self_attn.q_proj.weight", new_q)], partial=True)
        assert "model.layers.1.self_attn.k_proj.weight" in result["kept"]
        expected_q, expected_scale = quantize_rows(new_q, round_to=torch.bfloat16)
        assert torch.equal(bits(qkv.weight[:q_size]), bits(expected_q))
        assert torch.equal(qkv.weight_scale[:q_size], expected_scale)
        assert torch.equal(bits(qkv.weight[q_size:]), bits(before_q[q_size:]))  # k and v rows untouched
        assert torch.equal(qkv.weight_scale[q_size:], before_scale[q_size:])
    finally:
        engine.shutdown()


@pytest.mark.parametrize("weights_to", ["cpu", "meta"])
def test_release_and_resume_keep_outputs(reference: tuple[Engine, list], bf16_checkpoints: tuple[Path, Path],
                                         weights_to: str) -> None:
    _, ref_outputs = reference
    engine = fp8_engine(bf16_checkpoints[0])
    try:
        assert outputs(engine) == ref_outputs
        report = engine.release_memory(ALL, weights_to=weights_to)
        nbytes = engine.memory.weights.nbytes  # fp8 + scales + the bf16 rest
        assert report.tags["weights"].device_bytes == nbytes
        assert report.tags["weights"].host_bytes == (nbytes if weights_to == "cpu" else 0)
        engine.resume_memory(("weights",))  # staged: weights first
        if weights_to == "meta":  # nothing valid until an update from the trainer's bf16 weights
            assert engine.memory_status()["num_missing_weights"] == len(engine.updater.unwritten) > 0
            engine.update_weights(trainer_tensors(0, torch.bfloat16), version=2)
        assert engine.memory_status()["num_missing_weights"] == 0
        engine.resume_memory(("kv_cache", "cuda_graph"))
        assert outputs(engine) == ref_outputs
    finally:
        engine.shutdown()


def _poisoned(named: list[tuple[str, torch.Tensor]], where: str, value: float) -> list[tuple[str, torch.Tensor]]:
    """A copy of `named` with one element of the first weight whose name contains `where` set to `value`."""
    out = [(n, t.clone()) for n, t in named]
    next(t for n, t in out if where in n)[3, 1] = value
    return out


def _bad_sets(named: list[tuple[str, torch.Tensor]]) -> dict[str, tuple[list, str]]:
    nan = _poisoned(named, "layers.2.mlp.up_proj.weight", float("nan"))
    fp8 = [(n, t.to(FP8_DTYPE) if ".mlp.down_proj." in n else t) for n, t in named]
    shape = [(n, t[:-1] if n.endswith("o_proj.weight") else t) for n, t in named]
    scale = named + [("model.layers.0.mlp.down_proj.weight_scale", torch.ones(256))]
    return {"nan": (nan, "NaN or infinity"), "fp8 source": (fp8, "carries no scale"),
            "shape": (shape, "shape"), "scale name": (scale, "quantization scale")}


def test_bad_updates_change_nothing(reference: tuple[Engine, list], bf16_checkpoints: tuple[Path, Path]) -> None:
    _, ref_outputs = reference
    engine = fp8_engine(bf16_checkpoints[0])
    try:
        before = [bits(p).clone() for p in engine.runner.model.parameters()]
        for case, (named, match) in _bad_sets(trainer_tensors(1, torch.bfloat16)).items():
            with pytest.raises(ValueError, match=match):
                engine.update_weights(named, version=9)
            assert all(torch.equal(bits(p), b) for b, p in zip(before, engine.runner.model.parameters())), case
        assert engine.weights_version != 9 and outputs(engine) == ref_outputs
    finally:
        engine.shutdown()


def test_streamed_nan_is_caught_in_the_scales_and_refused_until_a_good_update(
        bf16_checkpoints: tuple[Path, Path], reference: tuple[Engine, list]) -> None:
    _, ref_outputs = reference
    engine = fp8_engine(bf16_checkpoints[1])
    named = trainer_tensors(0, torch.bfloat16)
    # A quantized weight: after the copy only its scale shows the infinity (the fp8 value saturates).
    bad = _poisoned(named, "layers.1.self_attn.k_proj.weight", float("inf"))
    try:
        engine.begin_weight_update([(n, tuple(t.shape), t.dtype) for n, t in bad], version=3)
        with pytest.raises(ValueError, match="NaN or infinity"):
            engine.load_weight_bucket(bad)  # the streaming path: checked after the copy
        with pytest.raises(RuntimeError, match="hold no valid values"):
            engine.generate("x", GREEDY)
        engine.update_weights(named, version=4)
        assert outputs(engine) == ref_outputs
    finally:
        engine.shutdown()


# -- configuration and plumbing ----------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"quantization": "int8"}, "quantization='int8' must be"),
    ({"quantization": "fp8", "fp8_gemm": "cutlass"}, "fp8_gemm='cutlass' must be"),
    ({"quantization": "fp8", "fp8_gemm": "scaled_mm", "device": "cpu"}, "needs quantization='fp8', device='cuda'"),
    ({"fp8_gemm": "scaled_mm", "device": "cpu"}, "needs quantization='fp8'"),
])
def test_config_refuses(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_cli_takes_quantization(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from colocate import cli
    from colocate.server import serve

    cli.main(["generate", "--device", "cpu", "--quantization", "fp8", "--max-model-len", "64",
              "--max-new-tokens", "2", "--prompt", "hi"])
    assert '"token_ids"' in capsys.readouterr().out
    seen: list[EngineConfig] = []
    monkeypatch.setattr(serve, "serve", lambda engine_config, config: seen.append(engine_config))
    cli.main(["serve", "--device", "cpu", "--quantization", "fp8"])
    assert seen[0].quantization == "fp8" and seen[0].dtype == "float32"


def test_ppo_example_takes_quantization() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "ppo" / "train.py"
    spec = importlib.util.spec_from_file_location("ppo_train_example", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    config, _ = train.build_config(train.parse_args(["--quantization", "fp8"]))
    assert config.engine.quantization == "fp8"
    assert train.build_config(train.parse_args([]))[0].engine.quantization is None
