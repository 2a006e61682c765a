"""`Client`: drive a `colocate serve` server from a trainer in another process (HTTP + CUDA IPC buckets)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from colocate.dtypes import parse_dtype
from colocate.engine import SamplingParams
from colocate.model.probe import LogprobProbe
from colocate.weight_sync import DEFAULT_BUCKET_BYTES, BucketSender, UnknownLayoutError, device_for_uuid


class ServerError(RuntimeError):
    """The server answered with an error; `status` is the HTTP code (503 means retry later)."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None, kind: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.retry_after_s, self.kind = status, retry_after_s, kind


class Client:
    """A trainer's handle on a colocate server on the same host.

    >>> client = Client("http://127.0.0.1:30000", api_key="secret")
    >>> client.pause(weights_to="meta")
    >>> client.resume(["weights"])
    >>> client.update_weights(model.named_parameters(), version=step)   # CUDA IPC buckets, JSON manifest
    >>> client.resume(["kv_cache", "cuda_graph"])
    >>> outs = client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=16))
    """

    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self._sender: BucketSender | None = None

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._http.request(method, path, json=body)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                message, kind = error["message"], error.get("type")
            except (ValueError, KeyError, TypeError):
                message, kind = response.text, None
            if kind == UnknownLayoutError.__name__:
                raise UnknownLayoutError(message)  # the sender sends the whole layout again
            retry = response.headers.get("Retry-After")
            raise ServerError(response.status_code, message, float(retry) if retry else None, kind)
        return response.json() if response.headers.get("content-type", "").startswith("application/json") \
            else response.text

    # -- generation and memory ------------------------------------------------------------
    def generate(self, prompts: str | list[str] | list[int] | list[list[int]],
                 params: SamplingParams | None = None) -> list[dict[str, Any]]:
        """One dict per prompt: output_ids, text, logprobs, finish_reason."""
        params = params or SamplingParams()
        key = "text" if isinstance(prompts, str) or (prompts and isinstance(prompts[0], str)) else "input_ids"
        out = self._request("POST", "/generate", {key: prompts, "sampling_params": dataclasses.asdict(params)})
        return out if isinstance(out, list) else [out]

    def pause(self, tags: list[str] | None = None, *, weights_to: str = "cpu", mode: str = "wait",
              timeout_s: float = 60.0) -> dict[str, Any]:
        body: dict[str, Any] = {"weights_to": weights_to, "mode": mode, "timeout_s": timeout_s}
        if tags is not None:
            body["tags"] = list(tags)
        return self._request("POST", "/pause", body)

    def resume(self, tags: list[str] | None = None) -> dict[str, Any]:
        return self._request("POST", "/resume", {} if tags is None else {"tags": list(tags)})

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def memory(self) -> dict[str, Any]:
        return self._request("GET", "/memory")

    def metrics(self) -> str:
        return self._request("GET", "/metrics")

    # -- weights --------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: int,
                       partial: bool = False, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                       verify: LogprobProbe | None = None) -> dict[str, Any]:
        """Send the tensors as double-buffered buckets on the server's GPU (CPU: shared memory).

        One request per bucket, each answered once the server has copied it in place; the layout
        travels once, later updates of the same layout name it by id (see `BucketSender`). `verify`: a
        `LogprobProbe` of these weights (`colocate.model.make_probe`), scored by the server before it uses them.
        """
        if self._sender is None or self._sender.bucket_bytes != bucket_bytes:
            health = self.health()
            self._sender = BucketSender(_HttpTransport(self), device=device_for_uuid(health["device_uuid"]),
                                        dtype=parse_dtype(health["dtype"], "the server's dtype"),
                                        bucket_bytes=bucket_bytes)
        return self._sender.send(named_tensors, version=version, partial=partial, verify=verify)

    def update_weights_from_disk(self, path: str, *, version: int, partial: bool = False) -> dict[str, Any]:
        return self._request("POST", "/update_weights",
                             {"format": "safetensors", "path": str(path), "version": version, "partial": partial})

    def close(self) -> None:
        if self._sender is not None:
            self._sender.transport.close()
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _HttpTransport:
    """A BucketSender's way to the server: one POST per bucket message, sent in order from one thread,
    so the next bucket is filled while the server copies this one."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="colocate-client-buckets")

    def send_bucket(self, message: dict[str, Any]) -> Future:
        return self._thread.submit(self.client._request, "POST", "/update_weights",
                                   {"format": "ipc_bucket", "message": message})

    def abort_update(self) -> None:
        self.client._request("POST", "/update_weights/abort")

    def close(self) -> None:
        self._thread.shutdown(wait=True)
