"""Creating, preallocating and opening one rank's tier file; raw positioned I/O on it.

- The name is deterministic (``kvbm-<namespace hex>-rank<r>.blocks``) so a restarted process finds
  its file; an exclusive ``flock`` keeps two live processes off one file (the second takes
  ``...rank<r>.1.blocks``, and so on).
- Space is reserved with the real ``fallocate(2)`` (never ``posix_fallocate``, which silently writes
  zeros where the filesystem lacks fallocate). Where fallocate is unsupported the file is zero-filled
  with 4096-aligned writes if ``DYN_KVBM_DISK_ZEROFILL_FALLBACK`` is true, else start-up fails: a
  sparse file would fail later, mid-write, with ENOSPC.
- Where the file lives and how it is opened safely (private directory, ``O_NOFOLLOW``, ``O_EXCL``,
  owner and mode checks) is :mod:`kvbm_tier_disk.location`.
- Free space is checked before preallocating; every failure is a :class:`StorageError` naming the
  path, and every failed read or write a :class:`~kvbm_core.storage.TierIOError` naming it.
- O_DIRECT is probed (open and one aligned read) and falls back to buffered I/O with a log line
  (ramfs, some network filesystems); ``DYN_KVBM_DISK_DISABLE_O_DIRECT`` forces buffered I/O.

This module knows nothing of records; :mod:`kvbm_tier_disk.format` does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
from dataclasses import dataclass

import structlog

from kvbm_core.errors import StorageError
from kvbm_core.storage import TierIOError
from kvbm_tier_disk.location import DIRECTORY_VARIABLE, TierDirectory, open_directory, open_private_file, reopen_same

log = structlog.get_logger("kvbm.tier.disk")

ZEROFILL_VARIABLE = "DYN_KVBM_DISK_ZEROFILL_FALLBACK"
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_ZERO_CHUNK = 16 << 20
_MAX_INSTANCES = 64

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, size: int) -> int:
    """``fallocate(fd, 0, 0, size)``; returns 0 or the errno."""
    if _libc.fallocate(fd, 0, 0, size) == 0:
        return 0
    return ctypes.get_errno()


def file_stem(namespace: bytes, rank: int) -> str:
    return f"kvbm-{namespace.hex()}-rank{rank}"


@dataclass
class BlockFile:
    """An open, locked, preallocated tier file. ``fresh`` means it holds no records yet.

    ``directory`` stays open: every later operation on the file's name (unlink, reopen) goes through
    it. Every failed read or write raises :class:`~kvbm_core.storage.TierIOError` naming ``path``.
    """

    path: str
    size: int
    lock_fd: int
    fd: int
    direct: bool
    fresh: bool
    directory: TierDirectory
    name: str
    #: Why the records an earlier process left were dropped when the file was opened ("" if not).
    recreated: str = ""

    def pread_into(self, buf: memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset``; returns the bytes read (short only at end of file)."""
        done = 0
        try:
            while done < len(buf):
                n = os.preadv(self.fd, [buf[done:]], offset + done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            raise TierIOError.from_os_error(self.path, "read", offset + done, len(buf) - done, exc) from exc
        return done

    def pwrite_all(self, buffers: list[memoryview], offset: int) -> None:
        """Write ``buffers`` back to back from ``offset``, resuming after short writes."""
        total = sum(len(b) for b in buffers)
        done = 0
        while done < total:
            try:
                n = os.pwritev(self.fd, _skip(buffers, done), offset + done)
            except OSError as exc:
                raise TierIOError.from_os_error(self.path, "write", offset + done, total - done, exc) from exc
            if n <= 0:
                raise TierIOError(self.path, "write", offset + done, total - done, errno.EIO,
                                  f"pwritev wrote {n} bytes")
            done += n

    def close(self) -> None:
        for fd in {self.fd, self.lock_fd}:
            try:
                os.close(fd)
            except OSError:
                pass
        self.directory.close()


def _skip(buffers: list[memoryview], skip: int) -> list[memoryview]:
    out = []
    for b in buffers:
        if skip >= len(b):
            skip -= len(b)
            continue
        out.append(b[skip:])
        skip = 0
    return out


def open_block_file(directory: str | None, stem: str, size: int, *, zerofill_fallback: bool,
                    disable_o_direct: bool) -> BlockFile:
    """Find (or create) and lock this rank's file, preallocate ``size`` bytes, pick the I/O mode.

    ``directory`` ``None`` means the private default (:mod:`kvbm_tier_disk.location`).
    """
    tier_dir = open_directory(directory)
    try:
        name, lock_fd, created, replaced = _lock_instance(tier_dir, stem)
    except BaseException:
        tier_dir.close()
        raise
    path = os.path.join(tier_dir.path, name)
    block_file = BlockFile(path, size, lock_fd, lock_fd, False, True, tier_dir, name, replaced)
    try:
        st = os.fstat(lock_fd)
        fresh = created or st.st_size != size
        if st.st_size not in (0, size):
            log.warning("tier file has the wrong size (truncated or resized): recreating it",
                        path=path, size=st.st_size, expected=size)
            block_file.recreated = f"a file of the wrong size ({st.st_size} bytes, expected {size})"
        if fresh:
            os.ftruncate(lock_fd, 0)
            st = os.fstat(lock_fd)
        _check_free_space(path, tier_dir.path, size, allocated=st.st_blocks * 512)
        zerofilled = _preallocate(block_file, allocated=st.st_blocks * 512, zerofill_fallback=zerofill_fallback)
        block_file.fd, block_file.direct = _open_io(block_file, disable_o_direct)
        block_file.fresh = fresh or zerofilled
    except BaseException as exc:
        try:
            if os.fstat(lock_fd).st_size == 0:
                _discard(block_file)  # an empty file this attempt created: leave nothing behind
        except OSError:
            pass  # the filesystem is failing: the error below says so
        os.close(lock_fd)
        tier_dir.close()
        if isinstance(exc, OSError):
            raise StorageError(path, f"cannot prepare the tier file: {exc.strerror or exc}") from exc
        raise
    return block_file


def recreate(block_file: BlockFile, zerofill_fallback: bool) -> None:
    """Drop every record of an open file (foreign content) and preallocate it again."""
    try:
        os.ftruncate(block_file.lock_fd, 0)
    except OSError as exc:
        raise StorageError(block_file.path, f"cannot truncate the tier file: {exc.strerror or exc}") from exc
    _preallocate(block_file, allocated=0, zerofill_fallback=zerofill_fallback)
    block_file.fresh = True


def _lock_instance(directory: TierDirectory, stem: str) -> tuple[str, int, bool, str]:
    """``(name, fd, created, replaced)`` of the first instance file no live process holds (exclusive
    flock); ``replaced`` as :func:`~kvbm_tier_disk.location.open_private_file` returns it."""
    for instance in range(_MAX_INSTANCES):
        name = f"{stem}.blocks" if instance == 0 else f"{stem}.{instance}.blocks"
        fd, created, replaced = open_private_file(directory, name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if instance:
            log.info("tier file in use by another live process: using the next instance",
                     path=os.path.join(directory.path, name))
        return name, fd, created, replaced
    raise StorageError(os.path.join(directory.path, stem),
                       f"{_MAX_INSTANCES} live processes already hold this tier's files")


def _check_free_space(path: str, directory: str, size: int, allocated: int) -> None:
    vfs = os.statvfs(directory)
    if vfs.f_blocks == 0:
        return  # the filesystem reports no size (ramfs): nothing to check against
    free = vfs.f_bavail * vfs.f_frsize
    needed = size - min(allocated, size)
    if needed > free:
        raise StorageError(path, f"needs {size / 1e9:.3f} GB ({needed} bytes more) but the filesystem has only "
                                 f"{free / 1e9:.3f} GB free; lower DYN_KVBM_DISK_CACHE_GB or point "
                                 f"{DIRECTORY_VARIABLE} elsewhere")


def _preallocate(block_file: BlockFile, allocated: int, zerofill_fallback: bool) -> bool:
    """Reserve the file's blocks; returns True when the content was replaced by zeros."""
    path, fd, size = block_file.path, block_file.lock_fd, block_file.size
    err = fallocate(fd, size)
    if err == 0:
        return False
    if err == errno.ENOSPC:
        _discard(block_file)
        raise StorageError(path, f"no space left to preallocate {size} bytes (fallocate: ENOSPC)")
    if err not in _UNSUPPORTED:
        _discard(block_file)
        raise StorageError(path, f"fallocate failed: {os.strerror(err)}")
    if allocated >= size and os.fstat(fd).st_size == size:
        return False  # a file this tier zero-filled before: every block is already allocated
    if not zerofill_fallback:
        _discard(block_file)
        raise StorageError(path, f"the filesystem does not support fallocate, so the file cannot be "
                                 f"preallocated; set {ZEROFILL_VARIABLE}=true to zero-fill it instead "
                                 f"(slower start-up) or use another directory")
    log.warning("fallocate unsupported: zero-filling the tier file", path=path, bytes=size)
    _zero_fill(block_file)
    return True


def _zero_fill(block_file: BlockFile) -> None:
    path, fd, size = block_file.path, block_file.lock_fd, block_file.size
    zeros = mmap.mmap(-1, _ZERO_CHUNK)  # page-aligned and zero
    offset = 0
    try:
        os.ftruncate(fd, 0)
        view = memoryview(zeros)
        while offset < size:
            n = min(_ZERO_CHUNK, size - offset)  # size is a multiple of 4096: every write is aligned
            os.pwrite(fd, view[:n], offset)
            offset += n
        view.release()
        os.fsync(fd)
    except OSError as exc:
        _discard(block_file)
        raise StorageError(path, f"zero-filling {size} bytes failed at offset {offset}: {exc.strerror or exc}") from exc
    finally:
        zeros.close()


def _discard(block_file: BlockFile) -> None:
    """Leave no partial file behind after a failed preallocation (by name, through the directory)."""
    try:
        os.ftruncate(block_file.lock_fd, 0)
        os.unlink(block_file.name, dir_fd=block_file.directory.fd)
    except OSError:
        pass


def _open_io(block_file: BlockFile, disable_o_direct: bool) -> tuple[int, bool]:
    path, lock_fd = block_file.path, block_file.lock_fd
    if disable_o_direct:
        log.info("O_DIRECT disabled by DYN_KVBM_DISK_DISABLE_O_DIRECT: buffered I/O", path=path)
        return os.dup(lock_fd), False
    try:
        fd = reopen_same(block_file.directory, block_file.name, lock_fd, os.O_RDWR | os.O_DIRECT)
    except OSError as exc:
        log.warning("the filesystem refuses O_DIRECT: falling back to buffered I/O", path=path,
                    error=exc.strerror or str(exc))
        return os.dup(lock_fd), False
    probe = mmap.mmap(-1, 4096)
    try:
        os.preadv(fd, [probe], 0)
    except OSError as exc:
        os.close(fd)
        log.warning("O_DIRECT reads fail on this filesystem: falling back to buffered I/O", path=path,
                    error=exc.strerror or str(exc))
        return os.dup(lock_fd), False
    finally:
        probe.close()
    return fd, True
