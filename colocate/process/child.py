"""The engine process: `python -m colocate.process.child --fd N` builds the Engine and serves JSON calls on a socket.

Started by `launch_engine` as a fresh interpreter, so it never imports the caller's main module
(a script without a main guard, or one piped to `python -`, works). Calls arrive as JSON messages
on the socket; nothing is unpickled.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from colocate.process.service import CONTROL_METHODS, STATUS_METHODS, EngineService, config_from_json

# Errors whose message is for the caller; anything else is a bug here, and carries its traceback's end.
_EXPECTED = (ValueError, RuntimeError, TimeoutError)


class ChildServer:
    """Reads requests and routes them: status at once, control in order on one thread, generate by callback.

    A generate request holds no thread while it waits (the engine calls back when it finishes), so
    any number of them can wait through a pause while /resume, /health and /memory still answer.
    A streamed generate ({"stream": true} in its args) is answered with {"id", "ok": true,
    "partial": {...}} messages (new tokens, each output as it finishes) before its final answer.
    """

    def __init__(self, conn: Connection, service: EngineService) -> None:
        self.conn, self.service = conn, service
        self._send_lock = threading.Lock()
        self._control = ThreadPoolExecutor(max_workers=1, thread_name_prefix="colocate-control")
        self._requests: dict[int, list] = {}  # generate call id -> its sequences, for cancellation
        self._requests_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode()
        with self._send_lock:
            self.conn.send_bytes(data)

    def reply(self, call_id: int, result: Any = None, error: BaseException | None = None) -> None:
        try:
            self.send({"id": call_id, "ok": True, "result": result} if error is None
                      else {"id": call_id, "ok": False, "error": describe_error(error)})
        except (OSError, ValueError):
            pass  # the parent is gone; the reader sees it too and stops

    def serve(self) -> None:
        while True:
            try:
                request = json.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                return  # the parent is gone: stop rather than linger
            method, call_id, args = request.get("method"), request.get("id"), request.get("args", {})
            if method == "shutdown":
                self.service.engine.shutdown()
                self.reply(call_id)
                return
            self.route(method, call_id, args)

    def route(self, method: str, call_id: int, args: dict[str, Any]) -> None:
        if method == "generate":
            self._generate(call_id, args)
        elif method == "cancel":
            self._cancel(args.get("call_id"))
        elif method in STATUS_METHODS:
            self._run(method, call_id, args)
        elif method in CONTROL_METHODS:
            self._control.submit(self._run, method, call_id, args)
        else:
            self.reply(call_id, error=ValueError(f"unknown method {method!r}"))

    def _run(self, method: str, call_id: int, args: dict[str, Any]) -> None:
        try:
            result = getattr(self.service, method)(**args)
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
            self.reply(call_id, error=e)
            return
        self.reply(call_id, result)

    def _generate(self, call_id: int, args: dict[str, Any]) -> None:
        def done(outputs: list[dict] | None, error: BaseException | None) -> None:
            with self._requests_lock:
                self._requests.pop(call_id, None)
            self.reply(call_id, outputs, error)

        def partial(event: dict) -> None:
            try:
                self.send({"id": call_id, "ok": True, "partial": event})
            except (OSError, ValueError):
                pass  # the parent is gone

        stream = args.pop("stream", False) is True
        try:
            seqs = self.service.submit(**args, done=done, partial=partial if stream else None)
        except BaseException as e:  # noqa: BLE001
            self.reply(call_id, error=e)
            return
        with self._requests_lock:
            if not all(s.is_finished for s in seqs):
                self._requests[call_id] = seqs

    def _cancel(self, call_id: object) -> None:
        with self._requests_lock:
            seqs = self._requests.get(call_id) if isinstance(call_id, int) else None
        if seqs:
            self.service.engine.abort(seqs)

    def close(self) -> None:
        self._control.shutdown(wait=False, cancel_futures=True)


def describe_error(e: BaseException) -> dict[str, str]:
    """What the parent gets: the error's type and message; for our own bugs a stable type, the traceback here."""
    if isinstance(e, _EXPECTED):
        return {"type": type(e).__name__, "message": str(e) or type(e).__name__}
    print("".join(traceback.format_exception(e)), file=sys.stderr, flush=True)
    return {"type": "EngineInternalError",
            "message": f"internal error in the engine process ({type(e).__name__}); see its log"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m colocate.process.child", description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="a connected socket inherited from the parent")
    args = parser.parse_args(argv)
    conn = Connection(args.fd)
    try:
        config = json.loads(conn.recv_bytes())
        from colocate.engine import Engine

        engine = Engine(config_from_json(config))
    except (EOFError, OSError):
        return
    except BaseException as e:  # noqa: BLE001 - the parent reports it and raises the same type
        conn.send_bytes(json.dumps({"ok": False, "error": describe_error(e)}).encode())
        return
    service = EngineService(engine)
    server = ChildServer(conn, service)
    server.send({"ok": True, "result": service.info()})
    try:
        server.serve()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent shuts down too
        pass
    finally:
        server.close()
        engine.shutdown()
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
