"""CPU round trip: the trainer's tensors to host, through a pipe to a helper process, copied onto the GPU there."""

from __future__ import annotations

import os
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.multiprocessing as torch_mp

from benchlib.checks import fingerprint
from benchlib.config import DTYPES
from benchlib.measure import first_and_steady_by_key, sync
from colocate.model import CausalLM, build_model, preset_config


def receiver(conn: Connection, model: str, device: str, dtype: str) -> None:
    """The helper process: a model of the same shape on the device; copies every received list into it."""
    try:
        dev = torch.device(device)
        module = build_model(preset_config(model), device=dev, dtype=DTYPES[dtype], max_positions=16)
        targets = dict(module.hf_named_tensors())
        conn.send({"ok": True, "pid": os.getpid()})
        while True:
            message = conn.recv()
            if message is None:
                break
            if message == "fingerprint":
                conn.send(fingerprint(targets.values()))
                continue
            with torch.no_grad():
                for name, tensor in message:
                    targets[name].copy_(tensor)  # host (shared memory, pageable) to device
            sync(dev)
            del message
            conn.send("ack")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which records it
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"})
    finally:
        conn.close()


def measure(model: str, trainer: CausalLM, *, device: torch.device, dtype: str, repeats: int, timeout_s: float,
            expected_fingerprint: int) -> dict[str, Any]:
    """`repeats` round trips to a helper started (its CUDA context made) before timing; it checks what arrived.

    The pipe is torch.multiprocessing's: its reducers put each CPU tensor in shared memory and pass
    a file descriptor, faster than pickling the bytes through the pipe (the peer's best case); the
    helper is this benchmark's own child, not the engine's, which takes only JSON.
    """
    ctx = torch_mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(child_conn, model, str(device), dtype), name="bench-cpu-peer",
                       daemon=True)
    start = time.perf_counter()
    proc.start()
    child_conn.close()

    def receive() -> Any:
        if not conn.poll(timeout_s):
            raise TimeoutError(f"the CPU peer's helper did not answer within {timeout_s} s")
        message = conn.recv()
        if isinstance(message, dict) and not message.get("ok", True):
            raise RuntimeError(f"the CPU peer's helper failed: {message['error']}")
        return message

    try:
        receive()  # the helper's model is on the device: its start-up is not part of the round trip
        out: dict[str, Any] = {"helper_start_s": time.perf_counter() - start, "runs": []}
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            host = [(name, t.to("cpu", copy=True)) for name, t in trainer.hf_named_tensors()]  # = .cpu() on GPU
            t1 = time.perf_counter()
            conn.send(host)
            ack = receive()
            t2 = time.perf_counter()
            assert ack == "ack", f"{ack=}"
            del host
            out["runs"].append({"d2h_s": t1 - t0, "send_copy_ack_s": t2 - t1, "total_s": t2 - t0})
        conn.send("fingerprint")
        out["fingerprint_equal"] = receive() == expected_fingerprint
        conn.send(None)
        out.update(first_and_steady_by_key(out["runs"], ("d2h_s", "total_s")))
        return out
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        conn.close()
