"""Where a stream lane issues a ticket: in the caller when nothing must wait, else in its thread, in order.

On CUDA, issuing only enqueues copies, so a ready ticket is issued by the caller without a thread
hop. The lane's stream stands in here for a CUDA one: the rule is about threads and order, not
about what the call does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from kvbm_core.worker.engine import _StreamLane


def _lane(cuda: bool) -> _StreamLane:
    lane = _StreamLane("test-lane", torch.device("cpu"), False, lambda: None)
    if cuda:
        lane.stream = object()  # type: ignore[assignment]  # a stream exists: the CUDA case
    return lane


def test_ready_call_on_cuda_runs_in_the_caller() -> None:
    lane = _lane(cuda=True)
    ran_in: list[int] = []
    lane.run(lambda: ran_in.append(threading.get_ident()), ready=True)
    assert ran_in == [threading.get_ident()]
    lane.shutdown()


def test_waiting_calls_and_those_behind_them_run_in_the_thread_in_order() -> None:
    lane = _lane(cuda=True)
    release = threading.Event()
    order: list[tuple[str, int]] = []
    done = threading.Event()

    def record(name: str, *, block: bool = False, last: bool = False) -> Callable[[], None]:
        def call() -> None:
            if block:
                release.wait(10)
            order.append((name, threading.get_ident()))
            if last:
                done.set()

        return call

    lane.run(record("waits", block=True), ready=False)  # must wait for an earlier ticket: the thread
    lane.run(record("ready-behind"), ready=True)  # ready, but the thread has work: behind it
    release.set()
    lane.run(record("after", last=True), ready=True)
    assert done.wait(10)
    names = [name for name, _ in order]
    assert names.index("waits") < names.index("ready-behind")
    assert {tid for name, tid in order if name != "after"} == {order[0][1]} != {threading.get_ident()}
    lane.shutdown()


def test_cpu_copies_always_run_in_the_thread() -> None:
    lane = _lane(cuda=False)
    ran_in: list[int] = []
    finished = threading.Event()
    lane.run(lambda: (ran_in.append(threading.get_ident()), finished.set()), ready=True)
    assert finished.wait(10)
    assert ran_in != [threading.get_ident()]
    lane.shutdown()
