"""Fixtures for tier tests (``mount``, real filesystems, is in the top-level conftest).

``shared_dir`` is a directory like ``/tmp`` (root's, world-writable, sticky) that every user can
reach, for the tests where another user acts (:mod:`userkit`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kvbm-shared-", dir=tempfile.gettempdir()))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
