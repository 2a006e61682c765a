"""HF checkpoint folders: config.json, single or sharded safetensors (with index), tokenizer files."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from colocate.model.config import ModelConfig


def checkpoint_files(path: str | Path) -> list[Path]:
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"checkpoint path {str(path)!r} does not exist or is not a folder")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names shard(s) that do not exist: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in {str(path)!r}; colocate loads safetensors checkpoints only "
                         "(convert .bin files with transformers' save_pretrained(safe_serialization=True))")
    return files


def checkpoint_layout(files: list[Path]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor in these safetensors files, read from the headers only."""
    from safetensors import safe_open

    from colocate.dtypes import SAFETENSORS_DTYPES

    layout = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(part.get_dtype())
                if dtype is None:
                    raise ValueError(f"{file.name}: {name!r} has unsupported dtype {part.get_dtype()}")
                layout.append((name, tuple(part.get_shape()), dtype))
    return layout


def read_safetensors(file: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(file), device=str(device))


def iter_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of a checkpoint folder, one shard in memory at a time."""
    for file in checkpoint_files(path):
        yield from read_safetensors(file, device).items()


def save_checkpoint(path: str | Path, config: ModelConfig, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                    tokenizer_json: str | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write an HF-format folder: config.json, generation_config.json, safetensors (sharded past
    `max_shard_bytes`, with model.safetensors.index.json) and, if given, tokenizer.json."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    total_bytes = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        # A contiguous host copy: safetensors refuses views that share storage (our fused splits).
        shards[-1][name] = tensor.detach().to("cpu", copy=True).contiguous()
        shard_bytes += nbytes
        total_bytes += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    generation = {"bos_token_id": config.bos_token_id,
                  "eos_token_id": config.eos_token_id[0] if len(config.eos_token_id) == 1 else config.eos_token_id}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer_json is not None:
        (folder / "tokenizer.json").write_text(tokenizer_json)
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder
