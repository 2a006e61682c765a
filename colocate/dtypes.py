"""The one table of dtype names colocate accepts, shared by configs, manifests and checkpoint headers."""

from __future__ import annotations

import torch

# Floating-point dtypes a model, a trainer or a weight update may use, by the name configs and JSON carry.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# safetensors header codes -> torch dtypes (every code a checkpoint file may hold, not only floats).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def parse_dtype(name: object, field: str, *, allowed: tuple[str, ...] = tuple(DTYPES)) -> torch.dtype:
    """The torch dtype named `name`, or ValueError naming `field` and the choices."""
    if type(name) is not str or name not in allowed:
        raise ValueError(f"{field}={name!r} must be one of {sorted(allowed)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The table's name for `dtype`; ValueError for a dtype outside the table."""
    name = _NAMES.get(dtype)
    if name is None:
        raise ValueError(f"dtype {dtype} is not supported here; use one of {sorted(DTYPES)}")
    return name
