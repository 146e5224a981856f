"""What a configuration may ask of this machine, checked when settings are resolved.

A size that can never fit fails here, with one line naming the variable or YAML key, instead of as
an ``OverflowError`` or ``MemoryError`` inside the engine:

- a host-level tier is at most this machine's physical memory (GB are per engine instance, summed
  over its TP ranks, which share the machine);
- a disk-level tier is at most the size of the filesystem that holds its directory (or, for a
  directory that does not exist yet, its nearest existing parent), and never more than one file can
  hold (2^63 - 1 bytes) when the tier picks its own directory;
- a block count is bounded the same way, at :data:`MIN_BLOCK_BYTES` per block (the exact size is
  known only once the model's layout is).

Free space is not checked here: it changes while the engine runs. ``kvbm doctor`` fails a disk tier
larger than the free space, and the disk tier refuses to start with one (a ``StorageError``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from kvbm_core.errors import ConfigError
from kvbm_core.interfaces import TierLevel
from kvbm_core.settings.model import KvbmSettings, TierSpec

MIN_BLOCK_BYTES = 128
"""The smallest KV block: one token of one layer, K and V at head size 64 in 8 bits."""

MAX_FILE_BYTES = 2**63 - 1


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def existing_ancestor(directory: str) -> Path:
    """``directory`` itself when it exists, else its nearest existing parent."""
    path = Path(directory).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def filesystem_bytes(directory: str) -> int:
    """Total size of the filesystem that holds (or will hold) ``directory``; 0 when it reports none."""
    vfs = os.statvfs(existing_ancestor(directory))
    return vfs.f_blocks * vfs.f_frsize


def check_tier_sizes(settings: KvbmSettings, level_of: Callable[[str], TierLevel], name_of: Callable[[str, str], str]) -> None:
    """Raise :class:`ConfigError` for a tier sized beyond what this machine has.

    ``level_of(kind)`` is a tier kind's level; ``name_of(kind, field)`` names the variable or YAML key
    that set ``capacity_gb`` or ``num_blocks`` of that tier, for the error.
    """
    for spec in settings.tiers:
        level = level_of(spec.kind)
        if level == TierLevel.HOST:
            _check(spec, physical_memory_bytes(), "this machine's physical memory", name_of)
        elif level == TierLevel.DISK:
            directory = spec.options.get("directory") or settings.disk.directory
            if directory is None:
                _check(spec, MAX_FILE_BYTES, "the largest file a filesystem can hold", name_of)
                continue
            size = filesystem_bytes(str(directory))
            if size:
                _check(spec, size, f"the filesystem that holds {directory}", name_of)


def _check(spec: TierSpec, limit: int, what: str, name_of: Callable[[str, str], str]) -> None:
    if spec.capacity_gb is not None and spec.capacity_gb * 1e9 > limit:
        raise ConfigError(
            name_of(spec.kind, "capacity_gb"),
            f"{spec.capacity_gb:g} GB for the {spec.kind} tier is more than {what} ({limit / 1e9:.1f} GB)",
            f"a size in GB up to {limit / 1e9:.1f}",
        )
    if spec.num_blocks is not None and spec.num_blocks * MIN_BLOCK_BYTES > limit:
        most = limit // MIN_BLOCK_BYTES
        raise ConfigError(
            name_of(spec.kind, "num_blocks"),
            f"{spec.num_blocks} blocks for the {spec.kind} tier cannot fit in {what} "
            f"({limit / 1e9:.1f} GB) at {MIN_BLOCK_BYTES} bytes or more per block",
            f"a whole number up to {most}",
        )
