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
Why a record may not be served is a :class:`RecordFault`: a read reports its text per block, start-up
recovery counts its label.
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


class RecordFault(IntEnum):
    """Why a record may not be served (``OK``: it may). ``label`` names it in recovery reports."""

    OK = 0
    EMPTY = 1  # never written: the header page is zero
    TORN_HEADER = 2  # magic, version or header checksum wrong
    UNCOMMITTED = 3
    FOREIGN = 4  # another namespace or record geometry
    MISPLACED = 5  # stamped for another slot
    WRONG_KEY = 6
    UNKNOWN_CHECKSUM = 7
    DATA_CHECKSUM = 8  # the block's bytes fail their checksum

    @property
    def label(self) -> str:
        return self.name.lower()

    def describe(self, header: np.void) -> str:
        if self == RecordFault.MISPLACED:
            return f"record stamped for slot {int(header['slot'])}"
        if self == RecordFault.UNKNOWN_CHECKSUM:
            return f"unknown checksum kind {int(header['checksum_kind'])}"
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    RecordFault.OK: "intact",
    RecordFault.EMPTY: "no intact committed record (never written)",
    RecordFault.TORN_HEADER: "no intact committed record (torn or corrupted header)",
    RecordFault.UNCOMMITTED: "no intact committed record (not committed)",
    RecordFault.FOREIGN: "record of another namespace or layout",
    RecordFault.WRONG_KEY: "holds another block (key mismatch)",
    RecordFault.DATA_CHECKSUM: "block checksum mismatch (torn or corrupted)",
}


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
def xxh3_rows(rows: torch.Tensor, index: np.ndarray | None = None) -> np.ndarray:
    """xxh3_64 of each row (or of rows ``index``) of a host ``[k, n]`` uint8 tensor (rows contiguous).

    One call per row, on the row in place (no copy); xxhash releases the GIL while it hashes.
    """
    array = rows.numpy()
    picked = range(len(array)) if index is None else index.tolist()
    return np.fromiter((xxhash.xxh3_64_intdigest(array[i]) for i in picked), dtype=np.uint64, count=len(picked))


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


def checksum_rows(kind: ChecksumKind, rows: torch.Tensor, index: np.ndarray | None = None) -> np.ndarray:
    """Checksums of kind ``kind`` of the rows of ``rows`` (or of rows ``index`` only)."""
    if kind == ChecksumKind.XXH3_64:
        return xxh3_rows(rows, index)
    if index is not None and len(index) < len(rows):
        rows = rows[torch.from_numpy(index).to(rows.device)]
    return wsum64_rows(rows)


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
        h, faults = self._intact_faults(headers)
        return h, faults == RecordFault.OK

    def _intact_faults(self, headers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = headers.shape[0]
        h = np.ascontiguousarray(headers[:, : HEADER_DTYPE.itemsize]).view(HEADER_DTYPE).reshape(n)
        faults = np.full(n, RecordFault.OK, dtype=np.uint8)
        sound = (h["magic"] == MAGIC) & (h["version"] == VERSION)
        for i in np.flatnonzero(sound):  # one xxh3 per header the format needs; the rest is vectorized
            if xxhash.xxh3_64_intdigest(headers[i, :_CHECKED_BYTES]) != int(h["header_checksum"][i]):
                sound[i] = False
        empty = ~headers[:, : HEADER_DTYPE.itemsize].any(axis=1) if n else np.zeros(0, bool)
        faults[~sound] = RecordFault.TORN_HEADER
        faults[empty] = RecordFault.EMPTY
        faults[sound & ((h["flags"] & FLAG_COMMITTED) == 0)] = RecordFault.UNCOMMITTED
        return h, faults

    def foreign(self, h: np.ndarray) -> np.ndarray:
        """Intact headers that belong to another namespace or record geometry."""
        return (
            (h["namespace"][:, 0] != self._ns_words[0])
            | (h["namespace"][:, 1] != self._ns_words[1])
            | (h["header_bytes"] != HEADER_BYTES)
            | (h["record_bytes"] != self.record_bytes)
            | (h["data_bytes"] != self.bytes_per_block)
        )

    def header_faults(self, headers: np.ndarray, first_slot: int,
                      keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(parsed, faults)`` of consecutive slots from their headers alone (block checksums not
        yet verified). ``keys`` (``[k, 2]``) are the expected keys; ``None`` (recovery) takes any key."""
        h, faults = self._intact_faults(headers)
        n = len(h)
        unset = faults == RecordFault.OK
        for fault, hit in (
            (RecordFault.FOREIGN, self.foreign(h)),
            (RecordFault.MISPLACED, h["slot"] != np.arange(first_slot, first_slot + n, dtype=np.uint64)),
            (RecordFault.WRONG_KEY, None if keys is None else np.any(
                h["key"] != np.asarray(keys, dtype=np.uint64).reshape(n, 2), axis=1)),
            (RecordFault.UNKNOWN_CHECKSUM, ~np.isin(h["checksum_kind"], [int(c) for c in ChecksumKind])),
        ):
            if hit is not None:
                faults[unset & hit] = fault
                unset &= ~hit
        return h, faults

    def data_faults(self, h: np.ndarray, faults: np.ndarray, data: torch.Tensor) -> np.ndarray:
        """Mark :attr:`RecordFault.DATA_CHECKSUM` on records whose block bytes (``data[i]``) fail."""
        for kind in ChecksumKind:
            rows = np.flatnonzero((faults == RecordFault.OK) & (h["checksum_kind"] == int(kind)))
            if rows.size:
                sums = checksum_rows(kind, data, rows)
                faults[rows[sums != h["checksum"][rows]]] = RecordFault.DATA_CHECKSUM
        return faults

    def reasons(self, h: np.ndarray, faults: np.ndarray, first_slot: int) -> dict[int, str]:
        """A readable reason for each failed record, by position."""
        return {int(i): f"slot {first_slot + int(i)}: " + RecordFault(int(faults[i])).describe(h[i])
                for i in np.flatnonzero(faults != RecordFault.OK)}

    def check_headers(self, headers: np.ndarray, first_slot: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """Header checks for consecutive slots: ``(parsed, ok, reasons)``; checksums not yet verified."""
        k = len(keys)
        h, faults = self.header_faults(headers[:k], first_slot, keys)
        return h, faults == RecordFault.OK, self.reasons(h, faults, first_slot)

    def verify(self, headers: np.ndarray, data: torch.Tensor, first_slot: int, keys: np.ndarray) -> ReadCheck:
        """Full verification of consecutive records whose block bytes are in host ``data[:k]``."""
        k = len(keys)
        h, faults = self.header_faults(headers[:k], first_slot, keys)
        faults = self.data_faults(h, faults, data[:k])
        return ReadCheck(faults == RecordFault.OK, self.reasons(h, faults, first_slot))
