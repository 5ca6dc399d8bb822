"""The `worked` reward: the arithmetic task's demonstrated form '... = N' / 'Answer: N'."""

from tether.data.tasks.arithmetic import shows_work
from tether.rewards import WorkedFormatReward, load_reward


def test_shows_work_needs_the_sum_line_and_the_same_answer():
    assert shows_work("3 + 4 = 7\nAnswer: 7")
    assert shows_work("Let me see.\n12 - 15 = -3\nAnswer: -3  \n")
    assert not shows_work("Answer: 7")  # the bare answer: the shortcut a format reward teaches
    assert not shows_work("3 + 4 = 8\nAnswer: 7")  # inconsistent
    assert not shows_work("3 + 4 = 7 Answer: 7")  # not on its own line
    assert not shows_work("3 + 4 = 7\nAnswer: 7 because")  # must end the reply


def test_worked_reward_by_name():
    fn = load_reward("worked")
    assert isinstance(fn, WorkedFormatReward)
    assert fn([], ["1 + 1 = 2\nAnswer: 2", "Answer: 2", "2"]) == [1.0, 0.0, 0.0]
