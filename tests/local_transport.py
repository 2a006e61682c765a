"""A BucketSender's messages straight into an importer of this process: the engine side without the pipe."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from colocate.weight_sync import BucketImporter, open_bucket


class LocalTransport:
    """Delivers each message to `importer.load`; `corrupt(buffer)` may change bucket 0's bytes on the way (after
    the producer's checksum, before the engine's copy), as a torn or flipped transfer would."""

    def __init__(self, importer: BucketImporter, corrupt: Callable[[torch.Tensor], None] | None = None) -> None:
        self.importer, self.corrupt = importer, corrupt

    def send_bucket(self, message: dict[str, Any]) -> Future:
        future: Future = Future()
        try:
            if self.corrupt is not None and message["index"] == 0:
                with open_bucket(message["handle"], nbytes=message["handle"]["nbytes"], device="cpu") as seen:
                    self.corrupt(seen.buffer)
            future.set_result(self.importer.load(message))
        except Exception as e:  # noqa: BLE001 - delivered to the sender as the engine's answer
            future.set_exception(e)
        return future

    def abort_update(self) -> None:
        self.importer.abort()
