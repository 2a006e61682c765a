"""A bench config's device and dtype, and its command line: one flag per field of the config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
C = TypeVar("C")


class DeviceDtypeMixin:
    """The torch forms of a benchmark config's `device` and `dtype` strings.

        @dataclass(kw_only=True)
        class BenchConfig(DeviceDtypeMixin):
            device: str = "cuda"
            dtype: str = "auto"

            def __post_init__(self) -> None:
                self.check_device_dtype()

        BenchConfig(device="cpu").torch_dtype  # torch.float32
    """

    device: str  # fields of the dataclass that mixes this in; not fields here, so its field order is its own
    dtype: str

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def check_device_dtype(self) -> None:
        """Refuse a device torch cannot use here; dtype "auto" becomes bfloat16 on CUDA, float32 on CPU."""
        try:
            device = torch.device(self.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: pass 'cuda[:N]' or 'cpu'")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but torch sees no CUDA device; pass --device cpu")
        if self.dtype == "auto":
            self.dtype = "bfloat16" if device.type == "cuda" else "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be 'auto' or one of {sorted(DTYPES)}")


def names(text: str) -> list[str]:
    """Comma-separated names, blanks dropped: '' is no names."""
    return [x.strip() for x in text.split(",") if x.strip()]


def boolean(text: str) -> bool:
    """true/false, yes/no, 1/0 (any case)."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


# Field annotations are strings under `from __future__ import annotations`.
_PARSERS: dict[str, Callable[[str], Any]] = {"str": str, "int": int, "float": float, "bool": boolean,
                                             "list[str]": names}


def parse_config(cls: type[C], argv: Sequence[str] | None = None, *, description: str,
                 helps: Mapping[str, str] | None = None, without: Sequence[str] = ()) -> C:
    """`cls` from the command line: a `--field-name` flag per field (but those `without`), with its default.

    A `list[str]` field takes comma-separated names ('' for none). The config validates the values.
    """
    helps = helps or {}
    parser = argparse.ArgumentParser(description=description)
    flags = [f for f in dataclasses.fields(cls) if f.name not in without]
    for f in flags:
        assert f.type in _PARSERS, f"{cls.__name__}.{f.name}: no flag for type {f.type!r}"
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        parser.add_argument("--" + f.name.replace("_", "-"), type=_PARSERS[f.type], help=helps.get(f.name),
                            default=",".join(default) if isinstance(default, list) else default)
    args = parser.parse_args(argv)
    return cls(**{f.name: getattr(args, f.name) for f in flags})


def allow_spawn_from_stdin() -> None:
    """Let spawned children start (the engine's, a peer's helper) when the script was piped from stdin.

    Python names a main module read from stdin "<stdin>", and multiprocessing's spawn would run that
    path in every child and fail; with no file name the child leaves the main module alone, and
    imports its target by module name (benchlib's folder travels on the child's sys.path).
    """
    main = sys.modules["__main__"]
    if getattr(main, "__file__", None) == "<stdin>":
        del main.__file__
