"""The TensorRT-LLM engine settings kvbm refuses or warns about, from ``llm_args`` or an LLM-API YAML.

One set of rules for two callers: the connector checks the ``llm_args`` TensorRT-LLM hands it and
refuses to start on a failure (:func:`check_engine_settings`); ``kvbm doctor --llm-api-config FILE``
checks the parsed YAML a user passes to ``trtllm-serve --extra_llm_api_options`` and prints every
finding (:func:`engine_findings`). A YAML leaves out what TensorRT-LLM defaults, so an absent key is
read as TensorRT-LLM's default: block reuse on, partial reuse **on**, no host cache, no pipeline
parallelism.

- ``kv_cache_config.enable_block_reuse`` false: fail (without it TensorRT-LLM never asks kvbm for matches);
- pipeline parallelism > 1: fail (kvbm does not support it);
- more tensor-parallel ranks than ``gpus_per_node`` (an engine over several hosts): fail (kvbm's
  ranks reach the leader over loopback);
- ``kv_cache_config.host_cache_size`` set: fail (TensorRT-LLM's own host offload beside a connector
  can serve wrong KV);
- ``kv_cache_config.enable_partial_reuse`` true: warn (device matches that end inside a block get no
  kvbm match);
- ``backend`` other than ``pytorch``: fail (connectors exist only in the PyTorch backend);
- attention data parallelism, beam search (``max_beam_width`` > 1), context parallelism > 1, the
  V2 KV cache manager or several attention windows: fail (TensorRT-LLM hands the connector several
  block spaces, or KV one pool does not describe; kvbm supports one flat pool of whole blocks);
- ``kv_connector_config`` (YAML only): its module must import and name both classes; a YAML without
  it does not load kvbm (fail). ``llm_args`` are not checked for it: the engine has already loaded
  the classes that are checking.

This module imports nothing of TensorRT-LLM's; it only reads the values it is given.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from kvbm_core.errors import ConfigError

log = structlog.get_logger("kvbm.connector")

PASS, WARN, FAIL = "pass", "warn", "fail"
CONNECTOR_KEYS = ("connector_module", "connector_scheduler_class", "connector_worker_class")
_ABSENT = object()


@dataclass(frozen=True)
class EngineFinding:
    """One checked engine setting: the LLM-API key, ``pass``/``warn``/``fail``, why, what is accepted."""

    key: str
    status: str
    detail: str
    accepted: str | None = None


def engine_findings(source: Any) -> list[EngineFinding]:
    """Every finding for ``source``: a TensorRT-LLM ``llm_args`` object or a parsed LLM-API YAML mapping."""
    from_yaml = isinstance(source, Mapping)
    out = [_backend(source), _block_reuse(source), _pipeline(source), _one_host(source), _host_cache(source),
           _partial_reuse(source, from_yaml), *_single_pool(source)]
    if from_yaml:
        out += _connector(source)
    return out


def check_engine_settings(llm_args: Any) -> None:
    """The connector's check: a :class:`ConfigError` for the first failure; warnings are logged."""
    for finding in engine_findings(llm_args):
        if finding.status == FAIL:
            raise ConfigError(finding.key, finding.detail, finding.accepted)
        if finding.status == WARN:
            log.warning(finding.detail, key=finding.key)


def _get(source: Any, dotted: str, default: Any = None) -> Any:
    node = source
    for part in dotted.split("."):
        if node is None:
            return default
        node = node.get(part, _ABSENT) if isinstance(node, Mapping) else getattr(node, part, _ABSENT)
        if node is _ABSENT:
            return default
    return node


def _backend(source: Any) -> EngineFinding:
    backend = _get(source, "backend")
    if backend is None or str(backend) in ("pytorch", "_autodeploy"):
        return EngineFinding("backend", PASS, f"{backend or 'pytorch (the default)'}: KV cache connectors are supported")
    return EngineFinding("backend", FAIL, f"{backend!r}: KV cache connectors exist only in the PyTorch backend", "pytorch")


def _block_reuse(source: Any) -> EngineFinding:
    key = "kv_cache_config.enable_block_reuse"
    if _get(source, key, True) is False:
        return EngineFinding(key, FAIL, "kvbm needs block reuse: without it TRT-LLM never asks the connector for matches", "true")
    return EngineFinding(key, PASS, "on")


def _pipeline(source: Any) -> EngineFinding:
    key = "pipeline_parallel_size"
    mapping = _get(source, "parallel_config")
    if mapping is not None and hasattr(mapping, "to_mapping"):
        pp = getattr(mapping.to_mapping(), "pp_size", 1)
    else:
        pp = _get(source, key, 1)
    try:
        pp = int(pp or 1)
    except (TypeError, ValueError):
        return EngineFinding(key, FAIL, f"not a whole number: {pp!r}", "1")
    if pp > 1:
        return EngineFinding(key, FAIL, f"kvbm does not support pipeline parallelism (got {pp})", "1")
    return EngineFinding(key, PASS, "1 (no pipeline parallelism)")


