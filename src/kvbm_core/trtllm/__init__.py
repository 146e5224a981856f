"""TensorRT-LLM's connector contract: its base classes where TRT-LLM is installed, ours otherwise.

Import order: the newer ``connectors.kv_cache_connector`` path (1.3+), the 1.2.x path, then the
local stand-ins of :mod:`kvbm_core.trtllm.contract`. ``TRTLLM_SOURCE`` says which one was taken.
"""

from __future__ import annotations

import importlib

_PATHS = (
    "tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector",
    "tensorrt_llm._torch.pyexecutor.kv_cache_connector",
)


def _import_contract():
    for path in _PATHS:
        try:
            return importlib.import_module(path), path
        except Exception:  # ImportError, or a TRT-LLM that cannot load its CUDA bindings here
            continue
    from kvbm_core.trtllm import contract

    return contract, contract.__name__


_module, TRTLLM_SOURCE = _import_contract()
KvCacheConnectorScheduler = _module.KvCacheConnectorScheduler
KvCacheConnectorWorker = _module.KvCacheConnectorWorker
SchedulerOutput = _module.SchedulerOutput
RequestData = _module.RequestData

__all__ = [
    "KvCacheConnectorScheduler",
    "KvCacheConnectorWorker",
    "RequestData",
    "SchedulerOutput",
    "TRTLLM_SOURCE",
]
