"""Fixtures for tier tests: real filesystems mounted for a test.

``mount`` mounts a real filesystem (a size-limited or read-only tmpfs, a ramfs, a loop-mounted
ext4 without extents) under the test's temporary directory and unmounts it afterwards. Mounting
needs root with CAP_SYS_ADMIN (the CI machine has it); elsewhere those tests are skipped, saying why.

``shared_dir`` is a directory like ``/tmp`` (root's, world-writable, sticky) that every user can
reach, for the tests where another user acts (:mod:`userkit`).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    mounted: list[Path] = []

    def _mount(fstype: str, options: str = "", image_mb: int = 0, mkfs: list[str] | None = None) -> Path:
        target = tmp_path / f"mnt-{fstype}-{len(mounted)}"
        target.mkdir()
        source = fstype
        if image_mb:
            image = tmp_path / f"{target.name}.img"
            with open(image, "wb") as f:
                f.truncate(image_mb << 20)
            subprocess.run([*(mkfs or []), str(image)], check=True, capture_output=True)
            source, options = str(image), ",".join(filter(None, [options, "loop"]))
        cmd = ["mount", "-t", fstype] + (["-o", options] if options else []) + [source, str(target)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount {fstype} here ({proc.stderr.strip() or 'not permitted'}): needs root")
        mounted.append(target)
        return target

    yield _mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kvbm-shared-", dir=tempfile.gettempdir()))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
