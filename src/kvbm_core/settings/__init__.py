"""Settings: defaults < YAML profile < ``DYN_KVBM_*`` environment, resolved once per engine."""

from kvbm_core.settings.model import KvbmSettings, TierSpec
from kvbm_core.settings.resolve import ResolvedSettings, resolve_settings

__all__ = ["KvbmSettings", "ResolvedSettings", "TierSpec", "resolve_settings"]
