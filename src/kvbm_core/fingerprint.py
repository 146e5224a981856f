"""What weights the engine serves, as a digest that joins every block's identity.

A block's KV depends on the weights, not only on the model's name: after a fine-tune saved to the
same path, a new checkpoint revision, or with two engines of different weights sharing a disk
directory, a key built from the model id alone would serve KV computed by other weights. The
fingerprint covers what the engine loads:

- the model directory TensorRT-LLM was given (``llm_args.model``), or the Hugging Face cache
  snapshot a repository id resolves to (``models--org--name/snapshots/<revision>``, the revision
  from ``refs/<revision or main>``);
- for every weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf``) and every
  ``*.json`` in it: its relative path and size, and its bytes: **sampled** (the default: the first
  and last 64 KiB and 16 evenly spaced 64 KiB pieces per file, a few MB for any checkpoint, which no
  fine-tune leaves unchanged) or **full** (every byte; seconds per GB of checkpoint).

Modification times are left out on purpose: a copy of the same checkpoint should match. When the
weights cannot be found, the fingerprint is bound to this process (:data:`PROCESS_NONCE`): blocks
written by an earlier process are then never served (restart reuse is lost, never correctness).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import xxhash

from kvbm_core.identity import PROCESS_NONCE

FingerprintMode = Literal["sampled", "full"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SAMPLE_BYTES = 64 << 10
SAMPLES_PER_FILE = 16
FULL_CHUNK = 16 << 20


@dataclass(frozen=True)
class Fingerprint:
    """The digest (32 hex digits), where it came from, and what computing it took."""

    digest: str
    source: str  # the directory hashed, or why none was
    files: int
    bytes_read: int
    seconds: float
    persistent: bool  # False: a random value (the weights were not found)


def fingerprint_weights(model: str, mode: FingerprintMode = "sampled", revision: str | None = None) -> Fingerprint:
    """The fingerprint of the weights ``model`` names (a directory, a file, or a Hugging Face repository id)."""
    began = time.perf_counter()
    root = resolve_weights(model, revision)
    if root is None:
        digest = xxhash.xxh3_128_hexdigest(f"{PROCESS_NONCE}\0{model}\0{revision}".encode())
        return Fingerprint(digest, f"{model!r} not found on this machine", 0, 0, time.perf_counter() - began,
                           persistent=False)
    digest = xxhash.xxh3_128()
    files = bytes_read = 0
    for path in _weight_files(root):
        relative = str(path.relative_to(root)) if path != root else path.name
        size = path.stat().st_size
        digest.update(f"{relative}\0{size}\0".encode())
        bytes_read += _hash_content(path, size, mode, digest)
        files += 1
    if files == 0:  # a path without weight files: nothing to vouch for across processes
        digest.update(PROCESS_NONCE.encode())
    return Fingerprint(digest.hexdigest(), str(root), files, bytes_read, time.perf_counter() - began,
                       persistent=files > 0)


def resolve_weights(model: str, revision: str | None = None) -> Path | None:
    """The local directory or file holding ``model``'s weights, or None."""
    if not model:
        return None
    local = Path(model).expanduser()
    if local.exists():
        return local
    if model.count("/") != 1:
        return None
    repo = Path(_hub_cache()) / ("models--" + model.replace("/", "--"))
    ref = repo / "refs" / (revision or "main")
    snapshot = ref.read_text().strip() if ref.is_file() else revision
    if snapshot and (repo / "snapshots" / snapshot).is_dir():
        return repo / "snapshots" / snapshot
    return None


def _hub_cache() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def _weight_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and (path.suffix in WEIGHT_SUFFIXES or path.suffix == ".json"):
            yield path


def _hash_content(path: Path, size: int, mode: FingerprintMode, digest: "xxhash.xxh3_128") -> int:
    """Fold ``path``'s bytes (all, or the samples) into ``digest``; returns the bytes read."""
    read = 0
    with open(path, "rb") as f:
        if mode == "full" or size <= SAMPLE_BYTES * (SAMPLES_PER_FILE + 2):
            while chunk := f.read(FULL_CHUNK):
                digest.update(chunk)
                read += len(chunk)
            return read
        step = (size - SAMPLE_BYTES) // (SAMPLES_PER_FILE + 1)
        for offset in [0, *(step * i for i in range(1, SAMPLES_PER_FILE + 1)), size - SAMPLE_BYTES]:
            f.seek(offset)
            chunk = f.read(SAMPLE_BYTES)
            digest.update(chunk)
            read += len(chunk)
    return read
