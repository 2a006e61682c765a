"""colocate.model against transformers: logits, configs, checkpoints both ways, weight loading, tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from colocate.model import (
    ByteTokenizer,
    CausalLM,
    DenseCausalAttention,
    ModelConfig,
    build_meta_model,
    build_model,
    init_random_weights,
    load_model,
    load_weights,
    save_checkpoint,
    save_preset,
)
from colocate.model.tokenizer import BYTE_EOS, HFTokenizer, byte_tokenizer_json, load_tokenizer

from tests.conftest import _LLAMA3, EXPECTED_BIAS, FAMILIES, LENGTHS, VOCAB


# -- helpers -------------------------------------------------------------------------------------

def make_batch(vocab_size: int = VOCAB, lengths: tuple[int, ...] = LENGTHS) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    seq_len = max(lengths)
    ids = torch.randint(0, vocab_size, (len(lengths), seq_len), generator=gen)
    mask = torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]  # [B, T], right padding
    return ids.masked_fill(~mask, 0), mask


@torch.no_grad()
def our_logits(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    b, t = ids.shape
    positions = torch.arange(t).expand(b, t)
    attn = DenseCausalAttention(batch_size=b, seq_len=t, attention_mask=mask)
    hidden = model(ids.flatten(), positions.flatten(), attn)
    return model.compute_logits(hidden).view(b, t, -1)


@torch.no_grad()
def hf_logits(hf_model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hf_model(input_ids=ids, attention_mask=mask.long()).logits


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, *, min_std: float = 0.5) -> None:
    assert ref[mask].std() > min_std, "reference logits are near-flat; the comparison would prove little"
    torch.testing.assert_close(ours[mask], ref[mask], atol=1e-4, rtol=1e-4)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_params_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    assert params.keys() == expected.keys()
    for name, p in params.items():
        assert torch.equal(p, expected[name]), f"{name} changed"


def safetensors_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


def small_config(**changes: Any) -> ModelConfig:
    base = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return ModelConfig(**{**base, **changes})


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # ~3M float32 parameters in 3 MB shards: several files and an index.
    return save_preset("tiny", tmp_path_factory.mktemp("tiny"), seed=0, max_shard_bytes=3_000_000)


# -- 1. logits and configs against transformers --------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family: str, hf_checkpoints: dict[str, tuple[Any, Path]]) -> None:
    hf_model, folder = hf_checkpoints[family]
    model, tokenizer = load_model(str(folder), device="cpu", dtype=torch.float32)
    assert tokenizer is None  # save_pretrained of a bare model writes no tokenizer.json
    ids, mask = make_batch()
    assert_logits_close(our_logits(model, ids, mask), hf_logits(hf_model, ids, mask), mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_matches_transformers(family: str, hf_checkpoints: dict[str, tuple[Any, Path]]) -> None:
    hf_model, folder = hf_checkpoints[family]
    hf_config = hf_model.config
    config = ModelConfig.from_pretrained(folder)
    assert config.model_type == family
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                  "bos_token_id"):
        assert getattr(config, field) == getattr(hf_config, field), field
    assert config.head_dim == hf_model.model.layers[0].self_attn.head_dim
    assert config.head_dim == (24 if family == "qwen3" else 16)
    assert config.rope_theta == hf_config.rope_parameters["rope_theta"]
    expected_scaling = {k: v for k, v in _LLAMA3.items() if k != "rope_theta"} if family == "llama" else None
    assert config.rope_scaling == expected_scaling
    assert config.attention_bias is EXPECTED_BIAS[family]
    assert (hf_model.model.layers[0].self_attn.q_proj.bias is not None) is EXPECTED_BIAS[family]
    assert config.qk_norm is (family == "qwen3")
    assert config.eos_token_id == ([] if hf_config.eos_token_id is None else [hf_config.eos_token_id])
    assert config.num_parameters() == sum(p.numel() for p in hf_model.parameters())
    # ...and through our own writer and reader.
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def test_llama3_rope_scaling_changes_logits(hf_checkpoints: dict[str, tuple[Any, Path]]) -> None:
    # Guards the llama test above: without the scaling the logits would not have matched.
    hf_model, folder = hf_checkpoints["llama"]
    model, _ = load_model(str(folder), device="cpu", dtype=torch.float32)
    unscaled = build_model(model.config.replace(rope_scaling=None), device="cpu", dtype=torch.float32)
    load_weights(unscaled, model.hf_named_tensors())
    ids, mask = make_batch()
    diff = (our_logits(unscaled, ids, mask) - hf_logits(hf_model, ids, mask))[mask].abs().max()
    assert diff > 1e-2


# -- 2. sharded checkpoints, both directions -----------------------------------------------------

def test_sharded_transformers_checkpoint_loads(hf_checkpoints: dict[str, tuple[Any, Path]],
                                               tmp_path: Path) -> None:
    hf_model, _ = hf_checkpoints["qwen3"]
    hf_model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) >= 3
    model, _ = load_model(str(tmp_path), device="cpu", dtype=torch.float32)
    ids, mask = make_batch()
    assert_logits_close(our_logits(model, ids, mask), hf_logits(hf_model, ids, mask), mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_checkpoint_loads_in_transformers(family: str, hf_checkpoints: dict[str, tuple[Any, Path]],
                                               transformers: Any, tmp_path: Path) -> None:
    hf_model, folder = hf_checkpoints[family]
    model, _ = load_model(str(folder), device="cpu", dtype=torch.float32)
    save_checkpoint(tmp_path, model.config, model.hf_named_tensors(), max_shard_bytes=50_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True)
    # transformers silently random-initialises what a checkpoint lacks: check it lacked nothing.
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(reloaded) is type(hf_model)
    ids, mask = make_batch()
    assert_logits_close(hf_logits(reloaded.eval(), ids, mask), hf_logits(hf_model, ids, mask), mask)


def test_save_preset_loads_in_transformers(tiny_folder: Path, transformers: Any) -> None:
    assert len(list(tiny_folder.glob("model-*-of-*.safetensors"))) >= 2
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model, tokenizer = load_model(str(tiny_folder), device="cpu", dtype=torch.float32)
    assert isinstance(tokenizer, HFTokenizer)
    ids, mask = make_batch(vocab_size=320, lengths=(16, 9))
    # Presets initialise with std 0.02, so their logits spread less than the test models'.
    assert_logits_close(our_logits(model, ids, mask), hf_logits(hf_model.eval(), ids, mask), mask, min_std=0.1)


def test_preset_seed_gives_the_saved_weights(tiny_folder: Path) -> None:
    from_folder, _ = load_model(str(tiny_folder), device="cpu", dtype=torch.float32)
    same_seed, tokenizer = load_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    assert isinstance(tokenizer, ByteTokenizer)
    assert_params_equal(same_seed, snapshot(from_folder))
    other_seed, _ = load_model("tiny", device="cpu", dtype=torch.float32, seed=1)
    assert not torch.equal(other_seed.model.embed_tokens.weight, from_folder.model.embed_tokens.weight)


# -- 3. hf_named_tensors round trip --------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_hf_named_tensors_round_trip(family: str, hf_checkpoints: dict[str, tuple[Any, Path]]) -> None:
    _, folder = hf_checkpoints[family]
    source, _ = load_model(str(folder), device="cpu", dtype=torch.float32)
    named = dict(source.hf_named_tensors())
    # The same names transformers writes (tied: no lm_head.weight).
    assert set(named) == safetensors_names(folder)
    # Fused parameters come out as views, not copies.
    qkv = source.model.layers[0].self_attn.qkv_proj.weight
    assert named["model.layers.0.self_attn.q_proj.weight"].data_ptr() == qkv.data_ptr()
    assert named["model.layers.0.self_attn.k_proj.weight"].data_ptr() == qkv[source.config.q_size:].data_ptr()

    target = build_model(source.config, device="cpu", dtype=torch.float32)
    init_random_weights(target, seed=7)
    assert not torch.equal(target.model.layers[0].self_attn.qkv_proj.weight, qkv)
    load_weights(target, source.hf_named_tensors())
    assert_params_equal(target, snapshot(source))


def test_fused_names_accepted(hf_checkpoints: dict[str, tuple[Any, Path]]) -> None:
    _, folder = hf_checkpoints["qwen2"]
    source, _ = load_model(str(folder), device="cpu", dtype=torch.float32)
    target = build_model(source.config, device="cpu", dtype=torch.float32)
    init_random_weights(target, seed=7)
    written = load_weights(target, source.named_parameters())
    assert ("model.layers.0.self_attn.qkv_proj.weight", None) in written
    assert ("model.layers.1.mlp.gate_up_proj.weight", None) in written
    assert_params_equal(target, snapshot(source))


# -- 4. bad input --------------------------------------------------------------------------------

@pytest.fixture
def small_model() -> CausalLM:
    model = build_model(small_config(), device="cpu", dtype=torch.float32)
    init_random_weights(model, seed=3)
    return model


def _good_entries(model: CausalLM) -> list[tuple[str, torch.Tensor]]:
    # Valid writes that would change the model if anything were copied; none touches layer 0's
    # attention, so a refusal there can only come from the bad entries themselves.
    return [(name, torch.full_like(t, 0.5)) for name, t in model.hf_named_tensors()
            if name == "model.embed_tokens.weight" or name.startswith("model.layers.1.")]


_Q = "model.layers.0.self_attn.q_proj.weight"
_QKV = "model.layers.0.self_attn.qkv_proj.weight"
BAD_ENTRIES = {
    "unknown name": lambda m: [("model.layers.0.self_attn.rotary.weight", torch.zeros(4))],
    "layer out of range": lambda m: [("model.layers.7.mlp.up_proj.weight", torch.zeros(128, 64))],
    "wrong shape": lambda m: [("model.norm.weight", torch.zeros(65))],
    "wrong fused shape": lambda m: [(_QKV, torch.zeros(64, 64))],
    "integer tensor": lambda m: [("model.norm.weight", torch.ones(64, dtype=torch.int64))],
    "duplicate name": lambda m: [("model.norm.weight", torch.ones(64)), ("model.norm.weight", torch.ones(64))],
    "shard then fused": lambda m: [(_Q, torch.ones(64, 64)), (_QKV, torch.ones(128, 64))],  # regression
    "fused then shard": lambda m: [(_QKV, torch.ones(128, 64)), (_Q, torch.ones(64, 64))],
    "tied lm_head and embedding": lambda m: [("model.embed_tokens.weight", torch.ones(VOCAB, 64)),
                                             ("lm_head.weight", torch.ones(VOCAB, 64))],
}


@pytest.mark.parametrize("case", BAD_ENTRIES)
def test_bad_weights_refused_and_nothing_copied(case: str, small_model: CausalLM) -> None:
    bad = BAD_ENTRIES[case](small_model)
    before = snapshot(small_model)
    good = [(n, t) for n, t in _good_entries(small_model) if n not in {name for name, _ in bad}]
    with pytest.raises(ValueError, match="nothing was copied") as err:
        load_weights(small_model, good + bad)
    assert repr(bad[-1][0]) in str(err.value)
    assert_params_equal(small_model, before)


def test_good_entries_alone_do_change_the_model(small_model: CausalLM) -> None:
    # Guards the test above: its good entries would have been visible had they been copied.
    before = snapshot(small_model)
    load_weights(small_model, _good_entries(small_model))
    assert not torch.equal(small_model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def test_load_model_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"neither a preset .*'tiny'.* nor an existing folder"):
        load_model(str(tmp_path / "nope"), device="cpu", dtype=torch.float32)


def test_load_model_unknown_preset() -> None:
    with pytest.raises(ValueError, match=r"'tinyy' is neither a preset .*'tiny'"):
        load_model("tinyy", device="cpu", dtype=torch.float32)


def test_load_model_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path), device="cpu", dtype=torch.float32)


def test_load_model_unsupported_architecture(tmp_path: Path) -> None:
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257, "n_embd": 768,
            "n_layer": 12, "n_head": 12, "n_positions": 1024}
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(ValueError, match=r"unsupported architecture \(model_type='gpt2'.*'llama'"):
        load_model(str(tmp_path), device="cpu", dtype=torch.float32)


def test_load_model_without_safetensors(hf_checkpoints: dict[str, tuple[Any, Path]], tmp_path: Path) -> None:
    shutil.copy(hf_checkpoints["llama"][1] / "config.json", tmp_path)
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        load_model(str(tmp_path), device="cpu", dtype=torch.float32)


def test_checkpoint_missing_tensors_named(hf_checkpoints: dict[str, tuple[Any, Path]], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _, folder = hf_checkpoints["qwen3"]
    shutil.copy(folder / "config.json", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    dropped = ["model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.k_norm.weight"]
    for name in dropped:
        del tensors[name]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 2 tensor") as err:
        load_model(str(tmp_path), device="cpu", dtype=torch.float32)
    for name in dropped:
        assert name in str(err.value)


# -- 5. build on meta ----------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_build_model_materialises_and_ties(tied: bool) -> None:
    model = build_model(small_config(tie_word_embeddings=tied), device="cpu", dtype=torch.bfloat16)
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        assert t.device.type == "cpu", f"{name} on {t.device}"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    rotary = model.model.rotary_emb
    assert rotary.cos.dtype == torch.float32 and torch.isfinite(rotary.cos).all()
    assert torch.equal(rotary.cos[0], torch.ones(model.config.head_dim))  # position 0: cos 1, not garbage
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert (head.data_ptr() == embed.data_ptr()) is tied
    if tied:
        # A checkpoint's lm_head.weight lands in the one shared tensor.
        load_weights(model, [("lm_head.weight", torch.full((VOCAB, 64), 0.25))])
        assert torch.equal(embed, torch.full((VOCAB, 64), 0.25, dtype=torch.bfloat16))


@pytest.mark.parametrize("tied", [True, False])
def test_to_empty_allocates_a_tied_embedding_once(tied: bool) -> None:
    """A tied lm_head is not given a tensor of its own on the way off meta (an embedding-sized transient)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes: list[tuple[int, ...]] = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func is torch.ops.aten.empty_like.default:
                shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    model = build_meta_model(small_config(tie_word_embeddings=tied), dtype=torch.bfloat16)
    with Allocations():
        model.to_empty(device="cpu")
    assert shapes.count((VOCAB, 64)) == (1 if tied else 2)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    assert model.lm_head.weight.device.type == "cpu"


