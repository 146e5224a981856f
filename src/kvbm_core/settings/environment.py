"""The flat ``DYN_KVBM_*`` variables of the seed guide, parsed and validated by pydantic-settings.

Each field keeps the seed guide's meaning and unit. Booleans parse as booleans (``false``/``0``/
``no``/``off`` are false), unlike Dynamo where the mere presence of a variable turns it on. A bad
value becomes a :class:`~kvbm_core.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from kvbm_core.errors import ConfigError

PREFIX = "DYN_KVBM_"


class SeedEnvironment(BaseSettings):
    """One field per ``DYN_KVBM_<FIELD>`` variable; None means the variable is not set."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, case_sensitive=False, extra="ignore")

    profile: str | None = None
    cpu_cache_gb: float | None = Field(default=None, ge=0)
    cpu_cache_override_num_blocks: int | None = Field(default=None, ge=0)
    disk_cache_gb: float | None = Field(default=None, ge=0)
    disk_cache_override_num_blocks: int | None = Field(default=None, ge=0)
    disk_cache_dir: str | None = None
    disk_zerofill_fallback: bool | None = None
    disk_disable_o_direct: bool | None = None
    disable_disk_offload_filter: bool | None = None
    leader_worker_init_timeout_secs: float | None = Field(default=None, gt=0)
    metrics: bool | None = None
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    host_offload_prefix_min_priority: int | None = Field(default=None, ge=0, le=100)
    cache_stats_max_requests: int | None = Field(default=None, ge=1)
    log_format: Literal["console", "json"] | None = None
    log_level: Literal["debug", "info", "warning", "error"] | None = None

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> "SeedEnvironment":
        """Parse ``environ`` (default: the process environment); errors name the variable."""
        try:
            if environ is None:
                return cls()
            values = {
                k[len(PREFIX) :].lower(): v
                for k, v in environ.items()
                if k.upper().startswith(PREFIX) and k[len(PREFIX) :].lower() in cls.model_fields
            }
            return cls.model_validate(values)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else "?"
            variable = PREFIX + field.upper()
            source = environ if environ is not None else os.environ
            value = next((v for k, v in source.items() if k.upper() == variable), None)
            raise ConfigError(variable, f"invalid value {value!r}: {err['msg']}", _accepted(field)) from None

    def variables_set(self) -> dict[str, object]:
        """The variables that were set, by full name."""
        return {PREFIX + k.upper(): v for k, v in self.model_dump().items() if v is not None}


def _accepted(field: str) -> str | None:
    annotation = SeedEnvironment.model_fields[field].annotation
    text = str(annotation)
    if "bool" in text:
        return "true/false, 1/0, yes/no, on/off"
    if "float" in text:
        return "a number >= 0" if "gb" in field else "a number > 0"
    if "int" in text:
        return {
            "metrics_port": "an integer from 1 to 65535",
            "host_offload_prefix_min_priority": "an integer from 0 to 100",
        }.get(field, "a whole number >= 0")
    if "Literal" in text:
        return ", ".join(a for a in annotation.__args__[0].__args__)  # type: ignore[union-attr]
    return None
