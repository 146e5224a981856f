"""Failures the reference executor raises when a connector breaks TRT-LLM's contract or serves wrong KV."""

from __future__ import annotations


class ContractViolation(RuntimeError):
    """A connector did something TRT-LLM would reject or silently mishandle.

    ``call`` names the connector method (or construction step) at fault. It is a ``RuntimeError``
    because TRT-LLM raises ``RuntimeError`` for the cases it checks itself (``(0, True)`` from
    ``get_num_new_matched_tokens``, a prompt with no token left to compute). After one is raised
    the executor's state is undefined: build a new one.
    """

    def __init__(self, call: str, message: str):
        self.call = call
        super().__init__(f"{call}: {message}")


class ExecutorStopped(RuntimeError):
    """The executor loop ended the way TensorRT-LLM's does after a connector error it cannot contain.

    With the overlap scheduler, an exception inside the forward pass fails every active request and
    then TensorRT-LLM's ``assert sample_state is not None`` ends its executor thread.
    """


class OracleMismatch(AssertionError):
    """KV a request reused or onboarded differs from what recomputing its prefix produces."""

    def __init__(self, request_id: int, layer: int, kind: str, rank: int, position: int, max_abs_diff: float):
        self.request_id = request_id
        self.layer = layer
        self.kind = kind
        self.rank = rank
        self.position = position
        self.max_abs_diff = max_abs_diff
        super().__init__(
            f"request {request_id}: {kind} of layer {layer} on rank {rank} differs from recomputation "
            f"from token position {position} (max abs diff {max_abs_diff:g})"
        )
