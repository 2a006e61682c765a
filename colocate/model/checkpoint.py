"""HF checkpoint folders: config.json, single or sharded safetensors (with index), tokenizer files."""

from __future__ import annotations

import contextlib
import json
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from colocate.model.config import ModelConfig


_MAX_INDEX_BYTES = 64 << 20


def checkpoint_files(path: str | Path, *, within: Path | None = None) -> list[Path]:
    """The safetensors files of a checkpoint folder, each a regular file, checked before any is opened.

    Raises ValueError for a missing folder, a malformed index, an index that names a shard by a path
    (not a plain file name), or a shard that is missing or not a regular file (a FIFO would block a
    reader). With `within`, every file must also resolve under it (symlinks followed): what a server
    checks for folders under its --weights-dir roots. Messages name files relative to the folder only.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"checkpoint path {str(path)!r} does not exist or is not a folder")
    root = within.resolve() if within is not None else None
    index = folder / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        _check_regular(index, root)
        if index.stat().st_size > _MAX_INDEX_BYTES:
            raise ValueError(f"{index.name} is over {_MAX_INDEX_BYTES} bytes; refused")
        try:
            weight_map = json.loads(index.read_bytes()).get("weight_map")
        except (ValueError, AttributeError, RecursionError) as e:  # not JSON, not UTF-8, not an object, too deep
            raise ValueError(f"{index.name} is not a JSON object with a weight_map: {e}") from e
        if not isinstance(weight_map, dict) or not all(type(v) is str for v in weight_map.values()):
            raise ValueError(f"{index.name}: weight_map must map tensor names to shard file names")
        files = []
        for name in dict.fromkeys(weight_map.values()):
            if Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"{index.name} names shard {name!r} outside its folder; refused")
            files.append(folder / name)
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors in {str(path)!r}; colocate loads safetensors checkpoints only "
                             "(convert .bin files with transformers' save_pretrained(safe_serialization=True))")
    for file in files:
        _check_regular(file, root)
    return files


def _check_regular(file: Path, root: Path | None) -> None:
    real = file.resolve()
    if root is not None and root not in real.parents:
        raise ValueError(f"{file.name} resolves outside the folders this server reads; refused")
    try:
        mode = real.stat().st_mode
    except FileNotFoundError:
        raise ValueError(f"the checkpoint names {file.name}, which does not exist") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{file.name} is not a regular file; refused")


def checkpoint_layout(files: list[Path]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor in these safetensors files, read from the headers only."""
    from safetensors import safe_open

    from colocate.dtypes import SAFETENSORS_DTYPES

    layout = []
    for file in files:
        with _readable(file):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(part.get_dtype())
                    if dtype is None:
                        raise ValueError(f"{file.name}: {name!r} has unsupported dtype {part.get_dtype()}")
                    layout.append((name, tuple(part.get_shape()), dtype))
    return layout


@contextlib.contextmanager
def _readable(file: Path) -> Iterator[None]:
    """Turn a malformed or unreadable safetensors file's error into a ValueError naming the file only."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, OverflowError) as e:
        raise ValueError(f"{Path(file).name} is not a readable safetensors file: {type(e).__name__}") from e


def read_safetensors(file: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    with _readable(Path(file)):
        return load_file(str(file), device=str(device))


def iter_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of a checkpoint folder, one shard in memory at a time."""
    for file in checkpoint_files(path):
        yield from read_safetensors(file, device).items()


def save_checkpoint(path: str | Path, config: ModelConfig, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                    tokenizer_json: str | None = None, tokenizer_config: dict[str, Any] | None = None,
                    max_shard_bytes: int | None = None) -> Path:
    """Write an HF-format folder: config.json, generation_config.json, safetensors (sharded past
    `max_shard_bytes`, with model.safetensors.index.json) and, if given, tokenizer.json with a
    tokenizer_config.json (plus `tokenizer_config`'s fields, e.g. a chat template)."""
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
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **(tokenizer_config or {})}, indent=2))
    return folder
