"""Skip schedules against hand-computed values, and the seeded decision draw."""

import subprocess
import sys

import pytest

from stsc.schedules import SkipSchedule, draw_skips, layer_probabilities, sts_probability


def test_sts_formula_hand_computed():
    # L=4, alpha=0.5, eps=0.5, E=2, e=1: time factor (1/2)^2 = 0.25; depth 0.5, 5/6, 7/6, 1.5
    expected = [0.0625, 0.5 * 0.25 * (1 - 0.5 / 3), 0.5 * 0.25 * (1 + 0.5 / 3), 0.1875]
    got = [sts_probability(l, 4, 1.0, 2.0, 0.5, 0.5) for l in range(4)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert sum(got) / 4 == pytest.approx(0.5 * 0.25)  # mean over layers is alpha * ((E-e)/E)^2


def test_schedule_decays_to_zero_at_end_of_stage():
    schedule = SkipSchedule(alpha=0.6, eps=0.0, epochs=1.0)
    assert layer_probabilities(schedule, 3, 0.0) == pytest.approx([0.6] * 3)
    assert layer_probabilities(schedule, 3, 0.5) == pytest.approx([0.15] * 3)
    assert layer_probabilities(schedule, 3, 1.0) == [0.0] * 3
    assert layer_probabilities(schedule, 3, 7.0) == [0.0] * 3  # past the stage: dense


@pytest.mark.parametrize("kind, expected", [("linear", 0.3 * 0.75), ("constant", 0.3), ("sts", 0.3 * 0.75 ** 2)])
def test_other_schedules(kind, expected):
    assert layer_probabilities(SkipSchedule(schedule=kind, alpha=0.3, eps=0.0, epochs=4.0), 2, 1.0) == pytest.approx([expected] * 2)


def test_integer_epochs_move_once_per_epoch():
    schedule = SkipSchedule(alpha=0.4, eps=0.0, epochs=2.0, integer_epochs=True)
    assert layer_probabilities(schedule, 2, 0.9) == pytest.approx([0.4, 0.4])
    assert layer_probabilities(schedule, 2, 1.7) == pytest.approx([0.1, 0.1])


def test_protected_and_unskippable_blocks_get_zero():
    schedule = SkipSchedule(alpha=0.5, eps=0.0, never_skip_first=1, never_skip_last=2)
    assert layer_probabilities(schedule, 5, 0.0) == [0.0, 0.5, 0.5, 0.0, 0.0]
    assert layer_probabilities(schedule, 5, 0.0, [True, True, False, True, True]) == [0.0, 0.5, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=0.8, eps=0.5), "alpha * (1 + eps) must be in [0, 1] so that every skip probability is valid, "
                               "got alpha=0.8, eps=0.5 (1.2)"),
    (dict(eps=1.5), "eps must be in [0, 1], got 1.5"),
    (dict(schedule="cosine"), "schedule must be one of sts, linear, constant, got 'cosine'"),
    (dict(epochs=0), "epochs must be > 0, got 0"),
    (dict(min_kept=0), "min_kept must be >= 1 so that every step runs at least one block, got 0"),
    (dict(never_skip_last=-1), "never_skip_last must be >= 0, got -1"),
])
def test_invalid_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError) as err:
        SkipSchedule(**kwargs)
    assert str(err.value) == message


def test_draw_is_a_function_of_seed_step_and_micro_step():
    probabilities = [0.5] * 16
    first = draw_skips(probabilities, seed=3, step=10, micro_step=0, min_kept=1)
    assert draw_skips(probabilities, 3, 10, 0, 1) == first
    others = {tuple(draw_skips(probabilities, 3, step, 0, 1)) for step in range(11, 31)}
    assert len(others) > 10  # different steps give different patterns


def test_draw_is_identical_in_another_process():
    code = "from stsc.schedules import draw_skips; print(draw_skips([0.5] * 16, 7, 123, 2, 1))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == str(draw_skips([0.5] * 16, 7, 123, 2, 1))


def test_min_kept_caps_a_schedule_that_would_skip_everything():
    assert draw_skips([1.0] * 4, 0, 0, 0, min_kept=1) == [1, 2, 3]
    assert draw_skips([1.0, 0.9, 1.0, 1.0], 0, 0, 0, min_kept=2) == [2, 3]
