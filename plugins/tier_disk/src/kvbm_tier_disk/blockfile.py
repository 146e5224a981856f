"""Creating, preallocating and opening one rank's tier file; raw positioned I/O on it.

- The name is deterministic (``kvbm-<namespace hex>-rank<r>.blocks``) so a restarted process finds
  its file; an exclusive ``flock`` keeps two live processes off one file (the second takes
  ``...rank<r>.1.blocks``, and so on).
- Space is reserved with the real ``fallocate(2)`` (never ``posix_fallocate``, which silently writes
  zeros where the filesystem lacks fallocate). Where fallocate is unsupported the file is zero-filled
  with 4096-aligned writes if ``DYN_KVBM_DISK_ZEROFILL_FALLBACK`` is true, else start-up fails: a
  sparse file would fail later, mid-write, with ENOSPC.
- Free space is checked before preallocating; every failure is a :class:`StorageError` naming the path.
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

log = structlog.get_logger("kvbm.tier.disk")

ZEROFILL_VARIABLE = "DYN_KVBM_DISK_ZEROFILL_FALLBACK"
DIRECTORY_VARIABLE = "DYN_KVBM_DISK_CACHE_DIR"
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
    """An open, locked, preallocated tier file. ``fresh`` means it holds no records yet."""

    path: str
    size: int
    lock_fd: int
    fd: int
    direct: bool
    fresh: bool

    def pread_into(self, buf: memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset``; returns the bytes read (short only at end of file)."""
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def pwrite_all(self, buffers: list[memoryview], offset: int) -> None:
        """Write ``buffers`` back to back from ``offset``, resuming after short writes."""
        total = sum(len(b) for b in buffers)
        done = 0
        while done < total:
            n = os.pwritev(self.fd, _skip(buffers, done), offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"pwritev wrote {n} bytes")
            done += n

    def close(self) -> None:
        for fd in {self.fd, self.lock_fd}:
            try:
                os.close(fd)
            except OSError:
                pass


def _skip(buffers: list[memoryview], skip: int) -> list[memoryview]:
    out = []
    for b in buffers:
        if skip >= len(b):
            skip -= len(b)
            continue
        out.append(b[skip:])
        skip = 0
    return out


def open_block_file(directory: str, stem: str, size: int, *, zerofill_fallback: bool,
                    disable_o_direct: bool) -> BlockFile:
    """Find (or create) and lock this rank's file, preallocate ``size`` bytes, pick the I/O mode."""
    _ensure_directory(directory)
    path, lock_fd = _lock_instance(directory, stem)
    try:
        st = os.fstat(lock_fd)
        fresh = st.st_size != size
        if st.st_size not in (0, size):
            log.warning("tier file has the wrong size (truncated or resized): recreating it",
                        path=path, size=st.st_size, expected=size)
        if fresh:
            os.ftruncate(lock_fd, 0)
            st = os.fstat(lock_fd)
        _check_free_space(path, directory, size, allocated=st.st_blocks * 512)
        zerofilled = _preallocate(path, lock_fd, size, allocated=st.st_blocks * 512,
                                  zerofill_fallback=zerofill_fallback)
        fd, direct = _open_io(path, lock_fd, disable_o_direct)
    except BaseException:
        if os.fstat(lock_fd).st_size == 0:
            _discard(path, lock_fd)  # an empty file this attempt created: leave nothing behind
        os.close(lock_fd)
        raise
    return BlockFile(path, size, lock_fd, fd, direct, fresh or zerofilled)


def recreate(block_file: BlockFile, zerofill_fallback: bool) -> None:
    """Drop every record of an open file (foreign content) and preallocate it again."""
    os.ftruncate(block_file.lock_fd, 0)
    _preallocate(block_file.path, block_file.lock_fd, block_file.size, allocated=0,
                 zerofill_fallback=zerofill_fallback)
    block_file.fresh = True


def _ensure_directory(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise StorageError(directory, f"cannot create the disk cache directory ({DIRECTORY_VARIABLE}): "
                                      f"{exc.strerror or exc}") from exc
    if not os.path.isdir(directory):
        raise StorageError(directory, f"the disk cache directory ({DIRECTORY_VARIABLE}) is not a directory")


def _lock_instance(directory: str, stem: str) -> tuple[str, int]:
    for instance in range(_MAX_INSTANCES):
        name = f"{stem}.blocks" if instance == 0 else f"{stem}.{instance}.blocks"
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(path, f"cannot create the tier file in the disk cache directory "
                                     f"({DIRECTORY_VARIABLE}): {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if instance:
            log.info("tier file in use by another live process: using the next instance", path=path)
        return path, fd
    raise StorageError(os.path.join(directory, stem), f"{_MAX_INSTANCES} live processes already hold this tier's files")


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


def _preallocate(path: str, fd: int, size: int, allocated: int, zerofill_fallback: bool) -> bool:
    """Reserve the file's blocks; returns True when the content was replaced by zeros."""
    err = fallocate(fd, size)
    if err == 0:
        return False
    if err == errno.ENOSPC:
        _discard(path, fd)
        raise StorageError(path, f"no space left to preallocate {size} bytes (fallocate: ENOSPC)")
    if err not in _UNSUPPORTED:
        _discard(path, fd)
        raise StorageError(path, f"fallocate failed: {os.strerror(err)}")
    if allocated >= size and os.fstat(fd).st_size == size:
        return False  # a file this tier zero-filled before: every block is already allocated
    if not zerofill_fallback:
        _discard(path, fd)
        raise StorageError(path, f"the filesystem does not support fallocate, so the file cannot be "
                                 f"preallocated; set {ZEROFILL_VARIABLE}=true to zero-fill it instead "
                                 f"(slower start-up) or use another directory")
    log.warning("fallocate unsupported: zero-filling the tier file", path=path, bytes=size)
    _zero_fill(path, fd, size)
    return True


def _zero_fill(path: str, fd: int, size: int) -> None:
    os.ftruncate(fd, 0)
    zeros = mmap.mmap(-1, _ZERO_CHUNK)  # page-aligned and zero
    try:
        view = memoryview(zeros)
        offset = 0
        while offset < size:
            n = min(_ZERO_CHUNK, size - offset)  # size is a multiple of 4096: every write is aligned
            os.pwrite(fd, view[:n], offset)
            offset += n
        view.release()
        os.fsync(fd)
    except OSError as exc:
        _discard(path, fd)
        raise StorageError(path, f"zero-filling {size} bytes failed at offset {offset}: {exc.strerror or exc}") from exc
    finally:
        zeros.close()


def _discard(path: str, fd: int) -> None:
    """Leave no partial file behind after a failed preallocation."""
    try:
        os.ftruncate(fd, 0)
        os.unlink(path)
    except OSError:
        pass


def _open_io(path: str, lock_fd: int, disable_o_direct: bool) -> tuple[int, bool]:
    if disable_o_direct:
        log.info("O_DIRECT disabled by DYN_KVBM_DISK_DISABLE_O_DIRECT: buffered I/O", path=path)
        return os.dup(lock_fd), False
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
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
