"""Acting as another, unprivileged user, for tests of what other users can do to a tier file.

The tests run as root in CI. An attacker step, or kvbm itself, runs as a real system user
(``nobody``, and ``daemon`` where a second user is needed) in a subprocess started with
``subprocess.run(user=..., group=..., extra_groups=[])``: the kernel's own permission checks apply
to it. Where this process cannot switch users (not root, no such user, or the test interpreter is not
readable by that user), the test is skipped and says which.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def other_user(name: str = "nobody") -> pwd.struct_passwd:
    """A system user this process can run a step as; skips the test (saying why) otherwise."""
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root (CI runs the tests as root)")
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"no user {name!r} on this machine")
    probe = run_as(user, "pass")
    if probe.returncode != 0:
        pytest.skip(f"the test interpreter {sys.executable} cannot run as {name!r}: {probe.stderr.strip()[-300:]}")
    return user


def run_as(user: pwd.struct_passwd, code: str, *, env: dict[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as ``user`` (no supplementary groups), from ``/``, with a clean environment."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": user.pw_dir, "LANG": "C.UTF-8"}
    return subprocess.run([sys.executable, "-c", code], user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                          env={**base, **(env or {})}, cwd="/", capture_output=True, text=True, timeout=timeout)


def attempt(user: pwd.struct_passwd, statement: str) -> str:
    """Run one statement as ``user``: ``"ok"``, or the name of the errno it failed with."""
    code = ("import errno, os\n"
            f"try:\n    {statement}\n    print('ok')\n"
            "except OSError as exc:\n    print(errno.errorcode.get(exc.errno, exc.errno))\n")
    done = run_as(user, code)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()

