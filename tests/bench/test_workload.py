"""The multi-round QA workload: exact lengths, prefix extension, per-user distinct tokens, determinism,
no shared blocks in the no-reuse preset, and the arrival schedule."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm_core.bench import MultiRoundQA, WorkloadConfig, build_config
from kvbm_core.errors import ConfigError

BASE = WorkloadConfig(users=4, rounds=3, system_tokens=40, history_tokens=70, question_tokens=9,
                      answer_tokens=11, qps=2.0, seed=7, vocab_size=512)


def session(workload: MultiRoundQA, user: int, answers: list[np.ndarray]) -> list[np.ndarray]:
    """Every round's prompt of one user, with the given answers standing in for generated ones."""
    prompts = [workload.first_prompt(user)]
    for r in range(1, workload.config.rounds):
        prompts.append(workload.next_prompt(user, r, prompts[-1], answers[r - 1]))
    return prompts


def full_blocks(tokens: np.ndarray, tpb: int) -> list[tuple[int, ...]]:
    """Each full block as its whole prefix (what a block's identity covers)."""
    return [tuple(tokens[: (i + 1) * tpb].tolist()) for i in range(len(tokens) // tpb)]


@settings(max_examples=30, deadline=None)
@given(
    users=st.integers(1, 4),
    rounds=st.integers(1, 5),
    system=st.integers(0, 50),
    history=st.integers(0, 80),
    question=st.integers(1, 12),
    answer=st.integers(1, 12),
    seed=st.integers(0, 2**31),
)
def test_every_round_extends_the_previous_one_by_answer_and_question(users, rounds, system, history, question,
                                                                      answer, seed):
    cfg = WorkloadConfig(users, rounds, system, history, question, answer, qps=1.0, seed=seed, vocab_size=1000)
    workload = MultiRoundQA(cfg)
    rng = np.random.default_rng(seed)
    for user in range(users):
        answers = [rng.integers(0, 1000, answer) for _ in range(rounds)]
        prompts = session(workload, user, answers)
        for r, prompt in enumerate(prompts):
            assert len(prompt) == cfg.prompt_tokens(r)
            assert prompt.min() >= 0 and prompt.max() < 1000
            np.testing.assert_array_equal(prompt[:system], workload.system_prompt())
            np.testing.assert_array_equal(prompt[system : system + history], workload.history(user))
            np.testing.assert_array_equal(prompt[-question:], workload.question(user, r))
            if r:
                previous = prompts[r - 1]
                np.testing.assert_array_equal(prompt[: len(previous)], previous)
                np.testing.assert_array_equal(prompt[len(previous) : len(previous) + answer], answers[r - 1])
        assert len(prompts[-1]) + answer == cfg.max_sequence_tokens
    assert cfg.num_requests == users * rounds


def test_users_share_the_system_prompt_and_nothing_after_it():
    workload = MultiRoundQA(replace(BASE, system_tokens=32))
    tpb = 16
    system_blocks = set(full_blocks(workload.system_prompt(), tpb))
    assert len(system_blocks) == 2
    per_user = [set(full_blocks(workload.first_prompt(u), tpb)) for u in range(BASE.users)]
    for a in range(BASE.users):
        assert system_blocks <= per_user[a]
        for b in range(a + 1, BASE.users):
            assert per_user[a] & per_user[b] == system_blocks
            assert not np.array_equal(workload.history(a), workload.history(b))


def test_token_ids_are_fixed_by_the_seed_and_independent_of_the_order_asked():
    one, two = MultiRoundQA(BASE), MultiRoundQA(BASE)
    later_first = [two.question(3, 2), two.history(2)]
    np.testing.assert_array_equal(one.history(2), later_first[1])
    np.testing.assert_array_equal(one.question(3, 2), later_first[0])
    for user in range(BASE.users):
        np.testing.assert_array_equal(one.first_prompt(user), two.first_prompt(user))
    other_seed = MultiRoundQA(replace(BASE, seed=8))
    assert not np.array_equal(one.first_prompt(0), other_seed.first_prompt(0))
    warmup_stream = MultiRoundQA(BASE, namespace=1)
    assert not np.array_equal(one.system_prompt(), warmup_stream.system_prompt())


def test_the_no_reuse_preset_shares_no_full_block_between_any_two_requests():
    cfg = build_config("no-reuse", {})
    workload = MultiRoundQA(cfg.workload())
    assert cfg.rounds == 1 and cfg.system_tokens == 0
    seen: set[tuple[int, ...]] = set()
    total = 0
    for user in range(cfg.users):
        blocks = full_blocks(workload.first_prompt(user), cfg.tokens_per_block)
        total += len(blocks)
        seen.update(blocks)
    assert total == cfg.users * (cfg.workload().prompt_tokens(0) // cfg.tokens_per_block) > 0
    assert len(seen) == total


def test_schedule_staggers_users_and_spaces_each_users_rounds_by_users_over_qps():
    assert BASE.gap_s == pytest.approx(2.0)  # 4 users / 2 qps
    assert [BASE.join_s(u) for u in range(4)] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert BASE.next_send_s(sent_s=1.0, finished_s=1.4) == pytest.approx(3.0)  # finished early: wait the gap
    assert BASE.next_send_s(sent_s=1.0, finished_s=3.5) == pytest.approx(3.5)  # finished late: send at once
    ramp = replace(BASE, ramp_up_s=8.0)
    assert ramp.join_s(2) == pytest.approx(4.0)
    unpaced = replace(BASE, qps=math.inf)
    assert unpaced.gap_s == 0.0 and unpaced.join_s(3) == 0.0
    assert unpaced.next_send_s(sent_s=0.0, finished_s=0.7) == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"users": 0}, "--users"),
        ({"rounds": 0}, "--rounds"),
        ({"question_tokens": 0}, "--question-tokens"),
        ({"answer_tokens": 0}, "--answer-tokens"),
        ({"history_tokens": -1}, "--history-tokens"),
        ({"qps": 0.0}, "--qps"),
        ({"qps": math.nan}, "--qps"),
        ({"ramp_up_s": -1.0}, "--ramp-up-s"),
    ],
)
def test_a_bad_knob_is_an_error_naming_its_flag(change, flag):
    with pytest.raises(ConfigError) as err:
        replace(BASE, **change)
    assert err.value.source == flag


def test_answers_of_the_wrong_length_are_refused():
    workload = MultiRoundQA(BASE)
    with pytest.raises(ValueError, match="answer has 3 tokens"):
        workload.next_prompt(0, 1, workload.first_prompt(0), np.zeros(3, np.int64))
