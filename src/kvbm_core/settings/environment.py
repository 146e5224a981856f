"""The flat ``DYN_KVBM_*`` variables of the seed guide, parsed and validated by pydantic-settings.

Each field keeps the seed guide's meaning and unit. Booleans parse as booleans (``false``/``0``/
``no``/``off`` are false), unlike Dynamo where the mere presence of a variable turns it on. An
empty variable counts as unset. A bad value becomes a :class:`~kvbm_core.errors.ConfigError`
naming the variable and the accepted values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kvbm_core.errors import ConfigError
from kvbm_core.settings.accepted import accepted_for_field

PREFIX = "DYN_KVBM_"


class SeedEnvironment(BaseSettings):
    """One field per ``DYN_KVBM_<FIELD>`` variable; None means the variable is not set."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, case_sensitive=False, extra="ignore", env_ignore_empty=True)

    profile: str | None = None
    cpu_cache_gb: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    cpu_cache_override_num_blocks: int | None = Field(default=None, ge=0)
    disk_cache_gb: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    disk_cache_override_num_blocks: int | None = Field(default=None, ge=0)
    disk_cache_dir: str | None = None
    disk_zerofill_fallback: bool | None = None
    disk_disable_o_direct: bool | None = None
    disable_disk_offload_filter: bool | None = None
    leader_worker_init_timeout_secs: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    metrics: bool | None = None
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    host_offload_prefix_min_priority: int | None = Field(default=None, ge=0, le=100)
    cache_stats_max_requests: int | None = Field(default=None, ge=1)
    log_format: Literal["console", "json"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] | None = None

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> "SeedEnvironment":
        """Parse ``environ`` (default: the process environment); errors name the variable."""
        source = os.environ if environ is None else environ
        values = {
            k[len(PREFIX) :].lower(): v
            for k, v in source.items()
            if k.upper().startswith(PREFIX) and k[len(PREFIX) :].lower() in cls.model_fields and v.strip() != ""
        }
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0])
            variable = variable_name(field)
            accepted = accepted_for_field(cls.model_fields[field])
            raise ConfigError(variable, f"invalid value {values.get(field)!r}: {err['msg']}", accepted) from None

    def variables_set(self) -> dict[str, object]:
        """The variables that were set, by full name."""
        return {variable_name(k): v for k, v in self.model_dump().items() if v is not None}


def variable_name(field: str) -> str:
    """``cpu_cache_gb`` -> ``DYN_KVBM_CPU_CACHE_GB``."""
    return PREFIX + field.upper()
