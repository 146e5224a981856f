"""Where a tier file lives, and opening it so that no other user can have planted it or can reach it.

The tier file holds every prompt's KV, and what it holds is served to the GPU: another user must
neither read it nor write it, nor make kvbm write through it to a file of their choosing.

- **Directory.** ``DYN_KVBM_DISK_CACHE_DIR`` (``disk.directory``) when set; otherwise a private
  per-user directory, created 0700: ``$XDG_CACHE_HOME/kvbm``, else ``~/.cache/kvbm``, else (no
  usable home) ``<system temp dir>/kvbm-<uid>``, which must then be a real directory of ours (a
  symlink or another user's directory there is refused). A default that cannot be created is
  skipped; one that exists but fails the checks below is refused, not skipped. Any directory is
  accepted only if no other user can replace files in it: owned by this process's user and not
  group/world-writable, or a shared directory with the sticky bit that is ours or root's (``/tmp``),
  where other users cannot rename or remove our file. Everything else is refused with one line
  naming the variable.
- **File.** Opened relative to the opened directory, never following a symlink (``O_NOFOLLOW``). A new
  file is created with ``O_CREAT | O_EXCL``, mode 0600. An existing file is used only if it is a
  regular file of ours with a single link; a symlink, directory, FIFO, socket or device in its place,
  or a file of another user, is refused with the path. A file of ours that other users could open
  (mode with group/other bits) or that has other links is not trusted: ``chmod`` would not revoke a
  descriptor opened meanwhile, so it is unlinked and a new file created in its place (a warning says
  so); its records are never served.

After this, no other user can write the file, so records forged with valid checksums cannot appear.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import structlog

from kvbm_core.errors import StorageError

log = structlog.get_logger("kvbm.tier.disk")

DIRECTORY_VARIABLE = "DYN_KVBM_DISK_CACHE_DIR"
_GROUP_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH
_OPEN = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO must not hang open()
_ATTEMPTS = 4


@dataclass
class TierDirectory:
    """An opened, checked directory: file operations go through ``fd`` so a later rename of the path
    cannot redirect them."""

    path: str
    fd: int

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _refuse(path: str, what: str) -> StorageError:
    return StorageError(path, f"unsafe disk cache directory ({DIRECTORY_VARIABLE}): {what}")


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def default_candidates() -> Iterator[tuple[str, bool]]:
    """The private directories tried in order when none is configured: ``(path, may_be_symlink)``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        yield os.path.join(xdg, "kvbm"), True
    home = os.path.expanduser("~")
    if os.path.isabs(home):
        yield os.path.join(home, ".cache", "kvbm"), True
    yield os.path.join(tempfile.gettempdir(), f"kvbm-{os.geteuid()}"), False


def open_directory(configured: str | None) -> TierDirectory:
    """Open and check the tier directory: ``configured`` (created if missing), or the first private
    default that can be created (module docstring). Errors name the path and the variable."""
    if configured:
        path = os.path.abspath(os.path.expanduser(configured))
        _make(path)
        return TierDirectory(path, _open_checked(path, follow=True, private=False))
    errors: list[str] = []
    for path, may_be_symlink in default_candidates():
        try:
            _make(path, private=True)
        except StorageError as exc:  # no usable home (read-only, missing): try the next candidate
            errors.append(str(exc))
            continue
        return TierDirectory(path, _open_checked(path, follow=may_be_symlink, private=True))
    raise StorageError("; ".join(errors), f"no private disk cache directory can be created: set {DIRECTORY_VARIABLE}")


def _make(path: str, private: bool = False) -> None:
    try:
        if private:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.mkdir(path, 0o700)
        else:
            os.makedirs(path, mode=0o700, exist_ok=True)  # a directory kvbm creates is private too
    except FileExistsError:
        pass
    except OSError as exc:
        raise StorageError(path, f"cannot create the disk cache directory ({DIRECTORY_VARIABLE}): "
                                 f"{exc.strerror or exc}") from exc


def _open_checked(path: str, *, follow: bool, private: bool) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and not follow and os.path.islink(path):
            raise _refuse(path, "is a symbolic link where kvbm keeps its private directory") from exc
        if exc.errno == errno.ENOTDIR:
            raise StorageError(path, f"the disk cache directory ({DIRECTORY_VARIABLE}) is not a directory") from exc
        raise StorageError(path, f"cannot open the disk cache directory ({DIRECTORY_VARIABLE}): "
                                 f"{exc.strerror or exc}") from exc
    try:
        check_directory(path, os.fstat(fd), private=private)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_directory(path: str, st: os.stat_result, *, private: bool = False) -> None:
    """Refuse a directory in which another user could replace, remove or plant the tier file."""
    me = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    sticky = bool(mode & stat.S_ISVTX)
    if private and st.st_uid != me:
        raise _refuse(path, f"belongs to {_user(st.st_uid)}, not to this process's {_user(me)}; kvbm's private "
                            f"directory must be its own (remove it, or set {DIRECTORY_VARIABLE})")
    if st.st_uid != me and not (sticky and st.st_uid == 0):
        raise _refuse(path, f"belongs to {_user(st.st_uid)}, not to this process's {_user(me)}, so its owner could "
                            f"replace the tier file; use a directory of your own")
    if mode & _GROUP_OTHER_WRITE and not sticky:
        raise _refuse(path, f"is writable by other users (mode {mode:04o}) and has no sticky bit, so they could "
                            f"replace the tier file; use a directory only you can write (chmod go-w, or a new "
                            f"directory with mode 0700)")


