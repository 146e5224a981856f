"""Sessions on the reference executor: the executor's dynamic arrivals (``run(..., on_finish=...)``)
and the bench's session driver, which sends each user's next round with the answer just generated."""

from __future__ import annotations


import numpy as np
import pytest

from kvbm_core.bench import MultiRoundQA, WorkloadConfig
from kvbm_core.bench.sessions import SessionDriver
from kvbm_core.testing import ExecutorConfig, ReferenceExecutor, RequestResult, RequestSpec




def test_requests_created_on_finish_join_the_run_with_the_next_indices():
    executor = ReferenceExecutor(ExecutorConfig(tokens_per_block=16, num_blocks=32, max_seq_len=128))
    seen: list[tuple[int, int]] = []

    def on_finish(index: int, result: RequestResult) -> list[RequestSpec]:
        seen.append((index, len(result.tokens)))
        if index >= 2:
            return []
        follow = RequestSpec(prompt=[7, 8, 9, *result.tokens], max_new_tokens=3, arrival_time_s=result.finish_s + 0.05)
        return [follow]

    run = executor.run([RequestSpec(prompt=list(range(1, 20)), max_new_tokens=4)], on_finish=on_finish)
    assert [i for i, _ in seen] == [0, 1, 2]
    assert [r.prompt_len for r in run.requests] == [19, 7, 6]
    first, second, third = run.requests
    assert second.arrival_s == pytest.approx(first.finish_s + 0.05)
    assert second.first_token_s is not None and second.first_token_s >= second.arrival_s
    assert third.arrival_s >= second.finish_s
    alone = ReferenceExecutor(ExecutorConfig(tokens_per_block=16, num_blocks=32, max_seq_len=128))
    again = alone.run([RequestSpec(prompt=[7, 8, 9, *first.tokens], max_new_tokens=3)])
    assert again.requests[0].tokens == second.tokens


def test_the_driver_runs_every_round_with_the_generated_answer_in_the_next_prompt():
    cfg = WorkloadConfig(users=3, rounds=3, system_tokens=16, history_tokens=20, question_tokens=4,
                         answer_tokens=5, qps=200.0, seed=3, vocab_size=512)
    workload = MultiRoundQA(cfg)
    executor = ReferenceExecutor(
        ExecutorConfig(tokens_per_block=16, num_blocks=64, max_seq_len=cfg.max_sequence_tokens)
    )
    done: list[int] = []
    driver = SessionDriver(workload, on_request_done=lambda: done.append(1))
    run = executor.run(driver.initial_specs(), driver.on_finish)
    assert len(run.requests) == cfg.num_requests == len(done)
    by_turn = {(t.user, t.round): r for t, r in zip(driver.turns, run.requests, strict=True)}
    assert sorted(by_turn) == [(u, r) for u in range(3) for r in range(3)]
    for user in range(3):
        prompt = workload.first_prompt(user)
        for rnd in range(3):
            result = by_turn[(user, rnd)]
            assert result.prompt_len == len(prompt) == cfg.prompt_tokens(rnd)
            assert len(result.tokens) == cfg.answer_tokens
            if rnd:
                before = by_turn[(user, rnd - 1)]
                assert result.arrival_s == pytest.approx(cfg.next_send_s(before.arrival_s, before.finish_s))
            prompt = workload.next_prompt(user, rnd + 1, prompt, np.array(result.tokens)) if rnd < 2 else prompt
        # the later rounds reused the earlier ones' blocks from the device pool
        assert by_turn[(user, 2)].device_reused_tokens >= cfg.prompt_tokens(1) // 16 * 16
    assert [by_turn[(u, 0)].arrival_s for u in range(3)] == pytest.approx([cfg.join_s(u) for u in range(3)])
