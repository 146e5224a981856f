"""Machine checks for ``kvbm doctor`` that need no plugin: TensorRT-LLM, CUDA, pinned memory, the disk directory.

Each function returns :class:`~kvbm_core.interfaces.CheckResult` rows and never raises, and each
row says what the engine will do, so a row fails exactly where the engine would refuse to start:

- the disk directory: the disk tier creates it when it is missing, so a missing directory whose
  nearest existing parent is writable passes ("created at start"); doctor itself creates nothing.
  The probes (free space, ``O_DIRECT``, ``fallocate``) run in that directory or parent with one
  small temporary file, removed afterwards.
- ``O_DIRECT`` refused: the disk tier falls back to buffered I/O, so this warns.
- ``fallocate`` unsupported: the disk tier refuses to start unless zero-fill is allowed.
- free space below the tier's size: the disk tier refuses to start.
- TensorRT-LLM is found from its installed distribution's file list, without importing it.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.metadata
import mmap
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvbm_core.interfaces import CheckResult
from kvbm_core.settings.limits import existing_ancestor
from kvbm_core.settings.model import KvbmSettings, TierSpec

PASS, WARN, FAIL = "pass", "warn", "fail"
PROBE_BYTES = 1 << 20  # fallocate probe size
ALIGN = 4096  # O_DIRECT probe: one page, aligned buffer, offset and length
# Row names of the generic disk checks. A tier plugin's own row with one of these names is the same
# check again, and ``kvbm doctor`` prints it once.
DIRECTORY, FREE_SPACE, O_DIRECT, FALLOCATE = "disk directory", "disk free space", "disk O_DIRECT", "disk fallocate"
TRTLLM = "tensorrt-llm"
MIN_TRTLLM = (1, 2)
# TensorRT-LLM's KV connector module, newest first: 1.3+ moved it under connectors/.
TRTLLM_CONNECTOR_PATHS = (
    "tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector",
    "tensorrt_llm._torch.pyexecutor.kv_cache_connector",
)


def trtllm() -> CheckResult:
    """Is TensorRT-LLM installed, which version, and where is its connector module?"""
    try:
        dist = importlib.metadata.distribution("tensorrt_llm")
    except importlib.metadata.PackageNotFoundError:
        return CheckResult(TRTLLM, WARN, "not installed: trtllm-serve cannot run here (kvbm bench and the reference executor can)")
    version = dist.version
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if numbers < MIN_TRTLLM:
        return CheckResult(TRTLLM, FAIL, f"{version} has no KV cache connector API: kvbm needs 1.2 or newer")
    files = {str(f).replace("\\", "/") for f in dist.files or ()}
    for module in TRTLLM_CONNECTOR_PATHS:
        if module.replace(".", "/") + ".py" in files:
            return CheckResult(TRTLLM, PASS, f"{version}; connector API {module}")
    return CheckResult(TRTLLM, FAIL, f"{version} ships neither {' nor '.join(TRTLLM_CONNECTOR_PATHS)}")


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


def disk_directory_exists(spec: TierSpec, settings: KvbmSettings) -> bool:
    """False only for a configured directory that does not exist yet (None: the tier picks one)."""
    configured = spec.options.get("directory") or settings.disk.directory
    return configured is None or Path(str(configured)).expanduser().is_dir()


def disk(spec: TierSpec, settings: KvbmSettings) -> list[CheckResult]:
    """Directory usable (or creatable), free space for the capacity, O_DIRECT and fallocate accepted there."""
    configured = spec.options.get("directory") or settings.disk.directory
    if configured is None:
        return [CheckResult(DIRECTORY, PASS, f"not set (DYN_KVBM_DISK_CACHE_DIR): the {spec.kind} tier picks a private per-user directory at start")]
    directory = Path(str(configured)).expanduser()
    if directory.exists() and not directory.is_dir():
        return [CheckResult(DIRECTORY, FAIL, f"{directory} is not a directory (DYN_KVBM_DISK_CACHE_DIR)")]
    probe_dir = existing_ancestor(str(directory))
    if not probe_dir.is_dir():
        return [CheckResult(DIRECTORY, FAIL, f"{directory} cannot be created: {probe_dir} is not a directory")]
    if directory.is_dir():
        row = CheckResult(DIRECTORY, PASS, f"{directory} is writable")
    else:
        row = CheckResult(DIRECTORY, PASS, f"{directory} does not exist yet: the {spec.kind} tier creates it at start "
                          f"({probe_dir} is writable; the tier's own checks run once it exists)")
    try:
        with _probe_file(probe_dir) as fd:
            return [row, _free_space(spec, probe_dir), _o_direct(probe_dir, settings), _fallocate(fd, settings)]
    except OSError as exc:
        where = directory if directory.is_dir() else f"{directory}: its parent {probe_dir}"
        return [CheckResult(DIRECTORY, FAIL, f"{where} is not writable ({exc.strerror or exc}); DYN_KVBM_DISK_CACHE_DIR")]


def _free_space(spec: TierSpec, directory: Path) -> CheckResult:
    free = shutil.disk_usage(directory).free
    if spec.num_blocks is not None:
        return CheckResult(FREE_SPACE, PASS, f"{_gb(free)} GB free; {spec.num_blocks} blocks (bytes depend on the model's layout)")
    need = (spec.capacity_gb or 0) * 1e9
    if need <= free:
        return CheckResult(FREE_SPACE, PASS, f"needs {_gb(need)} GB for {spec.kind}, {_gb(free)} GB free")
    return CheckResult(FREE_SPACE, FAIL, f"needs {_gb(need)} GB for {spec.kind}, {_gb(free)} GB free: the tier refuses to start")


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
        return CheckResult(O_DIRECT, WARN, f"not accepted here ({exc.strerror}): the disk tier falls back to buffered I/O")
    if not ok:
        return CheckResult(O_DIRECT, WARN, "an aligned 4 KiB write and read back differ: the disk tier falls back to buffered I/O")
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
