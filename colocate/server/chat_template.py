"""A checkpoint's chat template rendered as Hugging Face renders it: sandboxed Jinja, the same names in scope."""

from __future__ import annotations

import datetime
import json
from functools import cached_property
from typing import Any

from colocate.model import ChatTemplateSource


class ChatTemplateError(ValueError):
    """The template refused the conversation (its raise_exception), or failed on it: a 400 that says why."""


class ChatTemplate:
    """Renders a conversation to the prompt text the model was trained on.

    >>> template = ChatTemplate(resolve_chat_template("/ckpt/Qwen2.5-1.5B-Instruct"))
    >>> template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    '<|im_start|>system\\n...<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    Like transformers' apply_chat_template: an immutable sandbox with trim_blocks and lstrip_blocks,
    loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, and the
    checkpoint's special tokens (bos_token, eos_token, ...) in scope. The text is tokenized without
    adding special tokens: the template writes the ones it wants.
    """

    def __init__(self, source: ChatTemplateSource) -> None:
        self.source = source  # compiled at the first render: a template that does not parse is a 400 then

    @cached_property
    def _compiled(self) -> Any:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(f"the chat template refused the conversation: {message}")

        def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
            return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        try:
            return env.from_string(self.source.template)
        except jinja2.TemplateError as e:
            raise ValueError(f"the checkpoint's chat template does not parse: {e}") from e

    @property
    def eos_token(self) -> str | None:
        return self.source.special_tokens.get("eos_token")

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               extra: dict[str, Any] | None = None) -> str:
        """The prompt text for `messages`; `extra` adds variables the template may read (e.g. enable_thinking)."""
        import jinja2

        scope = {**self.source.special_tokens, **(extra or {}), "messages": messages,
                 "add_generation_prompt": add_generation_prompt, "tools": None, "documents": None}
        try:
            return self._compiled.render(**scope)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
            # A conversation the template cannot handle (a missing field, a role it does not know): the
            # request's fault as far as this server can tell.
            raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e
