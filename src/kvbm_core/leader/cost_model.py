"""Cost-aware matching: promise a tier's blocks only when loading them beats recomputing them.

Dynamo promises every disk hit, yet on the measured machine 16k tokens of Llama-8B KV take about
1.3 s to read back from disk against 0.56 s to recompute. Here each matched run is priced first:

- loading ``n_t`` blocks from tier ``t`` costs ``fixed_overhead_s + n_t * bytes_per_block / bw_t``
  (the overhead once per tier that contributes); the tiers' times add up (a conservative bound:
  the engine waits for all of them). A block below the host tier also pays the host -> device copy
  (it is staged into the host first);
- recomputing blocks costs what the engine's own forward passes say (:class:`PrefillSpeed`): each
  token ``a`` seconds, plus ``b`` seconds per token of context before it (attention reads it),
  fitted from steps that computed prompt tokens and loaded nothing; ``prefill_tokens_per_s`` is the
  start (``a = 1 / prefill_tokens_per_s``, ``b = 0``) and all there is with
  ``cost_model.learn_prefill = false``. While the engine is saturated (most of its last steps
  filled ``max_num_tokens`` or ``max_batch_size``), recomputing also delays other requests, while a
  load takes no GPU time: recompute time then counts up to twice.

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

from collections import deque
from collections.abc import Mapping

import numpy as np

from kvbm_core.settings.model import CostModelSettings

EWMA_WEIGHT = 0.25
"""Weight of a new observation in the bandwidth average."""
FORGET = 0.97
"""How much of the prefill fit each new step keeps (about the last 30 steps count)."""
MIN_LEARN_TOKENS = 128
"""Steps computing fewer prompt tokens (decode steps) say little about prefill speed."""
BUSY_WINDOW = 32
"""Steps over which saturation is judged."""


class StepWork:
    """What one engine step computed, from its scheduler output: tokens, the sum of their positions
    (attention cost), how many requests, and whether kvbm loaded blocks in it."""

    __slots__ = ("requests", "tokens", "position_sum", "loads")

    def __init__(self, requests: int) -> None:
        self.requests = requests
        self.tokens = 0
        self.position_sum = 0.0
        self.loads = False

    def add(self, first_position: int, num_tokens: int) -> None:
        self.tokens += num_tokens
        self.position_sum += num_tokens * (first_position + (num_tokens - 1) / 2)


class PrefillSpeed:
    """Seconds to compute prompt tokens: ``a * n + b * (sum of their positions)``, fitted by
    exponentially forgetting least squares over the engine's forward passes."""

    def __init__(self, tokens_per_s: float, learn: bool) -> None:
        self.learn = learn
        self.a = 1.0 / tokens_per_s
        self.b = 0.0
        self.observed = 0
        self._xx = np.zeros((2, 2))
        self._xy = np.zeros(2)

    def observe(self, tokens: int, position_sum: float, seconds: float) -> None:
        """One forward pass that computed ``tokens`` prompt tokens at positions summing to ``position_sum``."""
        if not self.learn or tokens < MIN_LEARN_TOKENS or not seconds > 0:
            return
        x = np.array([tokens / 1e3, position_sum / 1e6])  # scaled: both columns near 1
        self._xx = FORGET * self._xx + np.outer(x, x)
        self._xy = FORGET * self._xy + x * seconds
        self.observed += 1
        if self.observed < 3:
            self.a = float(self._xy[0] / self._xx[0, 0]) / 1e3  # per token only, until the context term is fitted
            return
        ridge = 1e-9 * np.trace(self._xx) * np.eye(2)
        a, b = np.linalg.solve(self._xx + ridge, self._xy)
        if b < 0 or a <= 0:  # noise said attention is free: keep the per-token fit alone
            a, b = self._xy[0] / self._xx[0, 0], 0.0
        self.a, self.b = float(a) / 1e3, float(b) / 1e6

    def seconds(self, first_position: np.ndarray | float, num_tokens: int) -> np.ndarray | float:
        """Time to compute ``num_tokens`` consecutive tokens starting at ``first_position``."""
        return self.a * num_tokens + self.b * num_tokens * (first_position + (num_tokens - 1) / 2)

    @property
    def tokens_per_s(self) -> float:
        """At position 0."""
        return 1.0 / self.a


