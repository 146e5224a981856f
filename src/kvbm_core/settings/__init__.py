"""Settings: defaults < YAML profile < ``DYN_KVBM_*`` environment, resolved once per engine."""

from kvbm_core.settings.model import KvbmSettings, TierSpec
from kvbm_core.settings.pipeline import PipelinePlan, plan_pipeline
from kvbm_core.settings.resolve import ResolvedSettings, flatten, resolve_settings

__all__ = ["KvbmSettings", "PipelinePlan", "ResolvedSettings", "TierSpec", "flatten", "plan_pipeline", "resolve_settings"]
