"""The on-disk record format shared by the disk tier and the GDS tier (either reads what the other wrote).

A tier file is ``num_slots`` records and nothing else; record ``s`` starts at ``s * record_bytes``::

    [ header: 4096 bytes ][ block: bytes_per_block bytes ][ zero padding to a multiple of 4096 ]

so ``record_bytes = 4096 + round_up(bytes_per_block, 4096)`` (:func:`record_bytes`) and every record
and every block starts 4096-aligned (O_DIRECT and GPUDirect both need that). The header's first
104 bytes are :data:`HEADER_DTYPE` (little-endian); the rest of the page is zero:

====================  =====  ===========================================================
magic                 8      ``KVBMREC`` + format version byte
version, header_bytes 4+4    format version (1) and 4096
record_bytes          8      record size of the file's geometry
data_bytes            8      ``bytes_per_block``
namespace             16     the tier namespace mixed with the rank (:func:`rank_namespace`)
key                   16     the block's 128-bit identity (the leader's key)
slot                  8      the slot the record was written to (a misplaced record fails)
generation            8      write counter; at recovery the newest record of a key wins
checksum_kind, flags  4+4    :class:`ChecksumKind`; ``flags`` bit 0 = committed
checksum              8      checksum of the block bytes, of ``checksum_kind``
header_checksum       8      xxh3_64 of the 96 bytes before it
====================  =====  ===========================================================

Header and block are written together (one ``pwritev``). A crash mid-write leaves a header whose
``header_checksum`` fails, or whose ``checksum`` does not match the block: the read fails and the
block is never handed to the GPU. Checksums (:class:`ChecksumKind`):

- ``XXH3_64``: xxh3_64 of the block bytes, written by host paths (fast on a CPU, releases the GIL).
- ``WSUM64``: written by device paths (GPUDirect), computed on the GPU with one torch reduction:
  the block as little-endian int64 words ``w_i``, ``sum_i w_i * m_i mod 2**64`` where
  ``m_i = splitmix64(i) | 1``. The multipliers are odd, so every single-bit error changes the sum.

A reader verifies whichever kind the header names; the same functions run on host and device.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import torch
import xxhash

from kvbm_core.storage import ReadCheck

ALIGN = 4096
HEADER_BYTES = 4096
VERSION = 1
MAGIC = b"KVBMREC" + bytes([VERSION])
FLAG_COMMITTED = 1


class ChecksumKind(IntEnum):
    XXH3_64 = 1
    WSUM64 = 2


HEADER_DTYPE = np.dtype(
    [
        ("magic", "S8"),
        ("version", "<u4"),
        ("header_bytes", "<u4"),
        ("record_bytes", "<u8"),
        ("data_bytes", "<u8"),
        ("namespace", "<u8", (2,)),
        ("key", "<u8", (2,)),
        ("slot", "<u8"),
        ("generation", "<u8"),
        ("checksum_kind", "<u4"),
        ("flags", "<u4"),
        ("checksum", "<u8"),
        ("header_checksum", "<u8"),
    ]
)
_CHECKED_BYTES = HEADER_DTYPE.itemsize - 8


def round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def record_bytes(bytes_per_block: int) -> int:
    """On-disk bytes per slot: the 4096-byte header plus the block padded to 4096."""
    return HEADER_BYTES + round_up(bytes_per_block)


def rank_namespace(namespace: bytes, rank: int) -> bytes:
    """The 16-byte namespace stamped into this rank's records: ranks never read each other's file."""
    return xxhash.xxh3_128_digest(b"kvbm-disk-records\0" + namespace + int(rank).to_bytes(4, "little"))


# ------------------------------------------------------------------------------------ checksums
def xxh3_rows(rows: torch.Tensor) -> np.ndarray:
    """xxh3_64 of each row of a host ``[k, n]`` uint8 tensor (rows contiguous)."""
    return np.array([xxhash.xxh3_64_intdigest(row.numpy()) for row in rows], dtype=np.uint64)


_multipliers: dict[tuple[int, str], torch.Tensor] = {}
_multipliers_lock = threading.Lock()


def _wsum_multipliers(words: int, device: torch.device) -> torch.Tensor:
    key = (words, str(device))
    with _multipliers_lock:
        m = _multipliers.get(key)
        if m is None:
            with np.errstate(over="ignore"):
                z = (np.arange(1, words + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
                z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                z = z ^ (z >> np.uint64(31))
            z |= np.uint64(1)
            m = _multipliers[key] = torch.from_numpy(z.view(np.int64)).to(device)
        return m


def wsum64_rows(rows: torch.Tensor) -> np.ndarray:
    """WSUM64 of each row of a ``[k, n]`` uint8 tensor on any device (``n`` a multiple of 8)."""
    words = rows.view(torch.int64)
    sums = (words * _wsum_multipliers(words.shape[1], rows.device)).sum(dim=1, dtype=torch.int64)
    return sums.cpu().numpy().view(np.uint64)


def checksum_rows(kind: ChecksumKind, rows: torch.Tensor) -> np.ndarray:
    return xxh3_rows(rows) if kind == ChecksumKind.XXH3_64 else wsum64_rows(rows)


# -------------------------------------------------------------------------------------- headers
@dataclass(frozen=True)
class RecordFormat:
    """The record geometry and namespace of one rank's file."""

    bytes_per_block: int
    namespace: bytes
    _ns_words: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.namespace) != 16:
            raise ValueError(f"record namespace must be 16 bytes, got {len(self.namespace)}")
        object.__setattr__(self, "_ns_words", np.frombuffer(self.namespace, dtype="<u8").copy())

    @property
    def record_bytes(self) -> int:
        return record_bytes(self.bytes_per_block)

    def offset(self, slot: int) -> int:
        return int(slot) * self.record_bytes

    def stamp(self, headers: np.ndarray, first_slot: int, keys: np.ndarray, checksums: np.ndarray,
              kind: ChecksumKind, generations: np.ndarray) -> None:
        """Fill ``headers`` (``[k, HEADER_BYTES]`` uint8, rows contiguous) for consecutive slots."""
        k = len(keys)
        headers[:k, HEADER_DTYPE.itemsize:HEADER_BYTES] = 0
        h = headers[:k, : HEADER_DTYPE.itemsize].view(HEADER_DTYPE)[:, 0]
        h["magic"] = MAGIC
        h["version"] = VERSION
        h["header_bytes"] = HEADER_BYTES
        h["record_bytes"] = self.record_bytes
        h["data_bytes"] = self.bytes_per_block
        h["namespace"] = self._ns_words
        h["key"] = np.asarray(keys, dtype=np.uint64).reshape(k, 2)
        h["slot"] = np.arange(first_slot, first_slot + k, dtype=np.uint64)
        h["generation"] = generations
        h["checksum_kind"] = int(kind)
        h["flags"] = FLAG_COMMITTED
        h["checksum"] = checksums
        for i in range(k):
            h["header_checksum"][i] = xxhash.xxh3_64_intdigest(headers[i, :_CHECKED_BYTES])

    def parse(self, headers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Structured headers of ``[n, >=104]`` uint8 rows, and which are intact and committed.

        Intact: magic, version, header checksum and the committed flag hold. Such a record may still
        belong to another namespace or geometry (:meth:`foreign`).
        """
        n = headers.shape[0]
        h = np.ascontiguousarray(headers[:, : HEADER_DTYPE.itemsize]).view(HEADER_DTYPE)[:, 0]
        intact = (h["magic"] == MAGIC) & (h["version"] == VERSION) & ((h["flags"] & FLAG_COMMITTED) != 0)
        for i in np.flatnonzero(intact):
            if xxhash.xxh3_64_intdigest(headers[i, :_CHECKED_BYTES]) != int(h["header_checksum"][i]):
                intact[i] = False
        return h, intact if n else np.zeros(0, bool)

    def foreign(self, h: np.ndarray) -> np.ndarray:
        """Intact headers that belong to another namespace or record geometry."""
        return (
            (h["namespace"][:, 0] != self._ns_words[0])
            | (h["namespace"][:, 1] != self._ns_words[1])
            | (h["header_bytes"] != HEADER_BYTES)
            | (h["record_bytes"] != self.record_bytes)
            | (h["data_bytes"] != self.bytes_per_block)
        )

    def check_headers(self, headers: np.ndarray, first_slot: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """Header checks for consecutive slots: ``(parsed, ok, reasons)``; checksums not yet verified."""
        k = len(keys)
        h, intact = self.parse(headers[:k])
        keys = np.asarray(keys, dtype=np.uint64).reshape(k, 2)
        reasons: dict[int, str] = {}
        foreign = self.foreign(h)
        wrong_slot = h["slot"] != np.arange(first_slot, first_slot + k, dtype=np.uint64)
        wrong_key = (h["key"][:, 0] != keys[:, 0]) | (h["key"][:, 1] != keys[:, 1])
        bad_kind = ~np.isin(h["checksum_kind"], [int(c) for c in ChecksumKind])
        for i in range(k):
            slot = first_slot + i
            if not intact[i]:
                reasons[i] = f"slot {slot}: no intact committed record (never written, torn or corrupted header)"
            elif foreign[i]:
                reasons[i] = f"slot {slot}: record of another namespace or layout"
            elif wrong_slot[i]:
                reasons[i] = f"slot {slot}: record stamped for slot {int(h['slot'][i])}"
            elif wrong_key[i]:
                reasons[i] = f"slot {slot}: holds another block (key mismatch)"
            elif bad_kind[i]:
                reasons[i] = f"slot {slot}: unknown checksum kind {int(h['checksum_kind'][i])}"
        ok = np.ones(k, dtype=bool)
        ok[list(reasons)] = False
        return h, ok, reasons

    def verify(self, headers: np.ndarray, data: torch.Tensor, first_slot: int, keys: np.ndarray) -> ReadCheck:
        """Full verification of consecutive records whose block bytes are in host ``data[:k]``."""
        h, ok, reasons = self.check_headers(headers, first_slot, keys)
        for kind in ChecksumKind:
            rows = np.flatnonzero(ok & (h["checksum_kind"] == int(kind)))
            if rows.size == 0:
                continue
            sums = checksum_rows(kind, data[torch.from_numpy(rows)] if rows.size < len(keys) else data[: len(keys)])
            for i in rows[sums != h["checksum"][rows]]:
                ok[i] = False
                reasons[int(i)] = f"slot {first_slot + int(i)}: block checksum mismatch (torn or corrupted)"
        return ReadCheck(ok, reasons)
