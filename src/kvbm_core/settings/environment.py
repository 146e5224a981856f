"""The flat ``DYN_KVBM_*`` variables of the seed guide, read and typed by pydantic-settings.

Each field keeps the seed guide's meaning and unit. pydantic-settings' own environment source reads
the variables (prefix ``DYN_KVBM_``, any case) and parses them into the field types: booleans parse
as booleans (``true/false``, ``1/0``, ``yes/no``, ``on/off``; ``false`` is false, unlike Dynamo where
the mere presence of a variable turns it on). The only thing added to the library's source is where
it reads from: a given mapping (``kvbm bench`` resolves a run's environment without touching the
process's) or ``os.environ``; a blank value counts as unset. A bad value becomes a
:class:`~kvbm_core.errors.ConfigError` naming the variable and the accepted values.

Mapping these flat variables onto the pipeline (which tier a size belongs to) is
:mod:`kvbm_core.settings.resolve`'s job; which ``DYN_KVBM_*`` names exist at all is
:mod:`kvbm_core.settings.variables`'.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from kvbm_core.errors import ConfigError
from kvbm_core.settings.accepted import accepted_for_field
from kvbm_core.settings.model import MAX_TIMEOUT_S, MetricsSettings

PREFIX = "DYN_KVBM_"

_environ: ContextVar[Mapping[str, str] | None] = ContextVar("kvbm_environ", default=None)


class _EnvironSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading ``environ`` instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:  # the hook DotEnvSettingsSource overrides too
        return {k.lower(): v.strip() for k, v in self._environ.items() if v.strip()}


class SeedEnvironment(BaseSettings):
    """One field per ``DYN_KVBM_<FIELD>`` variable; None means the variable is not set."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, case_sensitive=False, extra="ignore")

    profile: str | None = None
    cpu_cache_gb: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    cpu_cache_override_num_blocks: int | None = Field(default=None, ge=0)
    disk_cache_gb: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    disk_cache_override_num_blocks: int | None = Field(default=None, ge=0)
    disk_cache_dir: str | None = None
    disk_zerofill_fallback: bool | None = None
    disk_disable_o_direct: bool | None = None
    disable_disk_offload_filter: bool | None = None
    leader_worker_init_timeout_secs: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    weights_fingerprint: Literal["sampled", "full"] | None = None
    metrics: bool | None = None
    metrics_host: str | None = None
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    host_offload_prefix_min_priority: int | None = Field(default=None, ge=0, le=100)
    cache_stats_max_requests: int | None = Field(default=None, ge=1, le=10_000_000)
    cache_stats_log_interval_secs: float | None = Field(default=None, ge=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    log_format: Literal["console", "json"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] | None = None

    @field_validator("log_format", "log_level", "weights_fingerprint", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("metrics_host")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else MetricsSettings.check_host(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the environment: no ``.env`` file, no secrets directory, nothing passed in code."""
        return (_EnvironSource(settings_cls, _environ.get() or os.environ),)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> "SeedEnvironment":
        """Read ``environ`` (default: the process environment); errors name the variable."""
        with _reading(os.environ if environ is None else environ) as source:
            try:
                return cls()
            except ValidationError as exc:
                err = exc.errors()[0]
                field = str(err["loc"][0])
                variable = variable_name(field)
                raw = next((v for k, v in source.items() if k.upper() == variable), err.get("input"))
                message = err["msg"].removeprefix("Value error, ")
                raise ConfigError(variable, f"invalid value {raw!r}: {message}", accepted_for_field(cls.model_fields[field])) from None

    def variables_set(self) -> dict[str, object]:
        """The variables that were set, by full name."""
        return {variable_name(k): v for k, v in self.model_dump().items() if v is not None}


@contextmanager
def _reading(environ: Mapping[str, str]) -> Iterator[Mapping[str, str]]:
    token = _environ.set(environ)
    try:
        yield environ
    finally:
        _environ.reset(token)


def variable_name(field: str) -> str:
    """``cpu_cache_gb`` -> ``DYN_KVBM_CPU_CACHE_GB``."""
    return PREFIX + field.upper()


def seed_variables() -> list[str]:
    """Every variable :class:`SeedEnvironment` reads, by full name."""
    return [variable_name(f) for f in SeedEnvironment.model_fields]