# -- 6. tokenizers -------------------------------------------------------------------------------

TEXTS = ["hello world", "héllo wörld — 世界 🙂", " two  spaces\n\ttab\x00", ""]


def test_byte_and_hf_tokenizers_agree(tiny_folder: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    raw = tokenizers.Tokenizer.from_str(byte_tokenizer_json())
    saved = load_tokenizer(tiny_folder)
    assert isinstance(saved, HFTokenizer)
    byte = ByteTokenizer()
    for text in TEXTS:
        ids = byte.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert raw.encode(text, add_special_tokens=False).ids == ids, text
        assert saved.encode(text) == ids, text
        assert byte.decode(ids) == text
        assert saved.decode(ids) == text


def test_special_tokens() -> None:
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer

    hf = Tokenizer.from_str(byte_tokenizer_json())
    assert hf.encode("<|eos|>", add_special_tokens=False).ids == [BYTE_EOS] == [257]
    assert hf.encode("a<|eos|>b", add_special_tokens=False).ids == [97, 257, 98]
    assert hf.decode([97, 257, 98], skip_special_tokens=True) == "ab"
    assert ByteTokenizer().decode([97, 257, 98]) == "ab"
    assert ByteTokenizer().encode("<|eos|>") == list(b"<|eos|>")  # the byte tokenizer has no text form for it
