"""The `colocate` command: generate from a model, save a preset as an HF checkpoint, serve over HTTP."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from colocate.dtypes import DTYPES
from colocate.engine import Engine, EngineConfig, SamplingParams

LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]
MAX_MODEL_LEN_HELP = "longest prompt + completion in tokens (default: the model's limit, capped by the KV cache)"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage block) and exit code 2.

    >>> parser = OneLineParser(prog="train.py", formatter_class=HelpFormatter)
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        # argparse prints no line at all for an option without help: give it one with its default.
        if "help" not in kwargs and kwargs.get("default") is not None and kwargs.get("action") != "help":
            kwargs["help"] = "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every default, except where there is none to show (the help then says what None means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _generate(args: argparse.Namespace) -> None:
    # Both configs before the model loads: a bad value fails at once.
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    engine = Engine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                 max_model_len=args.max_model_len, seed=args.seed, quantization=args.quantization,
                                 weights_offload=args.weights_offload, weights_prefetch=args.weights_prefetch))
    prompts = args.prompt or ["The colocated engine says:"]
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    num_tokens = sum(len(o.token_ids) for o in outs)
    for prompt, out in zip(prompts, outs):
        print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                          "finish_reason": out.finish_reason}))
    print(f"{len(outs)} prompt(s), {num_tokens} tokens in {seconds:.2f} s ({num_tokens / seconds:.0f} tok/s) "
          f"on {engine.config.device} ({engine.config.dtype})", file=sys.stderr)
    engine.shutdown()


def _save_preset(args: argparse.Namespace) -> None:
    from colocate.model import save_preset

    path = save_preset(args.preset, args.path, seed=args.seed)
    print(f"saved preset {args.preset!r} as an HF checkpoint in {path}")


def _serve(args: argparse.Namespace) -> None:
    from colocate.server.serve import ServeConfig, serve

    # Both configs first: a refused host or a bad value fails before the model loads.
    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, engine_process=args.engine_process,
                         max_body_bytes=args.max_body_bytes, log_level=args.log_level,
                         weights_dirs=tuple(args.weights_dir or ()),
                         served_model_names=tuple(args.served_model_name or ()))
    engine_config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                 max_model_len=args.max_model_len, kv_cache_fraction=args.kv_cache_fraction,
                                 max_num_seqs=args.max_num_seqs, paused_wait_s=args.paused_wait_s, seed=args.seed,
                                 quantization=args.quantization, weights_offload=args.weights_offload,
                                 weights_prefetch=args.weights_prefetch)
    serve(engine_config, config)


def _check_model(model: str) -> None:
    from colocate.model import resolve_config

    resolve_config(model)  # a missing folder or an unsupported config.json: one line now, not a traceback later


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="a preset name or an HF checkpoint folder")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--max-model-len", type=int, default=None, help=MAX_MODEL_LEN_HELP)
    p.add_argument("--quantization", default=None, choices=["fp8"],
                   help="fp8: decoder linear weights in float8_e4m3fn, quantized on load and on every update")
    p.add_argument("--weights-offload", type=float, default=0.0,
                   help="fraction of the decoder layers whose weights stay in pinned host memory and are streamed "
                        "to the device for each forward (0 to 1)")
    p.add_argument("--weights-prefetch", type=int, default=2,
                   help="streamed layers copied ahead of the one computing (1: no overlap)")
    p.add_argument("--seed", type=int, default=0, help="the engine's seed (and the sampling seed for generate)")


def build_parser() -> argparse.ArgumentParser:
    from colocate.model import PRESETS

    fmt = HelpFormatter
    parser = OneLineParser(prog="colocate", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,save-preset,serve}")
    gen = sub.add_parser("generate", help="generate text with the built-in engine", formatter_class=fmt,
                         description="Generate for one or more prompts; prints one JSON line per prompt.")
    _engine_flags(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable; default: one built-in prompt)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    gen.set_defaults(func=_generate)
    save = sub.add_parser("save-preset", help="random-initialise a preset and save it as an HF checkpoint folder",
                          formatter_class=fmt)
    save.add_argument("preset", choices=sorted(PRESETS), help="the preset to save")
    save.add_argument("path", help="the folder to write (created)")
    save.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    save.set_defaults(func=_save_preset)
    srv = sub.add_parser("serve", help="serve the engine over HTTP (FastAPI on uvicorn)", formatter_class=fmt,
                         description="Serve colocate's routes, the OpenAI-compatible ones and SGLang's and vLLM's "
                                     "control routes; the API docs are at /docs.")
    _engine_flags(srv)
    srv.add_argument("--host", default="127.0.0.1", help="a non-loopback host needs --api-key")
    srv.add_argument("--port", type=int, default=30000, help="0: any free port")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on control and generate")
    srv.add_argument("--served-model-name", action="append", metavar="NAME",
                     help="a name the OpenAI routes answer to (repeatable; default: the --model value)")
    srv.add_argument("--engine-process", action="store_true", help="run the engine in a child process")
    srv.add_argument("--kv-cache-fraction", type=float, default=0.5,
                     help="CUDA: share of the free device memory the KV cache takes")
    srv.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded at once")
    srv.add_argument("--paused-wait-s", type=float, default=300.0,
                     help="how long a request waits while paused before a 503")
    srv.add_argument("--max-body-bytes", type=int, default=64 << 20)
    srv.add_argument("--weights-dir", action="append", metavar="DIR",
                     help="allow disk weight updates over HTTP from folders under DIR (repeatable; default: none, "
                          "refused)")
    srv.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    srv.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command != "save-preset":
            _check_model(args.model)
        args.func(args)
    except (ValueError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message's layout
        parser.exit(2, f"colocate {args.command}: error: {message}\n")


if __name__ == "__main__":
    main()
