"""The `colocate` command: generate from a model, save a preset as an HF checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
import time

from colocate.engine import Engine, EngineConfig, SamplingParams


def _generate(args: argparse.Namespace) -> None:
    engine = Engine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                 max_model_len=args.max_model_len, seed=args.seed))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="colocate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text with the built-in engine")
    gen.add_argument("--model", default="tiny", help="preset name or HF checkpoint folder")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--dtype", default="auto")
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
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        parser.exit(2, f"colocate: error: {e}\n")


if __name__ == "__main__":
    main()
