"""Fixtures of the hardening tests: a --weights-dir root holding checkpoint B, and servers that allow it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.servers import MODES, Served, serve, tokens


@pytest.fixture(scope="module")
def weights_root(checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder the servers allow disk updates from, holding a copy of checkpoint B as `b/`."""
    root = tmp_path_factory.mktemp("weights-root")
    shutil.copytree(checkpoints[1], root / "b")
    return root


@pytest.fixture(scope="module", params=MODES)
def rooted(request: pytest.FixtureRequest, checkpoints: tuple[Path, Path], weights_root: Path) -> Iterator[Served]:
    """A server on checkpoint A (in this process, or in a child) whose disk updates may read `weights_root`."""
    with serve(checkpoints[0], request.param, weights_dirs=[str(weights_root)]) as served:
        yield served


@pytest.fixture
def rooted_server(rooted: Served) -> Iterator[Served]:
    """`rooted`, put back on checkpoint A after the test (awake, no update open)."""
    yield rooted
    rooted.restore()


@pytest.fixture(scope="module")
def expected_b(rooted: Served, weights_root: Path) -> list[int]:
    """The greedy tokens of checkpoint B (read through the server, which is then put back on A)."""
    rooted.engine.update_weights_from_disk(str(weights_root / "b"))
    try:
        return tokens(rooted.url)
    finally:
        rooted.restore()
