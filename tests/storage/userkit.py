"""Acting as another, unprivileged user, for tests of what other users can do to a tier file.

The tests run as root in CI. An attacker step, or kvbm itself, runs as a real system user
(``nobody``, and ``daemon`` where a second user is needed) in a forked child that drops root
(``setgroups([])``, ``setgid``, ``setuid``) before it acts, so the kernel's own permission checks
apply to it. A forked child needs nothing it would have to read from disk (the test interpreter may
live where other users cannot read it). Where this process cannot switch users (not root, or no
such user), the test is skipped and says which.
"""

from __future__ import annotations

import errno
import os
import pickle
import pwd
import select
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any


def other_user(name: str = "nobody") -> pwd.struct_passwd:
    """A system user this process can act as; skips the test (saying why) otherwise."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root (CI runs the tests as root)")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"no user {name!r} on this machine")


def as_user(user: pwd.struct_passwd, fn: Callable[[], Any], *, env: Mapping[str, str] | None = None,
            timeout: float = 120.0) -> Any:
    """``fn()`` run as ``user`` in a forked child (no supplementary groups; ``env`` added to its
    environment); returns its result, or raises :class:`AssertionError` with the child's traceback."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            os.environ.update({"HOME": user.pw_dir, **(env or {})})
            tempfile.tempdir = None  # TMPDIR as ``env`` says
            payload = pickle.dumps(("ok", fn()))
            status = 0
        except BaseException:
            payload = pickle.dumps(("error", traceback.format_exc()))
        try:
            with os.fdopen(write_end, "wb") as out:
                out.write(payload)
        finally:
            os._exit(status)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"the step as {user.pw_name} did not finish within {timeout:.0f} s")
            if select.select([read_end], [], [], remaining)[0]:
                chunk = os.read(read_end, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    data = b"".join(chunks)
    kind, value = pickle.loads(data) if data else ("error", "the child exited without a result")
    if kind != "ok":
        raise AssertionError(f"the step as {user.pw_name} failed:\n{value}")
    return value


def attempt(user: pwd.struct_passwd, action: Callable[[], object]) -> str:
    """Run ``action`` as ``user``: ``"ok"``, or the name of the errno it failed with."""

    def step() -> str:
        try:
            action()
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return "ok"

    return as_user(user, step)
