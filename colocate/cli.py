"""The `colocate` command: generate from a model, save a preset as an HF checkpoint, serve over HTTP."""

from __future__ import annotations

import argparse
import json
import sys
import time

from colocate.engine import Engine, EngineConfig, SamplingParams


def _generate(args: argparse.Namespace) -> None:
    engine = Engine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                 max_model_len=args.max_model_len, seed=args.seed, quantization=args.quantization))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
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

    # ServeConfig first: a refused host fails before the model loads.
    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key, engine_process=args.engine_process,
                         max_body_bytes=args.max_body_bytes, log_level=args.log_level,
                         weights_dirs=tuple(args.weights_dir or ()))
    engine_config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                 max_model_len=args.max_model_len, kv_cache_fraction=args.kv_cache_fraction,
                                 max_num_seqs=args.max_num_seqs, paused_wait_s=args.paused_wait_s, seed=args.seed,
                                 quantization=args.quantization)
    serve(engine_config, config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="colocate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text with the built-in engine")
    gen.add_argument("--model", default="tiny", help="preset name or HF checkpoint folder")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--quantization", default=None, choices=["fp8"],
                     help="fp8: decoder linear weights in float8_e4m3fn, quantized on load and on every update")
    gen.add_argument("--max-model-len", type=int, default=2048)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_generate)
    save = sub.add_parser("save-preset", help="random-initialise a preset and save it as an HF checkpoint folder")
    save.add_argument("preset")
    save.add_argument("path")
    save.add_argument("--seed", type=int, default=0)
    save.set_defaults(func=_save_preset)
    srv = sub.add_parser("serve", help="serve the engine over HTTP (FastAPI on uvicorn)")
    srv.add_argument("--model", default="tiny", help="preset name or HF checkpoint folder")
    srv.add_argument("--device", default="auto")
    srv.add_argument("--dtype", default="auto")
    srv.add_argument("--quantization", default=None, choices=["fp8"],
                     help="fp8: decoder linear weights in float8_e4m3fn, quantized on load and on every update")
    srv.add_argument("--host", default="127.0.0.1", help="a non-loopback host needs --api-key")
    srv.add_argument("--port", type=int, default=30000)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on control and generate")
    srv.add_argument("--engine-process", action="store_true", help="run the engine in a child process")
    srv.add_argument("--max-model-len", type=int, default=2048)
    srv.add_argument("--kv-cache-fraction", type=float, default=0.5)
    srv.add_argument("--max-num-seqs", type=int, default=64)
    srv.add_argument("--paused-wait-s", type=float, default=300.0,
                     help="how long a request waits while paused before a 503")
    srv.add_argument("--max-body-bytes", type=int, default=64 << 20)
    srv.add_argument("--weights-dir", action="append", metavar="DIR",
                     help="allow POST /update_weights with format safetensors from folders under DIR (repeatable); "
                          "without it, disk updates over HTTP are refused")
    srv.add_argument("--log-level", default="info")
    srv.add_argument("--seed", type=int, default=0)
    srv.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        parser.exit(2, f"colocate: error: {e}\n")


if __name__ == "__main__":
    main()
