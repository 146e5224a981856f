"""The weights fingerprint: what joins a block's identity besides the model id."""

from __future__ import annotations

import os
import shutil

import pytest

from kvbm_core.fingerprint import SAMPLE_BYTES, fingerprint_weights, resolve_weights

SIZE = 4 << 20  # large enough to be sampled


@pytest.fixture
def checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "model-00001.safetensors").write_bytes(os.urandom(SIZE))
    (root / "config.json").write_text('{"hidden_size": 64}')
    (root / "README.md").write_text("not weights")
    return root


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_copy_matches_and_a_fine_tune_does_not(checkpoint, tmp_path):
    first = fingerprint_weights(str(checkpoint))
    assert first.persistent and first.files == 2 and first.bytes_read < SIZE
    copy = tmp_path / "copy"
    shutil.copytree(checkpoint, copy)  # other path, other mtimes: same weights
    assert fingerprint_weights(str(copy)).digest == first.digest
    (copy / "README.md").write_text("edited")  # not a weight or config file
    assert fingerprint_weights(str(copy)).digest == first.digest
    flip(copy / "model-00001.safetensors", 0)  # inside the first sampled piece
    assert fingerprint_weights(str(copy)).digest != first.digest


def test_full_mode_sees_every_byte_sampled_mode_does_not(checkpoint):
    sampled, full = fingerprint_weights(str(checkpoint)), fingerprint_weights(str(checkpoint), "full")
    assert full.bytes_read >= SIZE
    flip(checkpoint / "model-00001.safetensors", SAMPLE_BYTES + 1)  # between the first two samples
    assert fingerprint_weights(str(checkpoint)).digest == sampled.digest
    assert fingerprint_weights(str(checkpoint), "full").digest != full.digest


def test_config_and_size_changes_are_seen(checkpoint):
    before = fingerprint_weights(str(checkpoint)).digest
    (checkpoint / "config.json").write_text('{"hidden_size": 65}')
    after_config = fingerprint_weights(str(checkpoint)).digest
    with open(checkpoint / "model-00001.safetensors", "ab") as f:
        f.write(b"\0")
    assert len({before, after_config, fingerprint_weights(str(checkpoint)).digest}) == 3


def test_a_hugging_face_id_resolves_to_its_cached_snapshot(checkpoint, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    repo = hub / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    shutil.copytree(checkpoint, repo / "snapshots" / "abc123")
    shutil.copytree(checkpoint, repo / "snapshots" / "def456")
    flip(repo / "snapshots" / "def456" / "model-00001.safetensors", 0)
    (repo / "refs" / "main").write_text("abc123\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert resolve_weights("org/name") == repo / "snapshots" / "abc123"
    assert fingerprint_weights("org/name").digest == fingerprint_weights(str(checkpoint)).digest
    assert fingerprint_weights("org/name", revision="def456").digest != fingerprint_weights("org/name").digest


def test_weights_that_cannot_be_found_are_bound_to_this_process(tmp_path):
    missing = fingerprint_weights("no-org/no-model")
    assert not missing.persistent and "not found" in missing.source
    assert fingerprint_weights("no-org/no-model").digest == missing.digest  # stable within the process
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not fingerprint_weights(str(empty)).persistent
