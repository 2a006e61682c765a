"""The engine process's side of `launch_engine`: build the Engine, then serve JSON requests until shutdown."""

from __future__ import annotations

import dataclasses
import json
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from colocate.engine import Engine, EngineConfig, SamplingParams
from colocate.weight_sync import SUPPORTED_DTYPES, WeightManifest, bucket_views, device_uuid, open_bucket
from colocate.weight_sync.handles import OpenedBucket


class EngineService:
    """Turns request dicts into Engine calls; holds the manifest of the open bucketed update."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.manifest: WeightManifest | None = None
        self.opened: dict[str, OpenedBucket] = {}  # buffers of the open update, mapped once each
        self.layout: tuple[int, WeightManifest, list] | None = None  # (id, parsed manifest, engine layout)

    def generate(self, prompts: Any, params: list[dict], single_params: bool) -> list[dict]:
        plist = [SamplingParams(**p) for p in params]
        outs = self.engine.generate(prompts, plist[0] if single_params else plist)
        return [dataclasses.asdict(o) for o in outs]

    def release_memory(self, **kwargs: Any) -> dict:
        return self.engine.release_memory(**kwargs).to_dict()

    def resume_memory(self, tags: list[str] | None) -> dict:
        return self.engine.resume_memory(tags).to_dict()

    def memory_status(self) -> dict:
        return self.engine.memory_status()

    def release_host_arena(self) -> int:
        return self.engine.release_host_arena()

    def begin_weight_update(self, manifest: dict | None, layout_id: int | None = None, version: int | None = None,
                            ) -> None:
        """Open a bucketed update. `manifest` may be None when `layout_id` names the layout of an
        earlier update (a trainer sends the same one every step): it was parsed and validated then."""
        if manifest is None:
            if self.layout is None or self.layout[0] != layout_id:
                raise ValueError(f"layout_id {layout_id!r} is not the last layout this engine saw; send the manifest")
            parsed = WeightManifest(version=version, buckets=self.layout[1].buckets)
            layout = self.layout[2]
        else:
            parsed = WeightManifest.from_dict(manifest)
            layout = [(s.name, tuple(s.shape), SUPPORTED_DTYPES[s.dtype]) for b in parsed.buckets for s in b.tensors]
        self.layout = None
        self.engine.begin_weight_update(layout, version=parsed.version)
        self.manifest = parsed
        if layout_id is not None:
            self.layout = (layout_id, parsed, layout)

    def load_weight_bucket(self, index: int, handle: dict, keep_open: bool = False, begin: dict | None = None,
                           finish: bool = False) -> dict:
        """Copy one bucket in place. `begin` (the begin_weight_update arguments) opens the update
        first and `finish` closes it after, saving the producer two round trips."""
        if begin is not None:
            self.begin_weight_update(**begin)
        result = self._load_bucket(index, handle, keep_open)
        return self.finish_weight_update() if finish else result

    def _load_bucket(self, index: int, handle: dict, keep_open: bool) -> dict:
        if self.manifest is None:
            raise RuntimeError("no weight update is open; call begin_weight_update first")
        if not isinstance(index, int) or not 0 <= index < len(self.manifest.buckets):
            raise ValueError(f"bucket index {index!r} is outside the manifest's {len(self.manifest.buckets)} buckets")
        layout = self.manifest.buckets[index]
        # The producer reuses pooled buffers across buckets (keep_open): map each once, keep it
        # until the update ends. Others are closed after their copy so the producer can free them.
        key = json.dumps(handle, sort_keys=True) if isinstance(handle, dict) else repr(handle)
        try:
            opened = self.opened.get(key)
            if opened is None:
                opened = open_bucket(handle, nbytes=handle.get("nbytes", -1) if isinstance(handle, dict) else -1,
                                     device=self.engine.config.torch_device)
                self.opened[key] = opened
            if opened.buffer.numel() < layout.nbytes:
                raise ValueError(f"bucket {index} needs {layout.nbytes} bytes; the buffer has {opened.buffer.numel()}")
        except BaseException:
            # An unreadable bucket mid-update: the weights may already be a mix, so stop here.
            self.abort_weight_update()
            raise
        # load_weight_bucket synchronises its copies before returning: the producer may refill then.
        result = self.engine.load_weight_bucket(bucket_views(layout, opened.buffer))
        if not keep_open:
            self.opened.pop(key).close()
        return result

    def _close_all(self) -> None:
        for opened in self.opened.values():
            opened.close()
        self.opened.clear()
        self.manifest = None

    def finish_weight_update(self) -> dict:
        self._close_all()
        return self.engine.finish_weight_update()

    def abort_weight_update(self) -> None:
        self._close_all()
        self.engine.abort_weight_update()

    def update_weights_from_manifest(self, manifest: dict) -> dict:
        parsed = WeightManifest.from_dict(manifest)
        if parsed.handles is None:
            raise ValueError("the manifest has no handles; a complete update names one per bucket")
        device = self.engine.config.torch_device
        opened = []
        try:
            # Open every bucket before the first copy: a bad handle must change nothing.
            for layout, handle in zip(parsed.buckets, parsed.handles):
                opened.append(open_bucket(handle, nbytes=layout.nbytes, device=device))
            layout = [(s.name, tuple(s.shape), SUPPORTED_DTYPES[s.dtype]) for b in parsed.buckets for s in b.tensors]
            self.engine.begin_weight_update(layout, version=parsed.version)
            try:
                for bucket, opened_bucket in zip(parsed.buckets, opened):
                    self.engine.load_weight_bucket(bucket_views(bucket, opened_bucket.buffer))
            except BaseException:
                self.engine.abort_weight_update()
                raise
            return self.engine.finish_weight_update()
        finally:
            for bucket in opened:
                bucket.close()

    def update_weights_from_disk(self, path: str, version: int | None) -> dict:
        return self.engine.update_weights_from_disk(path, version=version)


def child_main(config_json: str, conn: Connection) -> None:
    send_lock = threading.Lock()

    def send(message: dict) -> None:
        data = json.dumps(message).encode()
        with send_lock:
            conn.send_bytes(data)

    try:
        engine = Engine(EngineConfig(**json.loads(config_json)))
    except BaseException as e:
        send({"ok": False, "error": _error(e)})
        return
    service = EngineService(engine)
    send({"ok": True, "result": {"device_uuid": device_uuid(engine.config.torch_device),
                                 "model_type": engine.model_config.model_type,
                                 "vocab_size": engine.model_config.vocab_size}})
    pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="colocate-request")
    # The calls of a bucketed update run in arrival order on one thread: the producer pipelines
    # them (bucket i + 1 is sent before bucket i is acknowledged, the first carries the begin).
    updates = ThreadPoolExecutor(max_workers=1, thread_name_prefix="colocate-update")

    def handle(request: dict) -> None:
        try:
            method = getattr(service, request["method"], None)
            if method is None or request["method"].startswith("_"):
                raise ValueError(f"unknown method {request['method']!r}")
            result = method(**request.get("args", {}))
            send({"id": request["id"], "ok": True, "result": result})
        except BaseException as e:  # every failure goes back to the caller
            send({"id": request["id"], "ok": False, "error": _error(e)})

    try:
        while True:
            try:
                request = json.loads(conn.recv_bytes())
            except (EOFError, OSError):
                break  # the parent is gone: stop rather than linger
            if request.get("method") == "shutdown":
                engine.shutdown()
                send({"id": request["id"], "ok": True, "result": None})
                break
            (updates if request.get("method") in _ORDERED else pool).submit(handle, request)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        updates.shutdown(wait=False, cancel_futures=True)
        engine.shutdown()
        conn.close()


_ORDERED = {"begin_weight_update", "load_weight_bucket", "finish_weight_update", "abort_weight_update"}


def _error(e: BaseException) -> dict[str, str]:
    message = str(e) or type(e).__name__
    if not isinstance(e, (ValueError, RuntimeError, TimeoutError)):
        message += "\n" + "".join(traceback.format_exception(e)[-3:])
    return {"type": type(e).__name__, "message": message}
