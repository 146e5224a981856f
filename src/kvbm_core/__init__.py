"""kvbm: a KV-cache block manager for TensorRT-LLM.

The leader (scheduler side) decides which KV blocks live in which tier slot; workers (one per
rank) move the bytes. Storage tiers, policies and transports are plugins found through the
``kvbm`` entry-point group; ``kvbm_core.hookspecs`` lists every extension point.
"""

__version__ = "0.1.0"

from kvbm_core.hookspecs import hookimpl  # noqa: E402  (what plugins decorate their hooks with)

__all__ = ["__version__", "hookimpl"]
