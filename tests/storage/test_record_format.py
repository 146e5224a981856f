"""The on-disk record format: stamping, verification, and every way a record can be wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_tier_disk.format import (
    FLAG_COMMITTED,
    HEADER_BYTES,
    HEADER_DTYPE,
    ChecksumKind,
    RecordFormat,
    checksum_rows,
    rank_namespace,
    record_bytes,
    wsum64_rows,
)

BPB = 8000
FMT = RecordFormat(BPB, rank_namespace(bytes(16), 0))


def _records(k: int, kind: ChecksumKind, first_slot: int = 10, seed: int = 0) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    records = np.zeros((k, FMT.record_bytes), dtype=np.uint8)
    data = torch.from_numpy(records)[:, HEADER_BYTES:HEADER_BYTES + BPB]
    data.copy_(torch.randint(0, 256, (k, BPB), dtype=torch.uint8, generator=gen))
    keys = np.arange(2 * k, dtype=np.uint64).reshape(k, 2) + np.uint64(1000 * seed)
    FMT.stamp(records[:, :HEADER_BYTES], first_slot, keys, checksum_rows(kind, data), kind,
              np.arange(1, k + 1, dtype=np.uint64))
    return records, data, keys


def test_geometry() -> None:
    assert record_bytes(8000) == 4096 + 8192 and record_bytes(8192) == 4096 + 8192
    assert HEADER_DTYPE.itemsize == 104
    assert FMT.offset(3) == 3 * FMT.record_bytes
    assert rank_namespace(bytes(16), 0) != rank_namespace(bytes(16), 1)
    assert rank_namespace(bytes(16), 0) != rank_namespace(bytes(15) + b"\1", 0)


@pytest.mark.parametrize("kind", list(ChecksumKind))
def test_intact_records_verify(kind: ChecksumKind) -> None:
    records, data, keys = _records(4, kind)
    check = FMT.verify(records[:, :HEADER_BYTES], data, 10, keys)
    assert check.all_ok and check.reasons == {}
    h, intact = FMT.parse(records[:, :HEADER_BYTES])
    assert intact.all() and (h["slot"] == np.arange(10, 14)).all() and (h["flags"] == FLAG_COMMITTED).all()


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(list(ChecksumKind)), record=st.integers(0, 2), byte=st.integers(0, BPB - 1),
       bit=st.integers(0, 7))
def test_any_flipped_data_bit_fails_only_its_record(kind: ChecksumKind, record: int, byte: int, bit: int) -> None:
    records, data, keys = _records(3, kind)
    data[record, byte] ^= 1 << bit
    check = FMT.verify(records[:, :HEADER_BYTES], data, 10, keys)
    assert check.ok.tolist() == [i != record for i in range(3)]
    assert "checksum mismatch" in check.reasons[record]


@settings(max_examples=40, deadline=None)
@given(byte=st.integers(0, HEADER_DTYPE.itemsize - 1), bit=st.integers(0, 7))
def test_any_flipped_header_bit_fails(byte: int, bit: int) -> None:
    records, data, keys = _records(2, ChecksumKind.XXH3_64)
    records[1, byte] ^= 1 << bit
    check = FMT.verify(records[:, :HEADER_BYTES], data, 10, keys)
    assert check.ok.tolist() == [True, False]


def test_wrong_key_slot_namespace_or_unwritten_fail() -> None:
    records, data, keys = _records(4, ChecksumKind.XXH3_64)
    other_keys = keys.copy()
    other_keys[0, 1] += np.uint64(1)
    check = FMT.verify(records[:, :HEADER_BYTES], data, 10, other_keys)
    assert check.ok.tolist() == [False, True, True, True] and "key mismatch" in check.reasons[0]

    check = FMT.verify(records[:, :HEADER_BYTES], data, 11, keys)  # records read at the wrong offset
    assert not check.ok.any() and "stamped for slot" in check.reasons[0]

    foreign = RecordFormat(BPB, rank_namespace(bytes(16), 1))
    check = foreign.verify(records[:, :HEADER_BYTES], data, 10, keys)
    assert not check.ok.any() and "another namespace" in check.reasons[0]

    records[2, :HEADER_BYTES] = 0  # never written
    check = FMT.verify(records[:, :HEADER_BYTES], data, 10, keys)
    assert check.ok.tolist() == [True, True, False, True] and "no intact committed record" in check.reasons[2]


def test_torn_record_fails() -> None:
    old, _, old_keys = _records(1, ChecksumKind.XXH3_64, seed=1)
    new, _, new_keys = _records(1, ChecksumKind.XXH3_64, seed=2)
    torn = old.copy()
    cut = HEADER_BYTES + BPB // 2  # new header and the first half of the new block reached the disk
    torn[:, :cut] = new[:, :cut]
    data = torch.from_numpy(torn)[:, HEADER_BYTES:HEADER_BYTES + BPB]
    for keys in (new_keys, old_keys):
        assert not FMT.verify(torn[:, :HEADER_BYTES], data, 10, keys).ok.any()


def test_wsum64_is_order_free_and_sees_word_swaps() -> None:
    rows = torch.randint(0, 256, (2, 4096), dtype=torch.uint8)
    sums = wsum64_rows(rows)
    assert sums.dtype == np.uint64 and sums[0] != sums[1]
    swapped = rows.clone()
    swapped[0, :8], swapped[0, 8:16] = rows[0, 8:16].clone(), rows[0, :8].clone()
    if not torch.equal(rows[0, :8], rows[0, 8:16]):
        assert wsum64_rows(swapped)[0] != sums[0]
    # The same bytes in a strided view (a staging lane) sum the same.
    lane = torch.zeros(2, 8192, dtype=torch.uint8)
    lane[:, 4096:] = rows
    assert (wsum64_rows(lane[:, 4096:]) == sums).all()
