"""POSIX shared-memory segments for CPU buckets: ours by name and by token, attached without ever owning them.

A segment is named `colocate_<16 hex>` and starts with a header: a magic string and a random token
that the producer also puts in the handle. A consumer opens only names of that form, only regular
files, maps them without the standard library's SharedMemory (which unlinks the file when a map
fails, even one it did not create), and checks the token: a manifest cannot point it at another
process's segment, a FIFO, or a file it was not given.
"""

from __future__ import annotations

import contextlib
import hmac
import mmap
import os
import re
import secrets
import stat
from multiprocessing.shared_memory import SharedMemory

import torch

from colocate.memory.layout import ALIGN_BYTES
from colocate.weight_sync.strict_json import short

_NAME = re.compile(r"/?(colocate_[0-9a-f]{16})")
_TOKEN = re.compile(r"[0-9a-f]{32}")
_MAGIC = b"colocate-bucket\x00"
HEADER_BYTES = ALIGN_BYTES  # magic, token; the data starts aligned after it
_SHM_DIR = "/dev/shm"


def check_segment_name(name: object, path: str) -> str:
    """The name without its leading '/', if it is one colocate makes; else ValueError naming `path`."""
    match = _NAME.fullmatch(name) if type(name) is str else None
    if match is None:
        raise ValueError(f"{path}: expected a colocate shared memory name (colocate_ and 16 hex digits), "
                         f"got {short.repr(name)}")
    return match.group(1)


def check_token(token: object, path: str) -> str:
    if type(token) is not str or not _TOKEN.fullmatch(token):
        raise ValueError(f"{path}: expected 32 hex digits, got {short.repr(token)}")
    return token


class Segment:
    """One mapped segment: the producer's (`create`, owns the name) or a consumer's (`attach`)."""

    def __init__(self, name: str, token: str, mapping: mmap.mmap | None, owned: SharedMemory | None) -> None:
        self.name, self.token = name, token
        self._mmap = mapping
        self._owned = owned  # the producer's SharedMemory: the one that may unlink the name

    @classmethod
    def create(cls, nbytes: int) -> tuple[Segment, torch.Tensor]:
        """A new segment with a fresh token, and a uint8 [nbytes] tensor over its data."""
        name, token = f"colocate_{secrets.token_hex(8)}", secrets.token_hex(16)
        owned = SharedMemory(name=name, create=True, size=HEADER_BYTES + max(nbytes, 1))
        owned.buf[:len(_MAGIC) + 32] = _MAGIC + token.encode()
        segment = cls(name, token, None, owned)
        return segment, segment._tensor(owned.buf, nbytes)

    @classmethod
    def attach(cls, name: str, token: str, nbytes: int, *, producer_pid: int) -> tuple[Segment, torch.Tensor]:
        """Map another process's segment; ValueError unless it is a regular file with our header and token."""
        try:
            fd = os.open(os.path.join(_SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise RuntimeError(f"could not open the bucket: shared memory {name!r} is gone; the producer process "
                               f"(pid {producer_pid}) may have exited or released it") from e
        except OSError as e:  # a symlink (ELOOP), no permission, ...
            raise ValueError(f"shared memory {name!r} cannot be opened as a bucket ({e.strerror})") from e
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"shared memory {name!r} is not a regular file; refused")
            if info.st_size < HEADER_BYTES + nbytes:
                raise ValueError(f"truncated bucket: shared memory {name!r} holds {max(info.st_size - HEADER_BYTES, 0)}"
                                 f" bytes of data, the bucket layout needs {nbytes}")
            mapping = mmap.mmap(fd, HEADER_BYTES + max(nbytes, 1))
        finally:
            os.close(fd)
        header = mapping[:len(_MAGIC) + 32]
        if header[:len(_MAGIC)] != _MAGIC or not hmac.compare_digest(header[len(_MAGIC):], token.encode()):
            mapping.close()
            raise ValueError(f"shared memory {name!r} does not carry the handle's token: not the producer's bucket")
        segment = cls(name, token, mapping, None)
        return segment, segment._tensor(memoryview(mapping), nbytes)

    @staticmethod
    def _tensor(buf: memoryview, nbytes: int) -> torch.Tensor:
        # A slice of the buffer, not the buffer itself: it holds an export on the mapping for as long as the
        # tensor (and every view of it) lives, so closing the segment under a live view raises BufferError
        # (handled in close) instead of unmapping memory the view still points to.
        return torch.frombuffer(buf[HEADER_BYTES:HEADER_BYTES + max(nbytes, 1)], dtype=torch.uint8)[:nbytes]

    def close(self, *, unlink: bool) -> None:
        """Unmap once no view points into the mapping any more; the producer (`unlink=True`) removes the name."""
        if self._owned is not None:
            if unlink:
                # The name goes now; the memory goes with the last mapping (a consumer still copying keeps it).
                with contextlib.suppress(FileNotFoundError):
                    self._owned.unlink()
            try:
                self._owned.close()
            except BufferError:
                # Views still point into the mapping: hand it over to them (unmapped when the last goes).
                self._owned._mmap = None  # type: ignore[attr-defined]
                self._owned.close()
            return
        assert not unlink, "a consumer never unlinks a segment it did not create"
        mapping, self._mmap = self._mmap, None
        if mapping is not None:
            with contextlib.suppress(BufferError):  # views still alive: they keep the mapping until they go
                mapping.close()
