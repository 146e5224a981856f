"""What kvbm reads from TensorRT-LLM's objects: ``llm_args`` (tokens per block, ranks, model, engine
capacity, settings that make the engine write freed blocks) and a request (generation-only, cache
salt, LoRA adapter). Everything is read with ``getattr`` and a default, so the 1.2 and 1.3 lines
(and the reference executor's stand-ins) all work; nothing here imports TensorRT-LLM."""

from __future__ import annotations

from typing import Any

from kvbm_core.identity import RequestScope


def mapping(llm_args: Any) -> Any:
    parallel = getattr(llm_args, "parallel_config", None)
    return parallel.to_mapping() if parallel is not None and hasattr(parallel, "to_mapping") else None


def tokens_per_block(llm_args: Any) -> int:
    return int(getattr(llm_args.kv_cache_config, "tokens_per_block", None) or 32)


def world_size(llm_args: Any) -> int:
    found = mapping(llm_args)
    if found is not None:
        return int(getattr(found, "tp_size", None) or getattr(found, "world_size", 1))
    return int(getattr(llm_args, "tensor_parallel_size", 1) or 1)


def rank(llm_args: Any) -> int:
    found = mapping(llm_args)
    return int(getattr(found, "rank", 0) or 0) if found is not None else 0


def model_id(llm_args: Any) -> str:
    return str(getattr(llm_args, "model", "") or "")


def capacity(llm_args: Any) -> tuple[int, int] | None:
    """``(max_num_tokens, max_batch_size)``: a step that fills either is a busy engine's."""
    tokens, batch = getattr(llm_args, "max_num_tokens", None), getattr(llm_args, "max_batch_size", None)
    return (int(tokens), int(batch)) if tokens and batch else None


def pins_finished_requests(llm_args: Any) -> bool:
    """Whether the engine may write a freed block outside the forward pass, before ``start_load_kv``
    can order that write after kvbm's stores: a partial-reuse copy, or KV arriving from a context
    server (disaggregated serving's cache transceiver). Only then does kvbm hold finished requests'
    blocks, while their stores run."""
    kv = llm_args.kv_cache_config
    partial_copy = getattr(kv, "enable_partial_reuse", False) and getattr(kv, "copy_on_partial_reuse", True)
    transceiver = getattr(llm_args, "cache_transceiver_config", None)
    return bool(partial_copy or getattr(transceiver, "backend", None))


def is_generation_only(request: Any) -> bool:
    """A property on TRT-LLM's C++ request, a method on its Python subclass."""
    flag = getattr(request, "is_generation_only_request", False)
    return bool(flag() if callable(flag) else flag)


def request_scope(request: Any) -> RequestScope:
    """What besides the tokens separates this request's KV: its cache salt (the 1.3 string, else
    the runtime's integer id, which 1.2 requests and every binding carry) and its LoRA adapter."""
    salt = getattr(request, "cache_salt", None)
    salt_id = getattr(request, "cache_salt_id", None)
    lora = getattr(request, "lora_task_id", None)
    return RequestScope(
        cache_salt=None if salt is None else str(salt),
        cache_salt_id=None if salt is not None or salt_id is None else int(salt_id),
        lora_task_id=None if lora is None else int(lora),
    )
