"""The official `openai` client against a real uvicorn around a tiny engine: completions and chat, whole and
streamed, logprobs, echo, penalties, stop strings, model names, strict types and refused fields."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from colocate import Engine, EngineConfig, SamplingParams  # noqa: E402
from colocate.model import save_preset  # noqa: E402
from colocate.server.app import create_app  # noqa: E402
from colocate.server.serve import ServerThread  # noqa: E402

KEY = "openai-key"
NAMES = ["tiny-a", "policy"]


@pytest.fixture(scope="module")
def engine(checkpoints: tuple[Path, Path]) -> Iterator[Engine]:
    engine = Engine(EngineConfig(model=str(checkpoints[0]), device="cpu", max_model_len=512))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ServerThread]:
    with ServerThread(create_app(engine, api_key=KEY, served_model_names=NAMES)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def raw(server: ServerThread, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def test_models_and_model_names(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == NAMES
    assert client.models.retrieve("policy").id == "policy"
    for call in (lambda: client.models.retrieve("gpt-4o"),
                 lambda: client.completions.create(model="gpt-4o", prompt="hi", max_tokens=1)):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.body["code"] == "model_not_found" and "gpt-4o" in err.value.body["message"]


def test_completions_with_top_logprobs_match_the_engine(client: openai.OpenAI, engine: Engine) -> None:
    expected = engine.generate("Hello", SamplingParams(max_new_tokens=8, temperature=0.0, top_logprobs=3))[0]
    r = client.completions.create(model="tiny-a", prompt="Hello", max_tokens=8, temperature=0, logprobs=3)
    choice = r.choices[0]
    assert choice.text == expected.text and r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 5
    assert choice.logprobs.token_logprobs == pytest.approx(expected.logprobs)
    # k alternatives per token, keyed by their text (two byte tokens that decode alike share a key, as in OpenAI's
    # format); the first of each is the sampled token: greedy takes the most likely.
    for top, alternatives in zip(choice.logprobs.top_logprobs, expected.top_logprobs):
        assert len(alternatives) == 3
        expected_top: dict[str, float] = {}
        for t, lp in alternatives:
            expected_top.setdefault(engine.tokenizer.decode([t]), lp)
        assert top == pytest.approx(expected_top)


def test_completion_stream_equals_the_whole_answer(client: openai.OpenAI) -> None:
    body = dict(model="tiny-a", prompt=["Hello", "colocate"], n=2, max_tokens=8, temperature=0.8, seed=5)
    whole = client.completions.create(**body)
    chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    texts = {i: "" for i in range(4)}
    reasons = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        if choice.finish_reason is not None:
            reasons[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert [reasons[i] for i in range(4)] == [c.finish_reason for c in whole.choices]
    assert whole.choices[0].text != whole.choices[1].text  # choice j samples with seed + j
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_echo_returns_the_prompt_and_its_logprobs(client: openai.OpenAI) -> None:
    for stream in (False, True):
        r = client.completions.create(model="tiny-a", prompt="Hello", max_tokens=4, temperature=0, echo=True,
                                      logprobs=1, stream=stream)
        first = next(iter(r)).choices[0] if stream else r.choices[0]
        assert first.text.startswith("Hello")
        lp = first.logprobs
        assert lp.tokens[:5] == list("Hello") and lp.text_offset[:5] == [0, 1, 2, 3, 4]
        assert lp.token_logprobs[0] is None and all(v is not None and v < 0 for v in lp.token_logprobs[1:5])
        assert lp.top_logprobs[0] is None and all(len(top) == 1 for top in lp.top_logprobs[1:])


def test_chat_whole_and_streamed(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model="policy", messages=messages, max_completion_tokens=6,
                                           temperature=0, logprobs=True, top_logprobs=2)
    assert whole.object == "chat.completion" and whole.model == "policy"
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and whole.usage.completion_tokens == 6
    # The checkpoint's template (the presets' "role: content" lines) made the prompt.
    assert whole.usage.prompt_tokens == len(b"system: Be brief.\nuser: Hi\nassistant: ")
    assert len(choice.logprobs.content) == 6 and all(len(e.top_logprobs) == 2 for e in choice.logprobs.content)
    assert "".join(e.token for e in choice.logprobs.content) == choice.message.content
    chunks = list(client.chat.completions.create(model="policy", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason and chunks[-1].usage == whole.usage


def test_presence_penalty_changes_greedy_output(client: openai.OpenAI) -> None:
    def tokens(**penalty: float) -> list[int]:
        r = client.completions.create(model="tiny-a", prompt="Hello", max_tokens=24, temperature=0, logprobs=0,
                                      **penalty)
        return r.choices[0].logprobs.tokens

    plain, present, frequent = tokens(), tokens(presence_penalty=2.0), tokens(frequency_penalty=2.0)
    assert len(set(present)) > len(set(plain)) and len(set(frequent)) > len(set(plain))


def test_stop_strings_cut_whole_and_streamed_answers_alike(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny-a", prompt="Hi", max_tokens=40, temperature=0).choices[0].text
    stop = full[6:8]
    whole = client.completions.create(model="tiny-a", prompt="Hi", max_tokens=40, temperature=0, stop=[stop])
    assert whole.choices[0].text == full[:full.find(stop)] and whole.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny-a", prompt="Hi", max_tokens=40, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("field, value", [("max_tokens", "5"), ("seed", "1"), ("n", True), ("stream", "true"),
                                          ("temperature", "0.5"), ("logit_bias", {"5": 1}), ("suffix", "x"),
                                          ("best_of", 3), ("tools", [{"type": "function"}]),
                                          ("response_format", {"type": "json_object"}), ("frobnicate", 1),
                                          ("stream_options", {"include_usage": True})])
def test_wrong_types_and_unsupported_fields_are_400_naming_the_field(server: ServerThread, field: str,
                                                                     value: object) -> None:
    r = raw(server, "/v1/completions", {"model": "tiny-a", "prompt": "hi", "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request" and field in r.json()["error"]["message"]


def test_fields_that_ask_for_nothing_are_accepted(server: ServerThread) -> None:
    body = {"model": "tiny-a", "prompt": "hi", "max_tokens": 2, "logit_bias": {}, "user": "u", "best_of": 1,
            "suffix": None, "tools": [], "response_format": {"type": "text"}}
    assert raw(server, "/v1/completions", body).status_code == 200
    r = raw(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert r.status_code == 400 and "type" in r.json()["error"]["message"]  # text parts only


def test_chat_without_a_template_is_a_clear_400(tmp_path: Path) -> None:
    folder = save_preset("tiny", tmp_path / "no-template")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                              if k != "chat_template"}))
    with Engine(EngineConfig(model=str(folder), device="cpu", max_model_len=64)) as engine, \
            ServerThread(create_app(engine)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=str(folder), messages=[{"role": "user", "content": "Hi"}])
        assert "chat template" in err.value.body["message"]
        assert client.completions.create(model=str(folder), prompt="Hi", max_tokens=2).choices[0].text is not None


def test_a_client_that_leaves_a_stream_aborts_its_request(server: ServerThread, engine: Engine,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    aborted: list = []
    abort = engine.abort
    monkeypatch.setattr(engine, "abort", lambda seqs: (aborted.extend(seqs), abort(seqs)))
    body = {"model": "tiny-a", "prompt": "Hi", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert next(r.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 60
    while not (aborted and aborted[0].is_finished) and time.monotonic() < deadline:
        time.sleep(0.05)
    (seq,) = aborted
    assert seq.finish_reason == "abort" and seq.num_generated < 400


def test_many_concurrent_streams_each_get_their_own_tokens(server: ServerThread, engine: Engine) -> None:
    prompts = [f"prompt {i}" for i in range(8)]
    expected = [o.text for o in engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0))]
    texts: dict[int, str] = {}

    def run(i: int) -> None:
        with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"prompt": prompts[i], "max_tokens": 6, "temperature": 0, "stream": True},
                          timeout=60) as r:
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        texts[i] = "".join(json.loads(line)["choices"][0]["text"] for line in lines[:-1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [texts[i] for i in range(len(prompts))] == expected
