"""The bench's knobs (:class:`BenchConfig`) and its named presets; every knob has a flag that overrides it.

- ``embedded`` (default): the tiny reference model on CPU, 8 users x 8 rounds; both runs together
  take about 40 s on two cores. The device pool (160 blocks) holds under three users' sequences
  while eight users take turns, so the baseline recomputes all but the system prompt and kvbm's host
  tier (``cpu`` profile, 0.05 GB) serves the rest.
- ``long-input``: LMBenchmark's long-input short-output shape (15 users, 1000-token system prompt,
  20000-token histories, 100-token answers, the seed guide's QPS 1), 4 rounds instead of 20, at the
  Llama-3-8B shape on a GPU. 2048 device blocks of 32 tokens hold three users' sequences; the host
  tier (48 GB) holds all fifteen (about 42 GB of KV).
- ``no-reuse``: every request is a new user with its own prompt (one round, no system prompt), all
  offered at once: nothing can be reused, so the throughput ratio kvbm / baseline is kvbm's overhead.
  Same engine as ``embedded``; move it to a GPU with ``--model``, ``--device`` and the sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from kvbm_core.bench.workload import WorkloadConfig
from kvbm_core.errors import ConfigError

if TYPE_CHECKING:
    from kvbm_core.testing import ExecutorConfig

DEFAULT_PRESET = "embedded"
MIN_MAX_NUM_TOKENS = 8192  # TRT-LLM's default max_num_tokens


@dataclass(frozen=True)
class BenchConfig:
    """Everything one ``kvbm bench`` invocation runs. ``None`` where the bench derives the value."""

    preset: str
    model: str
    device: str
    tokens_per_block: int
    num_device_blocks: int
    max_batch_size: int
    users: int
    rounds: int
    system_tokens: int
    history_tokens: int
    question_tokens: int
    answer_tokens: int
    qps: float
    seed: int = 0
    ramp_up_s: float | None = None  # None: one per-user gap
    max_num_tokens: int | None = None  # None: the longest prompt, at least 8192
    chunked_prefill: bool = False
    threads: int | None = None  # CPU: torch threads (None: 1); GPU: left to torch
    model_mode: str | None = None  # the reference model's arithmetic; None: exact on CPU, fast on CUDA
    warmup: bool = True
    profile: str | None = None  # --profile; None: DYN_KVBM_PROFILE, else the preset's profile
    preset_profile: str = "cpu"
    preset_variables: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from kvbm_core.testing import MODEL_MODES, PRESETS as MODEL_PRESETS  # model code only when a bench is built

        if self.model not in MODEL_PRESETS:
            raise ConfigError("--model", f"unknown reference model {self.model!r}", MODEL_PRESETS)
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError("--device", f"got {self.device!r}", ["cpu", "cuda", "cuda:N"])
        tpb = self.tokens_per_block
        if tpb <= 0 or tpb & (tpb - 1):
            raise ConfigError("--tokens-per-block", f"must be a power of two, got {tpb}")
        if self.max_batch_size < 1:
            raise ConfigError("--max-batch-size", f"must be >= 1, got {self.max_batch_size}")
        if self.model_mode is not None and self.model_mode not in MODEL_MODES:
            raise ConfigError("--model-mode", f"got {self.model_mode!r}", MODEL_MODES)
        if self.threads is not None and self.threads < 1:
            raise ConfigError("--threads", f"must be >= 1, got {self.threads}")
        workload = self.workload()  # validates the workload flags
        need = math.ceil(workload.max_sequence_tokens / tpb)
        if self.num_device_blocks < need:
            raise ConfigError(
                "--num-device-blocks",
                f"{self.num_device_blocks} blocks cannot hold the longest request "
                f"({workload.max_sequence_tokens} tokens = {need} blocks of {tpb})",
            )
        if self.max_num_tokens is not None:
            least = tpb if self.chunked_prefill else workload.max_prompt_tokens
            if self.max_num_tokens < least:
                what = "one block" if self.chunked_prefill else "the longest prompt without --chunked-prefill"
                raise ConfigError("--max-num-tokens", f"must hold {what} ({least} tokens), got {self.max_num_tokens}")

    @property
    def vocab_size(self) -> int:
        from kvbm_core.testing import PRESETS as MODEL_PRESETS

        return MODEL_PRESETS[self.model].vocab_size

    def workload(self) -> WorkloadConfig:
        return WorkloadConfig(
            users=self.users,
            rounds=self.rounds,
            system_tokens=self.system_tokens,
            history_tokens=self.history_tokens,
            question_tokens=self.question_tokens,
            answer_tokens=self.answer_tokens,
            qps=self.qps,
            seed=self.seed,
            vocab_size=self.vocab_size,
            ramp_up_s=self.ramp_up_s,
        )

    def executor_config(self) -> ExecutorConfig:
        from kvbm_core.testing import ExecutorConfig

        workload = self.workload()
        max_num_tokens = self.max_num_tokens or max(MIN_MAX_NUM_TOKENS, workload.max_prompt_tokens)
        return ExecutorConfig(
            model=self.model,
            seed=self.seed,
            device=self.device,
            tokens_per_block=self.tokens_per_block,
            num_blocks=self.num_device_blocks,
            max_batch_size=self.max_batch_size,
            max_num_tokens=max_num_tokens,
            max_seq_len=workload.max_sequence_tokens,
            enable_chunked_prefill=self.chunked_prefill,
            model_mode=self.model_mode,
        )

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Preset:
    description: str
    profile: str
    variables: dict[str, str]  # DYN_KVBM_* sizes for the preset's profile
    values: dict[str, Any]  # BenchConfig knobs


_EMBEDDED_ENGINE = {
    "model": "tiny",
    "device": "cpu",
    "tokens_per_block": 16,
    "num_device_blocks": 160,
    "max_batch_size": 8,
}

PRESETS: dict[str, Preset] = {
    "embedded": Preset(
        "tiny model on CPU, 8 users x 8 rounds; the device pool overflows, kvbm's host tier serves the reuse",
        profile="cpu",
        variables={"DYN_KVBM_CPU_CACHE_GB": "0.05"},
        values={
            **_EMBEDDED_ENGINE,
            "users": 8,
            "rounds": 8,
            "system_tokens": 128,
            "history_tokens": 512,
            "question_tokens": 16,
            "answer_tokens": 16,
            "qps": 4.0,
        },
    ),
    "long-input": Preset(
        "LMBenchmark long input, short output (15 users, 1000 + 20000 tokens, 100-token answers) at the "
        "Llama-3-8B shape on a GPU, 4 rounds",
        profile="cpu",
        variables={"DYN_KVBM_CPU_CACHE_GB": "48"},
        values={
            "model": "llama-3-8b",
            "device": "cuda",
            "tokens_per_block": 32,
            "num_device_blocks": 2048,
            "max_batch_size": 16,
            "users": 15,
            "rounds": 4,
            "system_tokens": 1000,
            "history_tokens": 20000,
            "question_tokens": 16,
            "answer_tokens": 100,
            "qps": 1.0,
        },
    ),
    "no-reuse": Preset(
        "every request a new user with a unique prompt, all at once: kvbm's overhead when nothing is reused",
        profile="cpu",
        variables={"DYN_KVBM_CPU_CACHE_GB": "0.05"},
        values={
            **_EMBEDDED_ENGINE,
            "users": 48,
            "rounds": 1,
            "system_tokens": 0,
            "history_tokens": 512,
            "question_tokens": 16,
            "answer_tokens": 16,
            "qps": math.inf,
        },
    ),
}


def build_config(preset: str, overrides: dict[str, Any]) -> BenchConfig:
    """The preset's knobs, with every non-``None`` override on top."""
    if preset not in PRESETS:
        raise ConfigError("--preset", f"unknown preset {preset!r}", PRESETS)
    p = PRESETS[preset]
    values = {**p.values, **{k: v for k, v in overrides.items() if v is not None}}
    return BenchConfig(preset=preset, preset_profile=p.profile, preset_variables=dict(p.variables), **values)
