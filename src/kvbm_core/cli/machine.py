"""Machine checks for ``kvbm doctor`` that need no plugin: CUDA, pinned memory, the disk directory.

Each function returns :class:`~kvbm_core.interfaces.CheckResult` rows and never raises. Disk
checks work in the directory the disk tier will use, with a small temporary file that is removed
afterwards: can we create files there, is there room for the configured capacity, does the
filesystem accept ``O_DIRECT`` and ``fallocate`` (the seed guide's two start-up failures).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvbm_core.interfaces import CheckResult
from kvbm_core.settings.model import KvbmSettings, TierSpec

PASS, WARN, FAIL = "pass", "warn", "fail"
PROBE_BYTES = 1 << 20  # fallocate probe size
ALIGN = 4096  # O_DIRECT probe: one page, aligned buffer, offset and length
# Row names of the generic disk checks (tier plugins may print their own rows next to these).
FREE_SPACE, O_DIRECT, FALLOCATE = "disk dir free space", "disk dir O_DIRECT", "disk dir fallocate"


def cuda() -> tuple[list[CheckResult], bool]:
    """Is a CUDA device visible to torch? Returns the rows and whether CUDA is usable."""
    try:
        import torch
    except Exception as exc:  # a broken torch install is a finding, not a crash
        return [CheckResult("cuda", FAIL, f"torch does not import: {exc!r}")], False
    if not torch.cuda.is_available():
        detail = f"no CUDA device visible to torch {torch.__version__}: kvbm serves TRT-LLM only on a GPU (the reference executor runs on CPU)"
        return [CheckResult("cuda", WARN, detail)], False
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return [CheckResult("cuda", PASS, f"{torch.cuda.device_count()} device(s): {', '.join(names)}; CUDA {torch.version.cuda}")], True


def host_memory(spec: TierSpec, cuda_ok: bool) -> list[CheckResult]:
    """Does the host tier fit in memory, and can we allocate pinned memory at all?"""
    rows = []
    info = _meminfo()
    if spec.num_blocks is not None:
        rows.append(CheckResult("host memory", PASS, f"{spec.kind}: {spec.num_blocks} blocks (bytes depend on the model's layout)"))
    elif info:
        need = (spec.capacity_gb or 0) * 1e9
        total, available = info.get("MemTotal", 0), info.get("MemAvailable", 0)
        text = f"{spec.kind}: {_gb(need)} GB per instance; {_gb(available)} GB available of {_gb(total)} GB"
        status = FAIL if need > total else WARN if need > available else PASS
        rows.append(CheckResult("host memory", status, text))
    if not cuda_ok:
        rows.append(CheckResult("pinned memory", WARN, "not tried: pinning host memory needs a CUDA device"))
        return rows
    try:
        import torch

        start = time.perf_counter()
        buffer = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)
        seconds = time.perf_counter() - start
        pinned = buffer.is_pinned()
        del buffer
    except Exception as exc:
        return [*rows, CheckResult("pinned memory", FAIL, f"cannot allocate 64 MiB of pinned memory: {exc}")]
    if not pinned:
        return [*rows, CheckResult("pinned memory", FAIL, "allocation succeeded but the memory is not pinned")]
    return [*rows, CheckResult("pinned memory", PASS, f"64 MiB pinned in {seconds * 1e3:.1f} ms")]


def disk(spec: TierSpec, settings: KvbmSettings) -> list[CheckResult]:
    """Directory writable, free space for the capacity, O_DIRECT and fallocate accepted there."""
    directory = Path(str(spec.options.get("directory") or settings.disk.directory)).expanduser()
    label = f"{spec.kind} dir {directory}"
    if not directory.is_dir():
        return [CheckResult(label, FAIL, "does not exist or is not a directory (DYN_KVBM_DISK_CACHE_DIR)")]
    try:
        with _probe_file(directory) as fd:
            rows = [CheckResult(label, PASS, "writable")]
            rows.append(_free_space(spec, directory))
            rows.append(_o_direct(directory, settings))
            rows.append(_fallocate(fd, settings))
    except OSError as exc:
        return [CheckResult(label, FAIL, f"cannot create a file there: {exc.strerror or exc}")]
    return rows


def _free_space(spec: TierSpec, directory: Path) -> CheckResult:
    free = shutil.disk_usage(directory).free
    if spec.num_blocks is not None:
        return CheckResult(FREE_SPACE, PASS, f"{_gb(free)} GB free; {spec.num_blocks} blocks (bytes depend on the model's layout)")
    need = (spec.capacity_gb or 0) * 1e9
    status = PASS if need <= free else FAIL
    return CheckResult(FREE_SPACE, status, f"needs {_gb(need)} GB for {spec.kind}, {_gb(free)} GB free")


def _o_direct(directory: Path, settings: KvbmSettings) -> CheckResult:
    disabled = settings.disk.disable_o_direct
    try:
        fd, path = tempfile.mkstemp(prefix=".kvbm-doctor-direct-", dir=directory)
        os.close(fd)
        try:
            direct = os.open(path, os.O_RDWR | os.O_DIRECT)
            try:
                page = mmap.mmap(-1, ALIGN)  # page-aligned, as O_DIRECT requires
                page[:] = b"k" * ALIGN
                written = os.pwrite(direct, page, 0)
                page[:] = b"\0" * ALIGN
                read = os.preadv(direct, [page], 0)
                ok = written == ALIGN and read == ALIGN and page[:] == b"k" * ALIGN
            finally:
                os.close(direct)
        finally:
            os.unlink(path)
    except OSError as exc:
        if disabled:
            return CheckResult(O_DIRECT, PASS, f"not accepted here ({exc.strerror}); not used: DYN_KVBM_DISK_DISABLE_O_DIRECT is set")
        return CheckResult(O_DIRECT, FAIL, f"not accepted here ({exc.strerror}): set DYN_KVBM_DISK_DISABLE_O_DIRECT=true")
    if not ok:
        return CheckResult(O_DIRECT, FAIL, "an aligned 4 KiB write and read back did not return the same bytes")
    return CheckResult(O_DIRECT, PASS, "accepted" + (" (not used: DYN_KVBM_DISK_DISABLE_O_DIRECT is set)" if disabled else ""))


def _fallocate(fd: int, settings: KvbmSettings) -> CheckResult:
    code = _fallocate_errno(fd, PROBE_BYTES)
    if code == 0:
        return CheckResult(FALLOCATE, PASS, "supported")
    reason = os.strerror(code)
    if code not in (errno.EOPNOTSUPP, errno.ENOSYS):
        return CheckResult(FALLOCATE, FAIL, f"failed: {reason}")
    if settings.disk.zerofill_fallback:
        return CheckResult(FALLOCATE, WARN, f"not supported ({reason}); files are zero-filled instead (DYN_KVBM_DISK_ZEROFILL_FALLBACK), slower to start")
    return CheckResult(FALLOCATE, FAIL, f"not supported ({reason}): set DYN_KVBM_DISK_ZEROFILL_FALLBACK=true")


def _fallocate_errno(fd: int, length: int) -> int:
    """The errno of fallocate(2) itself; glibc's posix_fallocate would silently emulate it."""
    libc = ctypes.CDLL(None, use_errno=True)
    fallocate = getattr(libc, "fallocate64", None) or libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return 0 if fallocate(fd, 0, 0, length) == 0 else ctypes.get_errno()


@contextmanager
def _probe_file(directory: Path) -> Iterator[int]:
    fd, path = tempfile.mkstemp(prefix=".kvbm-doctor-", dir=directory)
    try:
        yield fd
    finally:
        os.close(fd)
        os.unlink(path)


def _meminfo() -> dict[str, int]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.1f}"
