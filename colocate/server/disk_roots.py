"""Which folders a disk weight update over HTTP may read: only those under roots the operator names."""

from __future__ import annotations

from pathlib import Path

from colocate.model.checkpoint import checkpoint_files


class DiskRoots:
    """The roots given with `colocate serve --weights-dir DIR` (repeatable); none: disk updates are refused.

    >>> roots = DiskRoots(["/ckpts"])
    >>> roots.resolve("/ckpts/step-100")        # Path('/ckpts/step-100'), symlinks and '..' resolved first
    >>> roots.resolve("/ckpts/../etc")          # PermissionError: outside every root
    A refusal never says whether the path exists: the answer is the same for any path outside the roots.
    """

    def __init__(self, roots: list[str] | tuple[str, ...] = ()) -> None:
        self.roots = tuple(Path(root).resolve(strict=False) for root in roots)
        for given, root in zip(roots, self.roots):
            if not root.is_dir():
                raise ValueError(f"--weights-dir {given!r} is not a folder")

    def resolve(self, path: str) -> Path:
        """The real path of `path` if it lies under a root; PermissionError otherwise (403 over HTTP)."""
        if not self.roots:
            raise PermissionError("disk weight updates are off on this server: start it with --weights-dir DIR "
                                  "(repeatable) to allow checkpoint folders under DIR")
        if "\x00" in path:
            raise ValueError("the path contains a NUL character")
        real = Path(path).resolve(strict=False)  # symlinks and '..' are followed before the check
        root = next((root for root in self.roots if real == root or root in real.parents), None)
        if root is None:
            raise PermissionError(f"{path!r} is not under a folder this server allows disk updates from "
                                  f"({', '.join(str(r) for r in self.roots)})")
        checkpoint_files(real, within=root)  # every shard a regular file under the root, before the engine reads
        return real
