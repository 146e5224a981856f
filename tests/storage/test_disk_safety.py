"""What another user on the host can do to the disk tier's file: nothing.

The tier file holds every prompt's KV and is served to the GPU. Each attack here is carried out for
real by an unprivileged user (``nobody``, see :mod:`userkit`) against a tier run by root, on this
host's own kernel (``fs.protected_symlinks`` and ``fs.protected_hardlinks`` are not relied on), and
kvbm itself runs as an unprivileged user too.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from kvbm_core.errors import StorageError
from kvbm_tier_disk import LocalDiskTier

from tierkit import NAMESPACE, make_context
from userkit import as_user, attempt, other_user

FILE_NAME = f"kvbm-{NAMESPACE.hex()}-rank0.blocks"


def _keys(n: int, base: int = 1) -> np.ndarray:
    return (np.arange(2 * n, dtype=np.uint64) + np.uint64(base)).reshape(n, 2)


def _write(tier: LocalDiskTier, first_slot: int, keys: np.ndarray) -> torch.Tensor:
    rows = torch.randint(0, 256, (len(keys), tier.bytes_per_block), dtype=torch.uint8)
    lane = tier.lanes.acquire(1.0)
    try:
        tier.write_rows(rows, first_slot, keys, tier.lanes.lane(lane))
    finally:
        tier.lanes.release(lane)
    return rows


def _forged_file(tmp_path: Path) -> bytes:
    """A whole tier file of our namespace whose records all carry valid checksums (the real format)."""
    source = tmp_path / "forger"
    tier = LocalDiskTier(make_context("disk", 4, source))
    _write(tier, 0, _keys(4))
    tier.close()
    return Path(tier.path).read_bytes()


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------------------- directory
def test_no_directory_configured_uses_a_private_cache_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    tier = LocalDiskTier(make_context("disk", 4, None))
    directory = tmp_path / "xdg" / "kvbm"
    assert Path(tier.path) == directory / FILE_NAME
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tier.path).st_mode) == 0o600
    tier.close()

    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    tier = LocalDiskTier(make_context("disk", 4, None))
    assert Path(tier.path) == tmp_path / "home" / ".cache" / "kvbm" / FILE_NAME
    tier.close()


def test_without_a_usable_home_the_default_is_a_per_user_temp_directory(tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(blocker / "home"))  # cannot be created
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tier = LocalDiskTier(make_context("disk", 4, None))
    directory = tmp_path / f"kvbm-{os.geteuid()}"
    assert Path(tier.path) == directory / FILE_NAME
    assert directory.stat().st_uid == os.geteuid() and stat.S_IMODE(directory.stat().st_mode) == 0o700
    tier.close()


@pytest.mark.parametrize("plant", ["directory", "symlink"])
def test_per_user_temp_directory_planted_by_another_user_is_refused(shared_dir: Path, tmp_path: Path, monkeypatch,
                                                                     plant: str) -> None:
    attacker = other_user()
    target = shared_dir / f"kvbm-{os.geteuid()}"
    lure = shared_dir / "lure"

    def squat() -> None:
        if plant == "directory":
            os.mkdir(target, 0o777)
        else:
            os.mkdir(lure, 0o777)
            os.symlink(lure, target)

    assert attempt(attacker, squat) == "ok"
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "file" / "home"))
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(shared_dir))
    with pytest.raises(StorageError) as info:
        LocalDiskTier(make_context("disk", 4, None))
    text = _one_line(info)
    assert "DYN_KVBM_DISK_CACHE_DIR" in text and str(target) in text
    assert ("belongs to uid 65534" in text) if plant == "directory" else ("symbolic link" in text)
    assert not list((lure if plant == "symlink" else target).iterdir())  # nothing created in the attacker's directory


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_directory_others_can_write_without_sticky_bit_is_refused(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "cache"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(StorageError) as info:
        LocalDiskTier(make_context("disk", 4, directory))
    text = _one_line(info)
    assert "DYN_KVBM_DISK_CACHE_DIR" in text and str(directory) in text
    assert f"writable by other users (mode {mode:04o})" in text
    assert not list(directory.iterdir())


def test_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    owner = other_user()
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o755)
    os.chown(directory, owner.pw_uid, owner.pw_gid)
    with pytest.raises(StorageError) as info:
        LocalDiskTier(make_context("disk", 4, directory))
    text = _one_line(info)
    assert "DYN_KVBM_DISK_CACHE_DIR" in text and "belongs to uid 65534 (nobody)" in text
    assert not list(directory.iterdir())


def test_sticky_shared_directory_is_accepted_and_other_users_cannot_touch_the_file(shared_dir: Path) -> None:
    """A root-owned sticky directory (``/tmp``) is accepted: the file is created 0600 with O_EXCL, and
    the sticky bit stops other users renaming or removing it. So no forged record can get in."""
    attacker = other_user()
    tier = LocalDiskTier(make_context("disk", 4, shared_dir))
    path = tier.path
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid() and st.st_nlink == 1
    assert attempt(attacker, lambda: os.open(path, os.O_WRONLY)) == "EACCES"
    assert attempt(attacker, lambda: os.open(path, os.O_RDONLY)) == "EACCES"  # prompts' KV stays private
    assert attempt(attacker, lambda: os.unlink(path)) == "EPERM"
    assert attempt(attacker, lambda: os.rename(path, path + ".x")) == "EPERM"
    tier.close()


# ------------------------------------------------------------------------------------ file
@pytest.mark.parametrize("target_exists", [True, False], ids=["existing-victim", "dangling"])
def test_planted_symlink_is_refused_and_its_target_untouched(shared_dir: Path, tmp_path: Path,
                                                             target_exists: bool) -> None:
    attacker = other_user()
    victim = tmp_path / "victim"  # a file of root's that kvbm must never write
    if target_exists:
        victim.write_bytes(b"root's precious data")
        victim.chmod(0o644)
    link = shared_dir / FILE_NAME
    assert attempt(attacker, lambda: os.symlink(victim, link)) == "ok"
    with pytest.raises(StorageError) as info:
        LocalDiskTier(make_context("disk", 4, shared_dir))
    text = _one_line(info)
    assert str(link) in text and "symbolic link" in text
    if target_exists:
        assert victim.read_bytes() == b"root's precious data"
    else:
        assert not victim.exists()  # never created through the link either


@pytest.mark.parametrize("mode", [0o666, 0o600])
def test_file_planted_by_another_user_is_refused(shared_dir: Path, tmp_path: Path, mode: int) -> None:
    """The attacker's file holds records of our namespace with valid checksums; it is never used."""
    attacker = other_user()
    forged = _forged_file(tmp_path)
    planted = shared_dir / FILE_NAME

    def plant() -> None:
        fd = os.open(planted, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        os.fchmod(fd, mode)
        os.write(fd, forged)
        os.close(fd)

    assert attempt(attacker, plant) == "ok"
    before = planted.read_bytes()
    with pytest.raises(StorageError) as info:
        LocalDiskTier(make_context("disk", 4, shared_dir))
    text = _one_line(info)
    assert str(planted) in text and "belongs to uid 65534 (nobody)" in text and "DYN_KVBM_DISK_CACHE_DIR" in text
    assert planted.read_bytes() == before and planted.stat().st_uid == attacker.pw_uid  # not used, not truncated


@pytest.mark.parametrize("kind", ["fifo", "directory", "socket"])
def test_non_regular_file_in_place_of_the_tier_file_is_a_clear_error(tmp_path: Path, monkeypatch, kind: str) -> None:
    place = tmp_path / FILE_NAME
    if kind == "fifo":
        os.mkfifo(place, 0o600)
    elif kind == "directory":
        place.mkdir()
    else:
        monkeypatch.chdir(tmp_path)  # a socket's path must be short: bind the bare name
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(FILE_NAME)
        sock.close()
    with pytest.raises(StorageError) as info:
        LocalDiskTier(make_context("disk", 4, tmp_path))  # a FIFO must not hang it either
    text = _one_line(info)
    assert str(place) in text
    assert {"fifo": "is a FIFO", "directory": "is a directory", "socket": "is a socket"}[kind] in text


@pytest.mark.parametrize("loosen", ["mode 0644", "mode 0666", "hard link"])
def test_own_file_others_could_open_is_replaced_and_never_served(tmp_path: Path, loosen: str) -> None:
    """chmod would not revoke a descriptor opened meanwhile, so the file is replaced, not repaired;
    a second link (a hard-linked file of ours elsewhere) is left untouched."""
    tier = LocalDiskTier(make_context("disk", 4, tmp_path / "cache"))
    _write(tier, 0, _keys(4))
    tier.close()
    path = Path(tier.path)
    other = tmp_path / "elsewhere"
    if loosen == "hard link":
        os.link(path, other)
    else:
        path.chmod(int(loosen.split()[1], 8))
    before = path.read_bytes()
    held = os.open(path, os.O_RDWR)  # what another user could have opened while the mode allowed it
    try:
        with capture_logs() as logs:
            again = LocalDiskTier(make_context("disk", 4, tmp_path / "cache"))
        assert any("not trusted" in e["event"] and e["path"] == str(path) for e in logs)
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_nlink == 1
        assert os.fstat(held).st_nlink == (1 if loosen == "hard link" else 0)  # the old file is not the tier's
        assert len(again.recovered()[0]) == 0 and "untrusted" in again.recovery_report().recreated
        if loosen == "hard link":
            assert other.read_bytes() == before
        again.close()
    finally:
        os.close(held)


# ------------------------------------------------------------------------ kvbm unprivileged
def _round_trip() -> dict:
    """Write four blocks with no directory configured, restart, read them back (run as another user)."""
    keys = _keys(4)
    tier = LocalDiskTier(make_context("disk", 8, None))
    rows = _write(tier, 2, keys)
    tier.close()
    again = LocalDiskTier(make_context("disk", 8, None))
    lane = again.lanes.acquire(5.0)
    try:
        check = again.read_lane(again.lanes.lane(lane), 2, keys)
        same = bool(check.all_ok and torch.equal(again.data_view(again.lanes.lane(lane), 4), rows))
    finally:
        again.lanes.release(lane)
    file_st, dir_st = os.stat(again.path), os.stat(os.path.dirname(again.path))
    out = {"path": again.path, "euid": os.geteuid(), "file_uid": file_st.st_uid,
           "file_mode": stat.S_IMODE(file_st.st_mode), "dir_uid": dir_st.st_uid,
           "dir_mode": stat.S_IMODE(dir_st.st_mode), "recovered": again.recovered()[0].tolist(), "same_bytes": same}
    again.close()
    return out


def test_kvbm_runs_as_an_unprivileged_user_in_its_private_directory(shared_dir: Path) -> None:
    """As ``nobody`` (no usable home), with no directory configured: the tier makes its per-user
    directory in the system temp directory, writes, restarts and serves what it wrote. A file planted
    by another user where the old shared default put it is not in the way."""
    user, squatter = other_user(), other_user("daemon")
    squat = shared_dir / FILE_NAME
    assert attempt(squatter, lambda: os.close(os.open(squat, os.O_CREAT | os.O_WRONLY, 0o600))) == "ok"
    out = as_user(user, _round_trip, env={"TMPDIR": str(shared_dir)})
    assert out["path"] == str(shared_dir / f"kvbm-{user.pw_uid}" / FILE_NAME)
    assert out["euid"] == out["file_uid"] == out["dir_uid"] == user.pw_uid
    assert out["file_mode"] == 0o600 and out["dir_mode"] == 0o700
    assert out["recovered"] == [2, 3, 4, 5] and out["same_bytes"]


def test_kvbm_as_an_unprivileged_user_uses_xdg_cache_home(shared_dir: Path) -> None:
    user = other_user()
    cache = shared_dir / "nobody-cache"
    assert attempt(user, lambda: os.mkdir(cache, 0o700)) == "ok"
    out = as_user(user, _round_trip, env={"XDG_CACHE_HOME": str(cache)})
    assert out["path"] == str(cache / "kvbm" / FILE_NAME) and out["dir_mode"] == 0o700
    assert out["recovered"] == [2, 3, 4, 5] and out["same_bytes"]


def test_configured_directory_kvbm_creates_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o002)  # a umask that leaves group write: kvbm must not refuse its own directory
    try:
        tier = LocalDiskTier(make_context("disk", 4, tmp_path / "new" / "cache"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new" / "cache").stat().st_mode) == 0o700
    tier.close()


def test_doctor_fails_an_unsafe_directory_and_passes_the_private_default(tmp_path: Path, monkeypatch) -> None:
    unsafe = tmp_path / "open"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    ctx = make_context("disk", 4, unsafe)
    checks = {c.name: c for c in LocalDiskTier.diagnose(ctx.spec, ctx.settings)}
    assert checks["disk directory"].status == "fail" and "DYN_KVBM_DISK_CACHE_DIR" in checks["disk directory"].detail
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ctx = make_context("disk", 4, None)
    checks = {c.name: c for c in LocalDiskTier.diagnose(ctx.spec, ctx.settings)}
    assert checks["disk directory"].status == "pass"
    assert str(tmp_path / "xdg" / "kvbm") in checks["disk directory"].detail
