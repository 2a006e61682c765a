"""The command line and the PPO example refuse bad flags and configs in one line, exit code 2, before Ray starts,
leaving no output folder; --help shows every default and choice; `colocate serve` says what it serves."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colocate import Engine, EngineConfig
from colocate.cli import build_parser, main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ppo" / "train.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("ppo_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line_exit_2(capsys: pytest.CaptureFixture, call) -> str:
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_the_colocate_command_fails_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "colocate", "save-preset", "nope", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "'tiny'" in proc.stderr and "'qwen2.5-0.5b'" in proc.stderr  # names the presets
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, words", [
    (["generate", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "--model", "/no/such/checkpoint"], "/no/such/checkpoint"),
    (["serve", "--model", "/no/such/checkpoint"], "neither a preset"),
    (["serve", "--dtype", "float8"], "float8"),
    (["serve", "--port", "70000"], "port"),
    (["serve", "--served-model-name", " "], "served model name"),
    (["serve", "--max-model-len", "many"], "--max-model-len"),
])
def test_bad_flags_and_configs(capsys: pytest.CaptureFixture, argv: list[str], words: str) -> None:
    assert words in one_line_exit_2(capsys, lambda: main(argv))


def test_help_shows_defaults_and_choices() -> None:
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    serve, save = (" ".join(subparsers[name].format_help().split()) for name in ("serve", "save-preset"))
    assert "(default: 30000)" in serve and "(default: 127.0.0.1)" in serve and "(default: None)" not in serve
    assert "{critical,error,warning,info,debug,trace}" in serve and "the model's limit" in serve
    assert "qwen2.5-0.5b" in save


@pytest.mark.parametrize("argv, words", [
    (["--iterations", "-3"], "--iterations -3"),
    (["--model", "/no/such/checkpoint"], "neither a preset"),
    (["--num-gpus", str(torch.cuda.device_count() + 1)], "GPU"),
    (["--task", "nope"], "repeat_letter"),
    (["--minibatch-size", "7"], "--minibatch-size 7"),
    (["--lr", "fast"], "--lr"),
])
def test_the_example_refuses_before_ray_starts(train, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path, argv: list[str], words: str) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # any import of Ray would fail: it must not be reached
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "run"
    err = one_line_exit_2(capsys, lambda: train.main([*argv, "--out", str(out)]))
    assert words in err and err.startswith("train.py: error:")
    assert not out.exists()


def test_the_example_help_shows_defaults_and_task_choices(train, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 40)" in text and "{repeat_letter" in text and "(default: None)" not in text


def test_a_host_optimizer_gets_the_cores(train, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray gives an actor's torch as many threads as it has CPUs: a host AdamW step on one thread is ~10x slower
    monkeypatch.setattr(train.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(train.ray, "cluster_resources", lambda: {"CPU": 16.0})
    host = train.parse_args(["--optimizer", "host"])
    assert [train.cpus_per_worker(host, n) for n in (1, 4, 16)] == [15, 3, 1]
    assert train.cpus_per_worker(train.parse_args([]), 1) == 1
    assert train.cpus_per_worker(train.parse_args(["--optimizer", "host", "--cpus-per-worker", "2"]), 1) == 2


def test_serve_says_what_it_serves() -> None:
    from colocate.server.serve import ServeConfig, startup_line

    with Engine(EngineConfig(model="tiny", device="cpu")) as engine:
        line = startup_line(engine, ServeConfig(port=8000, api_key="k", served_model_names=("policy",)))
    assert line.count("\n") == 0
    for words in ("serving tiny as 'policy'", "float32 on cpu", "max_model_len 4096 (the model's",
                  f"holds {engine.limits()['kv_cache_tokens']} tokens", "http://127.0.0.1:8000", "API key on"):
        assert words in line, line
