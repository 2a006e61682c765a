"""The trainer's disk tier: one file of a released trainer's bytes, written and read through two pinned chunks."""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path

import torch

class DiskTier:
    """One file in `folder` holding a released trainer's bytes; removed when read back, or at exit.

    The file is the flat layout of the released tensors (each at its aligned offset). Tensors on a GPU
    go through two pinned bounce buffers of `CHUNK` bytes: the copy of the next chunk to (or from) the
    device overlaps the write (or read) of this one, and host memory stays at two chunks however large
    the state is. Host tensors are written and read in place. The disk's sequential speed is the limit.
    """

    CHUNK = 64 << 20

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"disk_dir={str(folder)!r} is not a folder")
        if not os.access(self.folder, os.W_OK):
            raise ValueError(f"disk_dir={str(folder)!r} is not writable")
        self.path: Path | None = None
        self._remove = weakref.finalize(self, DiskTier._unlink, [None])  # replaced on each write
        self._bounce: list[torch.Tensor] = []  # two pinned chunks, made at the first GPU transfer
        self._stream: torch.cuda.Stream | None = None

    def _bounce_for(self, device: torch.device) -> tuple[list[torch.Tensor], torch.cuda.Stream, list]:
        if not self._bounce:
            self._bounce = [torch.empty(self.CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self._stream = torch.cuda.Stream(device)
        return self._bounce, self._stream, [torch.cuda.Event() for _ in range(2)]

    def write_tensors(self, tensors: list[torch.Tensor], offsets: list[int], total: int) -> None:
        """Write each tensor at its byte offset of a new file of `total` bytes."""
        fd, name = tempfile.mkstemp(prefix="colocate-trainer-", suffix=".bin", dir=self.folder)
        self.path = Path(name)
        self._remove.detach()
        self._remove = weakref.finalize(self, DiskTier._unlink, [self.path])
        try:
            os.ftruncate(fd, total)
            pieces = [(flat[i:i + self.CHUNK], offset + i) for t, offset in zip(tensors, offsets)
                      for flat in [t.detach().contiguous().reshape(-1).view(torch.uint8)]
                      for i in range(0, flat.numel(), self.CHUNK)]
            cuda = [p for p, _ in pieces if p.is_cuda]
            if not cuda:
                for piece, at in pieces:
                    _pwrite_all(fd, memoryview(piece.numpy()), at)
                return
            bounce, stream, done = self._bounce_for(cuda[0].device)
            stream.wait_stream(torch.cuda.current_stream(cuda[0].device))  # the tensors' last writes first

            def fetch(k: int) -> None:
                piece = pieces[k][0]
                with torch.cuda.stream(stream):
                    bounce[k % 2][:piece.numel()].copy_(piece, non_blocking=True)
                    done[k % 2].record(stream)

            fetch(0)
            for k, (piece, at) in enumerate(pieces):
                if k + 1 < len(pieces):
                    fetch(k + 1)  # its buffer's last write (piece k - 1) has returned
                done[k % 2].synchronize()
                _pwrite_all(fd, memoryview(bounce[k % 2][:piece.numel()].numpy()), at)
        finally:
            os.close(fd)

    def read_into(self, buffer: torch.Tensor) -> None:
        """Read the whole file into a uint8 `buffer` (device or host) of its size; then the file goes."""
        assert self.path is not None, "nothing was written"
        total = buffer.numel()
        with open(self.path, "rb", buffering=0) as f:
            if not buffer.is_cuda:
                _readinto_all(f, memoryview(buffer.numpy()), self.path)
            else:
                bounce, stream, done = self._bounce_for(buffer.device)
                stream.wait_stream(torch.cuda.current_stream(buffer.device))  # the buffer is allocated
                for k, start in enumerate(range(0, total, self.CHUNK)):
                    n = min(self.CHUNK, total - start)
                    if k >= 2:
                        done[k % 2].synchronize()  # this bounce buffer's last copy to the device is done
                    _readinto_all(f, memoryview(bounce[k % 2][:n].numpy()), self.path)
                    with torch.cuda.stream(stream):
                        buffer[start:start + n].copy_(bounce[k % 2][:n], non_blocking=True)
                        done[k % 2].record(stream)
                torch.cuda.current_stream(buffer.device).wait_stream(stream)
                stream.synchronize()  # the bounce buffers are free for the next transfer
        self._remove()  # read back: the file goes
        self.path = None

    def remove(self) -> None:
        """Delete the file now, if there is one."""
        self._remove()
        self.path = None

    @staticmethod
    def _unlink(paths: list[Path | None]) -> None:
        for path in paths:
            if path is not None:
                Path(path).unlink(missing_ok=True)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    data = data.cast("B")
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _readinto_all(f, data: memoryview, path: Path) -> None:
    data, want, done = data.cast("B"), len(data.cast("B")), 0
    while done < want:
        n = f.readinto(data[done:])
        if not n:
            raise OSError(f"{path} ended after {done} of {want} bytes")
        done += n
