"""Tokenizers: HF `tokenizer.json` through the `tokenizers` package, or the built-in byte tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

# The byte tokenizer: ids 0..255 are bytes, then three special tokens.
BYTE_BOS, BYTE_EOS, BYTE_PAD = 256, 257, 258
BYTE_SPECIALS = {"<|bos|>": BYTE_BOS, "<|eos|>": BYTE_EOS, "<|pad|>": BYTE_PAD}
# The presets' chat format: plain "role: content" lines. It uses no special token, so the byte
# tokenizer (which does not parse them) and the saved tokenizer.json give the same ids.
BYTE_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}"
                      "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
# Fields of tokenizer_config.json a chat template may read (HF passes them to the template).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


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


@dataclass
class ChatTemplateSource:
    """A chat template (Jinja source) and the special tokens it may use, as a checkpoint declares them."""

    template: str
    special_tokens: dict[str, str] = field(default_factory=dict)  # e.g. {"bos_token": "<s>", "eos_token": "</s>"}


def load_chat_template(folder: str | Path) -> ChatTemplateSource | None:
    """The folder's chat template: tokenizer_config.json's `chat_template` (a string, or named templates,
    of which "default"), else chat_template.jinja; None if it has none."""
    folder = Path(folder)
    config: dict[str, Any] = {}
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} is not a JSON object")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not isinstance(template, str) or not template:
        return None
    tokens = {}
    for name in TEMPLATE_TOKENS:
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value  # AddedToken objects are saved as dicts
        if isinstance(value, str):
            tokens[name] = value
    return ChatTemplateSource(template, tokens)


def byte_chat_template() -> ChatTemplateSource:
    return ChatTemplateSource(BYTE_CHAT_TEMPLATE, {"bos_token": "<|bos|>", "eos_token": "<|eos|>"})


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
