"""Typed errors, raised where the fact is known and carrying the variable, key or path involved."""

from __future__ import annotations

from collections.abc import Iterable


class KvbmError(Exception):
    """Base class of every error kvbm raises on purpose."""


class ConfigError(KvbmError):
    """A setting has a bad value. ``source`` names the variable or YAML key that holds it."""

    def __init__(self, source: str, message: str, accepted: str | Iterable[str] | None = None):
        self.source = source
        if accepted is not None and not isinstance(accepted, str):
            accepted = ", ".join(sorted(accepted))
        self.accepted = accepted
        text = f"{source}: {message}"
        if accepted:
            text += f" (accepted: {accepted})"
        super().__init__(text)


class PluginError(KvbmError):
    """A plugin failed to load, broke its kind's contract, misbehaved, or clashes with another plugin.

    ``distribution`` names the installed distribution that is at fault, so the user knows what to
    uninstall or upgrade; ``reason`` is the message without that prefix.
    """

    def __init__(self, distribution: str, message: str):
        self.distribution = distribution
        self.reason = message
        super().__init__(f"plugin distribution {distribution!r}: {message}")


PLUGIN_FAILURES: tuple[type[BaseException], ...] = (Exception, SystemExit)
"""What kvbm catches around a call into plugin code: any error, and ``SystemExit`` (a plugin has no
business ending the engine's process). ``KeyboardInterrupt`` still stops kvbm."""


class StorageError(KvbmError):
    """A tier's storage cannot be created or used (no space, unwritable directory, bad file)."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


class BlockIntegrityError(KvbmError):
    """A stored block failed verification: wrong identity, wrong namespace, torn or corrupted bytes.

    Such a block is never handed to the GPU; the operation that read it fails.
    """


class TransferError(KvbmError):
    """A transfer operation failed. It is reported as failed, never counted as done."""

    def __init__(self, op_id: int, route: str, message: str):
        self.op_id = op_id
        self.route = route
        super().__init__(f"operation {op_id} ({route}): {message}")


class TransportError(KvbmError):
    """A transport cannot reach its server or an operation on it failed or timed out."""

    def __init__(self, transport: str, endpoint: str, message: str):
        self.transport = transport
        self.endpoint = endpoint
        super().__init__(f"{transport} at {endpoint}: {message}")


class KvbmLoadError(KvbmError):
    """A promised onboard failed for these requests; their KV is not valid and must not be used."""

    def __init__(self, request_ids: Iterable[int], message: str):
        self.request_ids = tuple(request_ids)
        super().__init__(f"requests {list(self.request_ids)}: {message}")
