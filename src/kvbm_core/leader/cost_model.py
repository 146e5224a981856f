"""Cost-aware matching: promise a tier's blocks only when loading them beats recomputing them.

Dynamo promises every disk hit, yet on the measured machine 16k tokens of Llama-8B KV take about
1.3 s to read back from disk against 0.56 s to recompute. Here each matched run is priced first:

- loading ``n_t`` blocks from tier ``t`` costs ``fixed_overhead_s + n_t * bytes_per_block / bw_t``
  (the overhead once per tier that contributes); the tiers' times add up (a conservative bound:
  the engine waits for all of them). A block below the host tier also pays the host -> device copy
  (it is staged into the host first);
- recomputing ``k`` blocks costs ``k * tokens_per_block / prefill_tokens_per_s``.

Over the matched run (host and disk blocks in prompt order) the promise is the prefix length ``k``
with the largest predicted saving ``recompute(k) - load(k)``; ``k = 0`` (promise nothing) when no
prefix saves time. With a fast host and a slow disk this keeps the host blocks and drops the disk
tail; a disk block between host blocks is kept only when the host blocks after it pay for it.

Bandwidth per tier kind starts at the tier plugin's ``read_gbps``, is replaced by
``cost_model.bandwidth_gbps[kind]`` when set, and then follows observed loads (``OpResult.num_bytes
/ seconds`` of rank 0, less the fixed overhead) as an exponentially weighted moving average.
``cost_model.enabled = false`` promises every matched block.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kvbm_core.settings.model import CostModelSettings

EWMA_WEIGHT = 0.25
"""Weight of a new observation in the bandwidth average."""


class CostModel:
    """Predicts onboard time per tier and chooses how much of a match to promise."""

    def __init__(self, settings: CostModelSettings, bytes_per_block: int, tokens_per_block: int,
                 default_gbps: Mapping[str, float], host_kind: str | None = None) -> None:
        self.enabled = settings.enabled
        self.prefill_tokens_per_s = settings.prefill_tokens_per_s
        self.fixed_overhead_s = settings.fixed_overhead_s
        self.bytes_per_block = bytes_per_block
        self.tokens_per_block = tokens_per_block
        self.host_kind = host_kind
        self._gbps = {kind: float(settings.bandwidth_gbps.get(kind, gbps)) for kind, gbps in default_gbps.items()}

    def bandwidth_gbps(self, kind: str) -> float:
        return self._gbps[kind]

    def observe(self, kind: str, num_bytes: int, seconds: float) -> None:
        """Fold one finished load of ``num_bytes`` in ``seconds`` into ``kind``'s bandwidth."""
        if kind not in self._gbps or num_bytes <= 0 or seconds <= 0:
            return
        transfer_s = max(seconds - self.fixed_overhead_s, 0.1 * seconds)
        observed = num_bytes / transfer_s / 1e9
        self._gbps[kind] = (1 - EWMA_WEIGHT) * self._gbps[kind] + EWMA_WEIGHT * observed

    def load_seconds(self, counts: Mapping[str, int]) -> float:
        """Predicted time to onboard ``counts[kind]`` blocks from each tier kind."""
        return sum(
            self.fixed_overhead_s + n * self.bytes_per_block / (self._gbps[kind] * 1e9)
            for kind, n in counts.items() if n > 0
        )

    def best_run(self, n: int, kind: str) -> int:
        """:meth:`best_prefix` for ``n`` blocks all from ``kind``: the saving is linear in the
        count, so all or nothing."""
        if not self.enabled:
            return n
        per_block = self.tokens_per_block / self.prefill_tokens_per_s - self._seconds_per_block(kind)
        return n if n * per_block - self.fixed_overhead_s > 0 else 0

    def _seconds_per_block(self, kind: str) -> float:
        own = self.bytes_per_block / (self._gbps[kind] * 1e9)
        if self.host_kind is None or kind == self.host_kind:
            return own
        return own + self.bytes_per_block / (self._gbps[self.host_kind] * 1e9)  # staged, then copied

    def recompute_seconds(self, num_blocks: int) -> float:
        return num_blocks * self.tokens_per_block / self.prefill_tokens_per_s

    def best_prefix(self, tier_of_block: np.ndarray, kinds: tuple[str, ...]) -> int:
        """How many leading blocks of a matched run to promise.

        ``tier_of_block[i]`` indexes ``kinds``: where block ``i`` of the run would load from.
        """
        n = len(tier_of_block)
        if n == 0 or not self.enabled:
            return n
        first = int(tier_of_block[0])
        if (tier_of_block == first).all():
            return self.best_run(n, kinds[first])
        k = np.arange(n + 1, dtype=np.float64)
        saving = k * (self.tokens_per_block / self.prefill_tokens_per_s)
        for code, kind in enumerate(kinds):
            mine = tier_of_block == code
            if not mine.any():
                continue
            per_block = self._seconds_per_block(kind)
            used = np.zeros(n + 1, np.float64)
            np.cumsum(mine, out=used[1:])
            saving -= used * per_block
            saving[1:][np.cumsum(mine) > 0] -= self.fixed_overhead_s
        best = int(np.argmax(saving))
        return best if saving[best] > 0 else 0