def _one_host(source: Any) -> EngineFinding:
    key = "tensor_parallel_size"
    tp, gpus = _int(_get(source, key, 1)), _get(source, "gpus_per_node")
    if gpus and tp > _int(gpus):
        return EngineFinding(key, FAIL, f"{tp} ranks over hosts of {gpus} GPUs: kvbm's ranks reach the leader over "
                             "loopback, so every rank of an engine must run on one host", f"at most gpus_per_node ({gpus})")
    return EngineFinding(key, PASS, f"{tp} rank(s) on one host")


def _host_cache(source: Any) -> EngineFinding:
    key = "kv_cache_config.host_cache_size"
    if _get(source, key):
        return EngineFinding(key, FAIL, "TRT-LLM's own host offload and a KV connector together can serve wrong KV",
                             "unset or 0 (kvbm provides the host tier)")
    return EngineFinding(key, PASS, "unset: kvbm provides the host tier")


def _partial_reuse(source: Any, from_yaml: bool) -> EngineFinding:
    key = "kv_cache_config.enable_partial_reuse"
    value = _get(source, key, True if from_yaml else False)
    if value:
        default = " (TRT-LLM's default when the key is absent)" if from_yaml and _get(source, key) is None else ""
        return EngineFinding(key, WARN, f"partial reuse is on{default}: device matches that end inside a block get no kvbm "
                             "match, and kvbm pins a finished request's blocks while its stores run (TRT-LLM copies "
                             "into new blocks before the connector can order it); set "
                             "kv_cache_config.enable_partial_reuse: false", "false")
    return EngineFinding(key, PASS, "off")


def _single_pool(source: Any) -> list[EngineFinding]:
    """What would give the connector more than one flat pool of whole blocks, or KV it cannot key."""
    out = []
    for key, bad, detail, accepted in (
        ("enable_attention_dp", bool(_get(source, "enable_attention_dp", False)),
         "attention data parallelism gives every rank its own requests and blocks", "false"),
        ("max_beam_width", _int(_get(source, "max_beam_width", 1)) > 1, "beam search keeps several sequences per request",
         "1"),
        ("context_parallel_size", _int(_get(source, "context_parallel_size", 1)) > 1,
         "context parallelism splits a sequence's KV over ranks", "1"),
        ("kv_cache_config.use_kv_cache_manager_v2", bool(_get(source, "kv_cache_config.use_kv_cache_manager_v2", False)),
         "the V2 KV cache manager hands the connector layer groups, not one pool", "false"),
        ("kv_cache_config.max_attention_window", len(set(_get(source, "kv_cache_config.max_attention_window") or [])) > 1,
         "several attention window sizes make several pools (VSWA)", "one window size"),
    ):
        if bad:
            out.append(EngineFinding(key, FAIL, f"kvbm does not support this: {detail}", accepted))
    return out or [EngineFinding("kv cache layout", PASS, "one pool of whole blocks")]


def _int(value: Any) -> int:
    try:
        return int(value or 1)
    except (TypeError, ValueError):
        return 1


def _connector(source: Mapping[str, Any]) -> list[EngineFinding]:
    key = "kv_connector_config"
    config = _get(source, key)
    if config is None:
        return [EngineFinding(key, FAIL, "missing: TRT-LLM will not load kvbm", "connector_module: kvbm_core.trtllm.connector, "
                              "connector_scheduler_class: KvbmConnectorLeader, connector_worker_class: KvbmConnectorWorker")]
    names = {k: _get(config, k) for k in CONNECTOR_KEYS}
    missing = [k for k, v in names.items() if not isinstance(v, str) or not v]
    if missing:
        return [EngineFinding(f"{key}.{missing[0]}", FAIL, "missing or not a string", "a module path or class name")]
    module_name = names["connector_module"]
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        return [EngineFinding(f"{key}.connector_module", FAIL, f"{module_name!r} does not import: {exc!r}", "an importable module, "
                              "such as kvbm_core.trtllm.connector")]
    out = [EngineFinding(f"{key}.connector_module", PASS, f"{module_name} imports")]
    for class_key in CONNECTOR_KEYS[1:]:
        name = names[class_key]
        if isinstance(getattr(module, name, None), type):
            out.append(EngineFinding(f"{key}.{class_key}", PASS, f"{module_name}.{name}"))
        else:
            found = sorted(n for n, v in vars(module).items() if isinstance(v, type) and n.endswith(("Leader", "Worker")))
            out.append(EngineFinding(f"{key}.{class_key}", FAIL, f"{module_name} has no class {name!r}", ", ".join(found) or None))
    return out