def open_private_file(directory: TierDirectory, name: str) -> tuple[int, bool, str]:
    """Open (or create) ``name`` in ``directory`` read-write (see the module docstring).

    Returns ``(fd, created, replaced)``: ``replaced`` says why an untrusted file of ours was replaced
    by the new one ("" if none was).
    """
    path = os.path.join(directory.path, name)
    me = os.geteuid()
    replaced = ""
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(name, _OPEN | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=directory.fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StorageError(path, f"cannot create the tier file in the disk cache directory "
                                     f"({DIRECTORY_VARIABLE}): {exc.strerror or exc}") from exc
        else:
            try:
                os.fchmod(fd, 0o600)  # whatever the umask left: the O_DIRECT reopen needs read-write
                _blocking(fd)
            except BaseException:
                os.close(fd)
                raise
            return fd, True, replaced
        fd, replaced = _open_existing(directory, name, path, me)
        if fd is not None:
            return fd, False, replaced
    raise StorageError(path, "the tier file kept changing while kvbm opened it "
                             "(created and removed by another process)")


def _open_existing(directory: TierDirectory, name: str, path: str, me: int) -> tuple[int | None, str]:
    """The existing file if it can be trusted; ``None`` when it vanished or was removed as untrusted
    (then the reason): the caller creates it anew."""
    try:
        st = os.lstat(name, dir_fd=directory.fd)  # refuse what is not a regular file before opening it
    except FileNotFoundError:
        return None, ""
    _check_existing(path, st, me)
    try:
        fd = os.open(name, _OPEN, dir_fd=directory.fd)
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StorageError(path, "the tier file is a symbolic link; kvbm never follows one there "
                                     "(remove it)") from exc
        raise StorageError(path, f"cannot open the tier file: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        _check_existing(path, st, me)
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077 or st.st_nlink != 1:
            why = f"an untrusted file (mode {mode:04o}, {st.st_nlink} links: other users could open it)"
            log.warning("tier file could be opened by other users (mode or extra links): its records are not "
                        "trusted; replacing it with a new file", path=path, mode=f"{mode:04o}", links=st.st_nlink)
            _unlink_if_same(directory, name, st)
            os.close(fd)
            return None, why
        _blocking(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, ""


def _check_existing(path: str, st: os.stat_result, me: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise StorageError(path, f"the tier file is {_kind(st.st_mode)}, not a regular file; kvbm will not use it "
                                 f"(remove it, or set {DIRECTORY_VARIABLE} to another directory)")
    if st.st_uid != me:
        raise StorageError(path, f"the tier file belongs to {_user(st.st_uid)}, not to this process's {_user(me)}; "
                                 f"kvbm will not use a file another user could have written or can read (remove "
                                 f"it, or set {DIRECTORY_VARIABLE} to a directory of your own)")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return f"of unknown type {stat.S_IFMT(mode):o}"


def _unlink_if_same(directory: TierDirectory, name: str, st: os.stat_result) -> None:
    try:
        now = os.lstat(name, dir_fd=directory.fd)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(name, dir_fd=directory.fd)
    except OSError as exc:
        raise StorageError(os.path.join(directory.path, name), f"cannot remove the untrusted tier file: "
                                                               f"{exc.strerror or exc}") from exc


def _blocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def reopen_same(directory: TierDirectory, name: str, fd: int, flags: int) -> int:
    """Open ``name`` again with ``flags`` (such as ``O_DIRECT``) and check it is the file ``fd`` holds."""
    path = os.path.join(directory.path, name)
    new = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd)
    a, b = os.fstat(fd), os.fstat(new)
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        os.close(new)
        raise StorageError(path, "the tier file was replaced while kvbm opened it")
    return new


def is_same_file(directory: TierDirectory, name: str, fd: int) -> bool:
    """Whether ``name`` in ``directory`` is still the file ``fd`` holds (for libraries that open by path)."""
    try:
        a, b = os.lstat(name, dir_fd=directory.fd), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