class CostModel:
    """Predicts onboard time per tier and chooses how much of a match to promise."""

    def __init__(self, settings: CostModelSettings, bytes_per_block: int, tokens_per_block: int,
                 default_gbps: Mapping[str, float], host_kind: str | None = None,
                 capacity: tuple[int, int] | None = None) -> None:
        self.enabled = settings.enabled
        self.prefill = PrefillSpeed(settings.prefill_tokens_per_s, settings.learn_prefill)
        self.fixed_overhead_s = settings.fixed_overhead_s
        self.capacity = capacity  # the engine's (max_num_tokens, max_batch_size), when known
        self._busy: deque[bool] = deque(maxlen=BUSY_WINDOW)
        self.bytes_per_block = bytes_per_block
        self.tokens_per_block = tokens_per_block
        self.host_kind = host_kind
        self._gbps = {kind: float(settings.bandwidth_gbps.get(kind, gbps)) for kind, gbps in default_gbps.items()}

    def bandwidth_gbps(self, kind: str) -> float:
        return self._gbps[kind]

    def observe_step(self, tokens: int, position_sum: float, requests: int, seconds: float | None) -> None:
        """One engine step: ``tokens`` computed (all requests), ``requests`` scheduled, and the forward
        pass's time when it loaded nothing (``None`` otherwise: loads would count as compute)."""
        if self.capacity is not None:
            max_tokens, max_batch = self.capacity
            self._busy.append(tokens >= 0.9 * max_tokens or requests >= max_batch)
        if seconds is not None:
            self.prefill.observe(tokens, position_sum, seconds)

    @property
    def busy_weight(self) -> float:
        """1 when the engine has room; up to 2 when its recent steps were all full."""
        return 1.0 + (sum(self._busy) / len(self._busy) if self._busy else 0.0)

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

    def best_run(self, n: int, kind: str, first_block: int = 0) -> int:
        """:meth:`best_prefix` for ``n`` blocks all from ``kind``: a block's recompute cost grows with
        its position and its load cost does not, so the best is all or nothing."""
        if not self.enabled or n == 0:
            return n
        saving = self.recompute_seconds(n, first_block) - n * self._seconds_per_block(kind) - self.fixed_overhead_s
        return n if saving > 0 else 0

    def _seconds_per_block(self, kind: str) -> float:
        own = self.bytes_per_block / (self._gbps[kind] * 1e9)
        if self.host_kind is None or kind == self.host_kind:
            return own
        return own + self.bytes_per_block / (self._gbps[self.host_kind] * 1e9)  # staged, then copied

    def recompute_seconds(self, num_blocks: int, first_block: int = 0) -> float:
        """Predicted time to compute blocks ``first_block ..`` (``num_blocks`` of them), weighted by
        how busy the engine is."""
        tpb = self.tokens_per_block
        return float(self.prefill.seconds(first_block * tpb, num_blocks * tpb)) * self.busy_weight

    def _block_recompute(self, n: int, first_block: int) -> np.ndarray:
        """Each of ``n`` blocks' recompute time, from ``first_block`` on."""
        tpb = self.tokens_per_block
        starts = (first_block + np.arange(n, dtype=np.float64)) * tpb
        return np.asarray(self.prefill.seconds(starts, tpb), np.float64) * self.busy_weight

    def best_prefix(self, tier_of_block: np.ndarray, kinds: tuple[str, ...], first_block: int = 0) -> int:
        """How many leading blocks of a matched run to promise.

        ``tier_of_block[i]`` indexes ``kinds``: where block ``i`` of the run would load from; the
        run starts at block ``first_block`` of the prompt.
        """
        n = len(tier_of_block)
        if n == 0 or not self.enabled:
            return n
        first = int(tier_of_block[0])
        if (tier_of_block == first).all():
            return self.best_run(n, kinds[first], first_block)
        saving = np.zeros(n + 1, np.float64)
        np.cumsum(self._block_recompute(n, first_block), out=saving[1:])
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
