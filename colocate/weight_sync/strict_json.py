"""Strict checks for JSON that arrives from outside the process: plain types only, bounded sizes, short quotes."""

from __future__ import annotations

import reprlib

MAX_DEPTH = 4  # handles are flat dicts today; a little nesting is allowed, unbounded nesting is not

short = reprlib.Repr()  # untrusted values in error messages: quoted, escaped, cut short
short.maxstring = short.maxother = 60


def check_keys(raw: object, path: str, *, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    if type(raw) is not dict:
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    unknown = [key for key in raw if key not in required and key not in optional]
    if unknown:
        raise ValueError(f"{path}: unknown key {short.repr(unknown[0])}; expected {list(required + optional)}")
    missing = [key for key in required if key not in raw]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}")


def check_name(name: object, path: str, *, max_chars: int) -> str:
    if type(name) is not str or not 0 < len(name) <= max_chars or not name.isprintable():
        raise ValueError(f"{path}: expected a non-empty printable string of at most {max_chars} characters, "
                         f"got {short.repr(name)}")
    return name


def check_int(value: object, path: str, *, maximum: int | None = None) -> int:
    # type(), not isinstance(): True is an int to isinstance, and must not pass for a size.
    if type(value) is not int:
        raise ValueError(f"{path}: expected a non-negative integer, got {type(value).__name__} {short.repr(value)}")
    if value < 0 or (maximum is not None and value > maximum):
        raise ValueError(f"{path}: {value} is out of range [0, {maximum if maximum is not None else 'inf'}]")
    return value


def check_int64(value: object, path: str) -> int:
    """A signed 64-bit integer (a checksum), not a bool."""
    if type(value) is not int or not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"{path}: expected a signed 64-bit integer, got {type(value).__name__} {short.repr(value)}")
    return value


def check_list(value: object, path: str) -> list:
    if type(value) is not list:
        raise ValueError(f"{path}: expected a JSON array, got {type(value).__name__}")
    return value


def plain_json(value: object, path: str, *, want: type | None = None, depth: int = 0) -> object:
    """A deep copy of `value` if it is made of plain JSON types only (dicts with str keys), else ValueError."""
    if want is not None and type(value) is not want:
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if value is None or type(value) in (str, int, float, bool):
        return value
    if type(value) is list:
        return [plain_json(item, f"{path}[{k}]", depth=depth + 1) for k, item in enumerate(value)]
    if type(value) is dict:
        for key in value:
            if type(key) is not str:
                raise ValueError(f"{path}: keys must be strings, got {type(key).__name__} {short.repr(key)}")
        return {key: plain_json(item, f"{path}.{key if key.isidentifier() else short.repr(key)}", depth=depth + 1)
                for key, item in value.items()}
    raise ValueError(f"{path}: {type(value).__name__} is not a JSON type")
