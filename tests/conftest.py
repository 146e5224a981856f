"""Shared fixtures: real etcd and nats-server on loopback, the ``kvbm`` console script, and
throwaway plugin distributions.

- ``etcd_server`` / ``nats_server``: a real server (Debian's ``etcd-server`` / ``nats-server``, which
  ``./dev`` installs) on a random free loopback port, with its data and log in a temporary
  directory; stopped at the end of the test (``.stop()`` stops it earlier). ``cluster_servers`` gives
  both plus the ``transport_options`` that point kvbm at them.
- ``port_factory``: a function returning a free loopback port; ``kvbm_env``: a clean environment.
- ``run_kvbm``: runs the installed ``kvbm`` console script in a subprocess with a clean
  ``DYN_KVBM_*`` environment plus the variables a test passes.
- ``log_capture``: kvbm's logging configured into a buffer for one test.
- ``mount``: mounts a real filesystem (a size-limited or read-only tmpfs, a ramfs, a loop-mounted
  ext4) under the test's temporary directory and unmounts it afterwards. Mounting needs root with
  CAP_SYS_ADMIN (the CI machine has it); elsewhere those tests are skipped, saying why.
- ``fake_distribution``: writes a plugin module and a ``*.dist-info`` (METADATA + entry_points.txt)
  into a directory; put it on ``PYTHONPATH`` and ``importlib.metadata`` sees an installed
  distribution, exactly as after ``pip install`` (without building a wheel or a venv).

Every test runs without the developer's own ``DYN_KVBM_*`` variables.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import structlog
import torch

from kvbm_core.logging import configure
from kvbm_core.settings.model import LoggingSettings

SERVER_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/usr/local/bin"])
KVBM = Path(sys.executable).with_name("kvbm")


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The tiny reference model runs fastest on one CPU thread here; more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _clean_kvbm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.upper().startswith("DYN_KVBM_")]:
        monkeypatch.delenv(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port_factory() -> Callable[[], int]:
    """A function returning a currently free loopback TCP port (use it, do not import conftest)."""
    return free_port


def _binary(name: str) -> str:
    path = shutil.which(name, path=SERVER_SEARCH_PATH)
    if path is None:
        pytest.fail(f"{name} is not installed: run ./dev (it installs Debian's etcd-server and nats-server)")
    return path


@dataclass
class ServerProcess:
    """One server process on loopback; ``url`` is what clients connect to."""

    name: str
    workdir: Path
    url: str = ""
    port: int = 0
    proc: subprocess.Popen | None = None
    _log: object = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def launch(self, argv: list[str], ready: Callable[[], bool], timeout_s: float = 30.0) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            if ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} not ready within {timeout_s} s: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _start_with_retries(start: Callable[[], None], attempts: int = 3) -> None:
    """A free port can be taken between choosing it and binding it: try again with new ports."""
    for attempt in range(attempts):
        try:
            start()
            return
        except RuntimeError:
            if attempt == attempts - 1:
                raise


def start_etcd(workdir: Path) -> ServerProcess:
    server = ServerProcess("etcd", workdir)
    binary = _binary("etcd")

    def start() -> None:
        client, peer = free_port(), free_port()
        server.port, server.url = client, f"http://127.0.0.1:{client}"
        argv = [
            binary,
            "--name", "kvbm-test",
            "--data-dir", str(workdir / f"etcd-data-{client}"),
            "--listen-client-urls", server.url,
            "--advertise-client-urls", server.url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"kvbm-test=http://127.0.0.1:{peer}",
        ]  # fmt: skip
        server.launch(argv, lambda: _etcd_healthy(server.url))

    _start_with_retries(start)
    return server


def start_nats(workdir: Path) -> ServerProcess:
    server = ServerProcess("nats", workdir)
    binary = _binary("nats-server")

    def start() -> None:
        server.port = free_port()
        server.url = f"nats://127.0.0.1:{server.port}"
        server.launch([binary, "-a", "127.0.0.1", "-p", str(server.port)], lambda: _nats_ready(server.port))

    _start_with_retries(start)
    return server


def _etcd_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return b'"health":"true"' in response.read()
    except OSError:
        return False


def _nats_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(4).startswith(b"INFO")
    except OSError:
        return False


@pytest.fixture
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_etcd(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()


@pytest.fixture
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_nats(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@dataclass(frozen=True)
class ClusterServers:
    etcd: ServerProcess
    nats: ServerProcess

    @property
    def transport_options(self) -> dict[str, dict[str, object]]:
        return {
            "etcd": {"endpoints": [self.etcd.url], "timeout_s": 5},
            "nats": {"servers": [self.nats.url], "timeout_s": 5},
        }


@pytest.fixture
def cluster_servers(etcd_server: ServerProcess, nats_server: ServerProcess) -> ClusterServers:
    return ClusterServers(etcd_server, nats_server)


# ---------------------------------------------------------------------------------- logging
@pytest.fixture
def log_capture() -> Iterator[io.StringIO]:
    """kvbm's logging configured (console format, debug level) into a buffer for this test only."""
    buffer = io.StringIO()
    configure(LoggingSettings(format="console", level="debug"), stream=buffer)
    yield buffer
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "kvbm"]:
        root.removeHandler(handler)
    structlog.reset_defaults()


