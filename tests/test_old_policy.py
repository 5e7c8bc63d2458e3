"""The old-policy round schedule: which steps get a forward-only pass, and with which weights."""

import pytest
import torch

from megatron_psft.psft.old_policy import OldPolicy, RoundSchedule

CURRENT = "current"  # in the records below: the step's training forward gave its old log-probs


class Passes:
    """Records the steps a pass computed; returns a tensor tagged with the weights' version."""

    def __init__(self, name):
        self.name, self.steps, self.version = name, [], 0

    def __call__(self, step):
        self.steps.append(step)
        return [torch.tensor([float(self.version)])]


def _run(schedule, steps, start=0, policy=None):
    policy = policy or OldPolicy(schedule)
    current, frozen, used = Passes("current"), Passes("frozen"), {}
    for step in range(start, steps):
        old = policy.for_step(step, current, frozen)
        used[step] = CURRENT if old.old_is_current else float(old.per_micro_batch[0])
        current.version += 1  # the optimizer step changes the weights
    return policy, current, frozen, used


def test_rounds_of_eight_reuse_the_first_step_and_run_one_pass_per_round():
    _, current, frozen, used = _run(RoundSchedule(8), 16)
    assert current.steps == list(range(1, 8)) + list(range(9, 16))
    assert frozen.steps == []
    assert used[0] == used[8] == CURRENT
    assert all(used[s] == 0 for s in range(1, 8))  # computed with the round-start weights
    assert all(used[s] == 8 for s in range(9, 16))


def test_without_reuse_the_pass_covers_the_first_step_too():
    _, current, _, used = _run(RoundSchedule(4, reuse_first_step=False), 8)
    assert current.steps == list(range(0, 8))
    assert used[0] == 0 and used[4] == 4 and CURRENT not in used.values()


def test_rounds_start_after_the_sft_warm_up():
    schedule = RoundSchedule(4, first_step=3)
    assert [schedule.round_start(s) for s in (3, 6, 7, 10)] == [3, 3, 7, 7]
    assert schedule.old_is_current(7) and not schedule.old_is_current(8)


def test_never_refreshed_policy_uses_the_frozen_copy_on_every_later_step():
    _, current, frozen, used = _run(RoundSchedule(None), 5)
    assert current.steps == [] and frozen.steps == [1, 2, 3, 4]
    assert used[0] == CURRENT


def test_resume_mid_round_continues_with_the_saved_old_logprobs():
    policy, _, _, straight = _run(RoundSchedule(4), 8)
    first, _, _, _ = _run(RoundSchedule(4), 2)
    resumed = OldPolicy(RoundSchedule(4))
    resumed.load_state_dict(first.state_dict())
    current, frozen, used = Passes("current"), Passes("frozen"), {}
    current.version = 2
    for step in range(2, 8):
        old = resumed.for_step(step, current, frozen)
        used[step] = CURRENT if old.old_is_current else float(old.per_micro_batch[0])
        current.version += 1
    assert used == {s: straight[s] for s in range(2, 8)}
    assert current.steps == [5, 6, 7]  # no pass for steps 2-3: they came from the checkpoint


def test_bad_interval_is_rejected():
    with pytest.raises(ValueError):
        RoundSchedule(0)


def test_the_last_round_computes_no_step_past_the_end_of_training():
    _, current, _, _ = _run(RoundSchedule(4, end_step=6), 6)
    assert current.steps == [1, 2, 3, 5]


def test_a_round_start_reuses_the_current_weights_even_with_outputs_left_over():
    """Outputs still held at a round start (e.g. computed for it by an earlier pass) are stale: the
    round's first step takes the current weights and the new pass recomputes the rest."""
    policy = OldPolicy(RoundSchedule(4))
    policy.load_state_dict({"outputs": {4: [torch.tensor([-1.0])], 5: [torch.tensor([-1.0])]}})
    current = Passes("current")
    current.version = 4
    assert policy.for_step(4, current).old_is_current
    assert current.steps == [5, 6, 7] and float(policy.for_step(5, current).per_micro_batch[0]) == 4
