"""weights_offload on CPU: streamed layers give the resident engine's exact outputs, through sleep/wake and
updates; their parameters are ordinary host parameters; bad settings are refused; shutdown frees them."""

from __future__ import annotations

import io

import pytest
import torch

from colocate import Engine, EngineConfig, SamplingParams
from colocate.memory.layer_stream import LayerStreamer, spread_layers
from colocate.model import load_model

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)
PROMPTS = ["Hello world", [5, 6, 7, 8, 9, 10], "streamed layers"]


def make_engine(**kwargs) -> Engine:
    return Engine(EngineConfig(**{"model": "tiny", "device": "cpu", "max_model_len": 128, **kwargs}))


def outputs(engine: Engine, params: SamplingParams = GREEDY) -> list[tuple[list[int], list[float]]]:
    return [(o.token_ids, o.logprobs) for o in engine.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def resident() -> dict[str, list]:
    engine = make_engine()
    try:
        return {"greedy": outputs(engine), "sampled": outputs(engine, SAMPLED)}
    finally:
        engine.shutdown()


def test_spread_layers_spaces_the_streamed_layers_out() -> None:
    assert spread_layers(24, 0.25) == [3, 6, 10, 13, 17, 20]
    assert spread_layers(24, 0.5)[:4] == [1, 3, 5, 7] and len(spread_layers(24, 0.5)) == 12
    assert spread_layers(4, 1.0) == [0, 1, 2, 3]
    assert spread_layers(28, 0.0) == []
    for n in range(1, 40):
        for k in range(n + 1):
            layers = spread_layers(n, k / n)
            assert len(layers) == len(set(layers)) == k and all(0 <= i < n for i in layers)


@pytest.mark.parametrize(("offload", "prefetch"), [(0.5, 2), (1.0, 2), (1.0, 1), (0.75, 3)])
def test_streamed_layers_give_the_resident_outputs_bitwise(resident: dict, offload: float, prefetch: int) -> None:
    engine = make_engine(weights_offload=offload, weights_prefetch=prefetch)
    try:
        assert outputs(engine) == resident["greedy"]  # token ids and logprobs, exactly
        assert outputs(engine, SAMPLED) == resident["sampled"]
    finally:
        engine.shutdown()


def test_offloaded_parameters_are_ordinary_host_parameters() -> None:
    engine = make_engine(weights_offload=0.5)
    try:
        model, streamer = engine.runner.model, engine.runner.streamer
        layers = model.model.layers
        assert streamer.indices == spread_layers(len(layers), 0.5)
        for i, layer in enumerate(layers):
            devices = {p.device.type for p in layer.parameters()}
            assert devices == ({"cpu"} if i in streamer.indices else {engine.runner.device.type})
            if i in streamer.indices:  # the module's own parameters are views of the layer's host buffer
                ptr = streamer.flats[streamer.position[i]].buffer.data_ptr()
                assert all(p.data_ptr() >= ptr for p in layer.parameters())
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)  # readable and savable like any module
        saved = torch.load(io.BytesIO(buffer.getvalue()))
        for i in streamer.indices:
            name = f"model.layers.{i}.self_attn.qkv_proj.weight"
            assert saved[name].device.type == "cpu" and torch.equal(saved[name], model.get_parameter(name))
        status = engine.memory_status()
        host = sum(f.nbytes for f in streamer.flats)
        assert status["host_bytes"]["weights_offloaded"] == host > 0
        assert status["device_bytes"]["weights_staging"] == streamer.depth * streamer.slot_bytes
        assert status["device_bytes"]["weights"] == engine.runner.weights.nbytes
        resident_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                             if not any(n.startswith(f"model.layers.{i}.") for i in streamer.indices))
        assert engine.runner.weights.nbytes >= resident_bytes  # the flat buffer holds only the resident part
        assert engine.runner.weights.nbytes < resident_bytes + 256 * len(list(model.parameters()))
    finally:
        engine.shutdown()
    assert streamer.host_bytes == 0 and streamer.staging is None  # shutdown gave the host memory back