# ---------------------------------------------------------------------------------- the CLI
def kvbm_environment(env: Mapping[str, str] | None = None, pythonpath: Path | None = None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("DYN_KVBM_")}
    if pythonpath is not None:
        base["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), base.get("PYTHONPATH", "")) if p)
    base.update(env or {})
    return base


@pytest.fixture
def kvbm_env() -> Callable[..., dict[str, str]]:
    """``kvbm_env({"DYN_KVBM_X": "1"})`` -> this process's environment without ``DYN_KVBM_*``, plus those."""
    return kvbm_environment


@pytest.fixture
def run_kvbm() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_kvbm("config", "show", env={...}, pythonpath=dir)`` -> the finished process."""

    def run(*args: str, env: Mapping[str, str] | None = None, pythonpath: Path | None = None, timeout: float = 120):
        assert KVBM.exists(), f"the kvbm console script is not installed next to {sys.executable}: run ./dev"
        return subprocess.run(
            [str(KVBM), *args], env=kvbm_environment(env, pythonpath), capture_output=True, text=True, timeout=timeout
        )

    return run


# ------------------------------------------------------------------------ plugin distributions
@pytest.fixture
def fake_distribution(tmp_path: Path) -> Callable[..., Path]:
    """``fake_distribution("kvbm-clash", "kvbm_clash", source, entry_point="clash")`` -> the directory
    to put on PYTHONPATH. Several calls share one directory."""
    root = tmp_path / "site"
    root.mkdir()

    def make(distribution: str, module: str, source: str, entry_point: str | None = None, version: str = "0.0.1") -> Path:
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        info = root / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[kvbm]\n{entry_point or module} = {module}\n")
        return root

    return make


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    mounted: list[Path] = []

    def _mount(fstype: str, options: str = "", image_mb: int = 0, mkfs: list[str] | None = None) -> Path:
        target = tmp_path / f"mnt-{fstype}-{len(mounted)}"
        target.mkdir()
        source = fstype
        if image_mb:
            image = tmp_path / f"{target.name}.img"
            with open(image, "wb") as f:
                f.truncate(image_mb << 20)
            subprocess.run([*(mkfs or []), str(image)], check=True, capture_output=True)
            source, options = str(image), ",".join(filter(None, [options, "loop"]))
        cmd = ["mount", "-t", fstype] + (["-o", options] if options else []) + [source, str(target)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount {fstype} here ({proc.stderr.strip() or 'not permitted'}): needs root")
        mounted.append(target)
        return target

    yield _mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)
