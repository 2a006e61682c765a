"""Tokenizers: HF `tokenizer.json` through the `tokenizers` package, or the built-in byte tokenizer."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Protocol

# The byte tokenizer: ids 0..255 are bytes, then three special tokens.
BYTE_BOS, BYTE_EOS, BYTE_PAD = 256, 257, 258
BYTE_SPECIALS = {"<|bos|>": BYTE_BOS, "<|eos|>": BYTE_EOS, "<|pad|>": BYTE_PAD}


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids; ids that are not bytes decode to nothing.

    >>> ByteTokenizer().encode("hi")
    [104, 105]
    """

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` read with the `tokenizers` package (no `transformers` needed)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = _Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The folder's tokenizer.json, or None (token-id prompts still work)."""
    file = Path(folder) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        return HFTokenizer(file)
    except ImportError:
        return None


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    # The printable stand-ins GPT-2's byte-level BPE uses for the 256 byte values.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def byte_tokenizer_json() -> str:
    """The byte tokenizer as an HF `tokenizer.json` (byte-level BPE with no merges): same ids."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for tok, i in BYTE_SPECIALS.items()]
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }
    return json.dumps(spec, ensure_ascii=False)