@pytest.mark.parametrize("weights_to", ["cpu", "meta"])
def test_sleep_wake_and_update_keep_outputs(resident: dict, weights_to: str) -> None:
    engine = make_engine(weights_offload=0.5)
    source = make_engine()
    try:
        host_before = engine.memory_status()["host_bytes"]["weights_offloaded"]
        report = engine.release_memory(weights_to=weights_to)
        staging = engine.runner.streamer.slot_bytes * engine.runner.streamer.depth
        assert report.tags["weights"].device_bytes == engine.runner.weights.nbytes + staging
        assert engine.memory_status()["host_bytes"]["weights_offloaded"] == host_before  # stays on the host
        engine.resume_memory()
        if weights_to == "meta":
            with pytest.raises(Exception, match="update"):
                engine.generate(PROMPTS, GREEDY)
        engine.update_weights(source.runner.model.hf_named_tensors(), version=1)
        assert outputs(engine) == resident["greedy"]
        assert outputs(engine, SAMPLED) == resident["sampled"]
    finally:
        engine.shutdown()
        source.shutdown()


def test_update_writes_streamed_layers_in_host_memory() -> None:
    engine, other = make_engine(weights_offload=0.5), make_engine(seed=7)
    reference = make_engine(seed=7)
    try:
        streamer = engine.runner.streamer
        pointers = [f.buffer.data_ptr() for f in streamer.flats]
        engine.update_weights(other.runner.model.hf_named_tensors(), version=2)
        assert [f.buffer.data_ptr() for f in streamer.flats] == pointers  # written in place
        layer = engine.runner.model.model.layers[streamer.indices[0]]
        want = other.runner.model.model.layers[streamer.indices[0]]
        assert torch.equal(layer.mlp.down_proj.weight, want.mlp.down_proj.weight)
        assert layer.mlp.down_proj.weight.device.type == "cpu"
        assert outputs(engine) == outputs(reference)
    finally:
        for e in (engine, other, reference):
            e.shutdown()


def test_fp8_streams_the_quantized_weights(resident: dict) -> None:
    plain, streamed = make_engine(quantization="fp8"), make_engine(quantization="fp8", weights_offload=0.5)
    try:
        assert outputs(streamed) == outputs(plain)
        layer = streamed.runner.model.model.layers[streamed.runner.streamer.indices[0]]
        assert layer.mlp.down_proj.weight.dtype == torch.float8_e4m3fn
        assert layer.mlp.down_proj.weight.device.type == "cpu"
    finally:
        plain.shutdown()
        streamed.shutdown()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"weights_offload": 1.5}, "weights_offload=1.5 must be a fraction"),
    ({"weights_offload": -0.1}, "weights_offload=-0.1 must be a fraction"),
    ({"weights_offload": True}, "weights_offload=True must be a fraction"),
    ({"weights_offload": "half"}, "weights_offload='half' must be a fraction"),
    ({"weights_offload": float("nan")}, "must be a fraction"),
    ({"weights_prefetch": 0}, "weights_prefetch=0 must be an integer >= 1"),
    ({"weights_prefetch": 1.5}, "weights_prefetch=1.5 must be an integer >= 1"),
])
def test_bad_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EngineConfig(model="tiny", device="cpu", **kwargs)


def test_streamer_refuses_bad_layer_lists() -> None:
    model = load_model("tiny", device="cpu", dtype=torch.float32)[0]
    layers = model.model.layers
    for bad in ([], [0, 0], [len(layers)], [-1]):
        with pytest.raises(ValueError, match="must be distinct indices"):
            LayerStreamer(layers, bad, torch.device("cpu"))


def test_a_failing_layer_leaves_the_host_parameters_in_place() -> None:
    engine = make_engine(weights_offload=1.0)
    try:
        streamer = engine.runner.streamer
        host = [p.data_ptr() for p in engine.runner.model.model.layers[0].parameters()]
        gen = streamer.run(engine.runner.model.model.layers)
        layer = next(gen)
        assert layer.mlp.down_proj.weight.data_ptr() != host[-1]  # staged while it runs
        gen.close()  # what an exception inside the layer does to the loop
        assert [p.data_ptr() for p in layer.parameters()] == host
    finally:
        engine.shutdown()
