"""`Client`: drive a `colocate serve` server from a trainer in another process (HTTP + CUDA IPC buckets)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from colocate.engine import SamplingParams
from colocate.weight_sync import SUPPORTED_DTYPES, export_manifest


class ServerError(RuntimeError):
    """The server answered with an error; `status` is the HTTP code (503 means retry later)."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.retry_after_s = status, retry_after_s


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

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._http.request(method, path, json=body)
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            retry = response.headers.get("Retry-After")
            raise ServerError(response.status_code, message, float(retry) if retry else None)
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
                       bucket_bytes: int = 512 << 20) -> dict[str, Any]:
        """Export the tensors as buckets on the server's GPU (CPU: shared memory) and send their manifest.

        The buckets stay alive until the server has answered: it copies them in place before
        replying. Peak extra memory here is the whole set (one HTTP request carries every handle).
        """
        health = self.health()
        dtype, uuid = health["dtype"], health["device_uuid"]
        tensors = list(named_tensors)
        if not tensors:
            raise ValueError("update_weights got no tensors")
        manifest, buckets = export_manifest(tensors, dtype=SUPPORTED_DTYPES[dtype], device=_device_for(uuid),
                                            bucket_bytes=bucket_bytes, version=version)
        try:
            return self._request("POST", "/update_weights",
                                 {"format": "ipc", "manifest": manifest.to_dict(), "version": version})
        finally:
            for bucket in buckets:
                bucket.release()

    def update_weights_from_disk(self, path: str, *, version: int) -> dict[str, Any]:
        return self._request("POST", "/update_weights", {"format": "safetensors", "path": str(path), "version": version})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _device_for(uuid: str) -> torch.device:
    if uuid == "cpu":
        return torch.device("cpu")
    from colocate.weight_sync import device_uuid

    for index in range(torch.cuda.device_count()):
        if device_uuid(torch.device("cuda", index)) == uuid:
            return torch.device("cuda", index)
    raise ValueError(f"the server's GPU ({uuid}) is not visible to this process; CUDA IPC needs the same GPU")
