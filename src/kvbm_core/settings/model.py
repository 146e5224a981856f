"""The resolved settings of one engine instance: the pipeline a profile describes.

Plain pydantic models, ``extra="forbid"`` everywhere so a misspelt YAML key is an error naming the
key rather than a silently ignored line, and ``strict`` so a YAML value keeps its YAML type: ``true``
is not 1 GB and ``"4"`` is not a number (the environment's text is typed before it gets here, by
:mod:`kvbm_core.settings.environment`). Every number is bounded where a larger one would only fail
later, inside the engine. Values come from :mod:`kvbm_core.settings.resolve`, which also checks what
depends on this machine (:mod:`kvbm_core.settings.limits`).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TIMEOUT_S = 86_400.0
"""The longest wait a setting may ask for (a day): a longer one is a typo, and 1e308 overflows a wait."""

PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TierSpec(_Strict):
    """One storage tier: which plugin (``kind``) and how big.

    ``num_blocks`` (the ``*_OVERRIDE_NUM_BLOCKS`` variables) wins over ``capacity_gb``. GB are
    decimal (1e9 bytes) per engine instance, summed across TP ranks, as in the seed guide.
    """

    kind: str
    capacity_gb: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    num_blocks: int | None = Field(default=None, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sized(self) -> "TierSpec":
        if self.capacity_gb is None and self.num_blocks is None:
            raise ValueError(f"tier {self.kind!r} needs capacity_gb or num_blocks")
        if not self.effective_size:
            raise ValueError(f"tier {self.kind!r} has size 0: remove the tier, or give it capacity_gb or num_blocks > 0")
        return self

    @property
    def effective_size(self) -> float:
        """The figure that sizes the tier: ``num_blocks`` when set, else ``capacity_gb``."""
        return float(self.num_blocks if self.num_blocks is not None else self.capacity_gb or 0)


class FilterSpec(_Strict):
    """An offload admission filter: plugin ``name`` plus its options, or disabled."""

    enabled: bool = True
    name: str = "frequency"
    options: dict[str, Any] = Field(default_factory=dict)


class DiskSettings(_Strict):
    """Where and how disk tiers create their files."""

    directory: str | None = None
    """None: the disk tier picks a private per-user directory."""
    zerofill_fallback: bool = False
    disable_o_direct: bool = False


class MetricsSettings(_Strict):
    """The Prometheus exporter (:mod:`kvbm_core.metrics`): off by default, port 6880 as Dynamo's.

    ``host`` is the address the server binds: all interfaces by default, as Dynamo's exporter, so a
    Prometheus on another host or in a container (Dynamo's observability stack scrapes
    ``host.docker.internal:6880``) can scrape it; the series are counts, never prompts or keys.
    ``127.0.0.1`` keeps it on this machine.
    """

    enabled: bool = False
    host: str = "0.0.0.0"
    port: int = Field(default=6880, ge=1, le=65535)

    @field_validator("host")
    @classmethod
    def check_host(cls, value: str) -> str:
        """An IPv4 or IPv6 address: ``0.0.0.0`` (all interfaces), ``127.0.0.1`` (loopback), ``::``."""
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address") from None


class CostModelSettings(_Strict):
    """Figures for cost-aware matching: a tier whose load is slower than recompute is not used.

    ``prefill_tokens_per_s`` is the engine's recompute speed at start (then learned from its forward
    passes unless ``learn_prefill`` is false); ``bandwidth_gbps`` maps a tier kind to
    its onboard bandwidth per rank (defaults come from the tier plugin, then from observed transfers).
    """

    enabled: bool = True
    prefill_tokens_per_s: float = Field(default=30_000.0, gt=0, allow_inf_nan=False)
    learn_prefill: bool = True  # fit the engine's recompute time from its own forward passes
    bandwidth_gbps: dict[str, PositiveFinite] = Field(default_factory=dict)
    fixed_overhead_s: float = Field(default=0.0005, ge=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)


class CacheStatsSettings(_Strict):
    """Hit rates are block-weighted over the last ``max_requests`` finished requests.

    Every ``log_interval_secs`` (Dynamo's default, 5 s) the leader logs one summary line when
    anything changed since the last one (:mod:`kvbm_core.summary`); 0 turns the line off.
    """

    max_requests: int = Field(default=1000, ge=1, le=10_000_000)
    log_interval_secs: float = Field(default=5.0, ge=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)


class LoggingSettings(_Strict):
    """How :mod:`kvbm_core.logging` renders: readable console lines or JSON lines, on stderr."""

    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("format", "level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value


class KvbmSettings(_Strict):
    """Everything one engine instance needs; the leader resolves it once and hands it to workers."""

    tiers: list[TierSpec] = Field(default_factory=list)
    eviction: str = "lru"
    eviction_options: dict[str, Any] = Field(default_factory=dict)
    disk_offload_filter: FilterSpec = Field(default_factory=FilterSpec)
    host_offload_prefix_min_priority: int = Field(default=0, ge=0, le=100)
    leader_worker_init_timeout_secs: float = Field(default=1800.0, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    weights_fingerprint: Literal["sampled", "full"] = "sampled"  # how the weights join block identity
    disk: DiskSettings = Field(default_factory=DiskSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    cost_model: CostModelSettings = Field(default_factory=CostModelSettings)
    cache_stats: CacheStatsSettings = Field(default_factory=CacheStatsSettings)
    transports: list[str] = Field(default_factory=lambda: ["inproc"])
    transport_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    def tier(self, kind: str) -> TierSpec | None:
        return next((t for t in self.tiers if t.kind == kind), None)
