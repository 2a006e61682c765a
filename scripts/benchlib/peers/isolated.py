"""A peer measured in a fresh interpreter (its own CUDA context and allocator), with JSON in and out."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import colocate
from benchlib.config import DTYPES
from benchlib.peers import first_touch, memory_saver
from benchlib.report import error_result

KINDS = ("tms", *first_touch.PATHS)
# The child imports colocate and benchlib as this process does, wherever the bench was started from.
_IMPORT_ROOTS = (str(Path(colocate.__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2]))


@dataclass(kw_only=True)
class IsolatedPeer:
    """What one fresh-interpreter peer measures; it reaches the child as JSON (no pickle).

        result = run_isolated(IsolatedPeer(kind="flat", model="tiny", device="cpu", dtype="float32",
                                           max_model_len=256, num_cycles=2, seed=0), timeout_s=300)
        result["first_s"], result["later_s"]
    """

    kind: str  # "tms" | "to_empty" | "flat"
    model: str
    device: str
    dtype: str
    max_model_len: int
    num_cycles: int
    seed: int
    is_cold: bool = False  # to_empty / flat: no CUDA warm-up first, so the first call pays CUDA initialisation
    kv_bytes: int = 0  # tms: bytes of the KV-sized tensor (the engine's KV cache)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} must be one of {list(KINDS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {sorted(DTYPES)}")

    def measure(self) -> dict[str, Any]:
        """The child's side: run the peer here."""
        device, dtype = torch.device(self.device), DTYPES[self.dtype]
        if self.kind == "tms":
            return memory_saver.measure(self.model, device=device, dtype=dtype, max_positions=self.max_model_len,
                                        seed=self.seed, num_cycles=self.num_cycles, kv_bytes=self.kv_bytes)
        return first_touch.measure(self.model, path=self.kind, is_cold=self.is_cold, device=device, dtype=dtype,
                                   max_positions=self.max_model_len, num_cycles=self.num_cycles)


def run_isolated(peer: IsolatedPeer, *, timeout_s: float) -> dict[str, Any]:
    """Run one peer in a fresh interpreter; its JSON result, or what went wrong."""
    with tempfile.TemporaryDirectory(prefix="bench_peer_") as tmp:
        out = Path(tmp) / "peer.json"
        cmd = [sys.executable, "-m", __name__, "--peer", json.dumps(asdict(peer)), "--out", str(out)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [*_IMPORT_ROOTS, os.environ.get("PYTHONPATH")])))
        if peer.is_cold:
            # torch.cuda.is_available() then asks NVML, not the CUDA runtime, so the first timed call
            # pays all of CUDA's initialisation.
            env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
        if peer.kind == "tms":
            env = memory_saver.subprocess_env(env)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s} s"}
        result = json.loads(out.read_text()) if out.exists() else {}
        result["process_wall_s"] = time.perf_counter() - start
        if proc.returncode != 0:
            key = "exit_error" if result and "error" not in result else "error"
            result[key] = f"exit code {proc.returncode}: {proc.stderr[-3000:]}"
        return result


def main(argv: list[str] | None = None) -> None:
    """The child's side: measure, and always leave a JSON result (errors included) for the parent."""
    parser = argparse.ArgumentParser(description="one bench peer in a fresh interpreter (run by run_isolated)")
    parser.add_argument("--peer", required=True, help="IsolatedPeer's fields as a JSON object")
    parser.add_argument("--out", required=True, help="file for the JSON result")
    args = parser.parse_args(argv)
    peer = IsolatedPeer(**json.loads(args.peer))
    result: dict[str, Any] = {"kind": peer.kind}
    try:
        result.update(peer.measure())
    except Exception as exc:  # noqa: BLE001 - a failing peer is a result, not a crash
        result.update(error_result(exc))
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
