"""Chat templates: read from a checkpoint as HF stores them, rendered as transformers renders them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("jinja2")

from colocate.model import ByteTokenizer, load_tokenizer, resolve_chat_template, save_preset  # noqa: E402
from colocate.model.tokenizer import ChatTemplateSource, load_chat_template  # noqa: E402
from colocate.server.chat_template import ChatTemplate, ChatTemplateError  # noqa: E402

# A ChatML template in the style of Qwen's: a default system turn, raise_exception, tojson, loop controls.
CHATML = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role ' + message['role'] + ' is not supported') }}{% endif %}"
    "{% if message['content'] == 'skip me' %}{% continue %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    "{{ {'é': 1} | tojson if false else '' }}"
)
MESSAGES = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, é!"},
            {"role": "user", "content": "skip me"}, {"role": "user", "content": "Bye"}]


def _with_template(folder: Path, **fields: object) -> Path:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **fields}))
    return folder


def test_presets_and_saved_presets_share_a_plain_text_template(tmp_path: Path) -> None:
    folder = save_preset("tiny", tmp_path / "tiny")
    preset, saved = resolve_chat_template("tiny"), resolve_chat_template(str(folder))
    assert preset == saved and saved.special_tokens["eos_token"] == "<|eos|>"
    text = ChatTemplate(saved).render(MESSAGES[:2])
    assert text == "user: Hi there\nassistant: Hello, é!\nassistant: "
    # No special token in the text: the byte tokenizer and the saved tokenizer.json agree on the ids.
    assert ByteTokenizer().encode(text) == load_tokenizer(folder).encode(text)


def test_templates_are_read_from_every_place_hf_keeps_them(tmp_path: Path) -> None:
    folder = save_preset("tiny", tmp_path / "a")
    _with_template(folder, chat_template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
                   eos_token={"content": "<|im_end|>", "special": True})
    assert load_chat_template(folder) == ChatTemplateSource("D", {"bos_token": "<|bos|>", "eos_token": "<|im_end|>"})
    _with_template(folder, chat_template=None)
    (folder / "chat_template.jinja").write_text("J")
    assert load_chat_template(folder).template == "J"
    (folder / "chat_template.jinja").unlink()
    assert load_chat_template(folder) is None


def test_rendering_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = _with_template(save_preset("tiny", tmp_path / "chatml"), chat_template=CHATML)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ours = ChatTemplate(load_chat_template(folder))
    for add in (True, False):
        assert ours.render(MESSAGES, add_generation_prompt=add) == \
            hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add)


def test_a_template_that_refuses_or_breaks_is_a_value_error() -> None:
    template = ChatTemplate(ChatTemplateSource(CHATML))
    with pytest.raises(ChatTemplateError, match="role tool is not supported"):
        template.render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="failed"):
        template.render([{"role": "user", "content": None}])  # str + None inside the template
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate(ChatTemplateSource("{% for %}")).render(MESSAGES)
    with pytest.raises(ChatTemplateError):  # the sandbox: no attribute access to internals
        ChatTemplate(ChatTemplateSource("{{ messages.__class__.__mro__ }}")).render(MESSAGES)
