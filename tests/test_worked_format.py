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


def test_worked_with_expression_must_restate_the_problem():
    """The GRPO demo's policy learned to copy the system prompt's example '2 + 3 = 5 / Answer: 5'
    for every problem when any '... = N' line counted; with the row's expression it earns 0."""
    copied = "2 + 3 = 5\nAnswer: 5"
    assert shows_work(copied) and not shows_work(copied, "7 + 4")
    assert shows_work("7 + 4 = 12\nAnswer: 12", "7 + 4")  # the form, not the value
    assert shows_work("Sure.\n7  +  4 = 11\nAnswer: 11", "7 + 4")
    assert load_reward("worked")([], [copied, "7 + 4 = 11\nAnswer: 11"],
                                 expression=["7 + 4", "7 + 4"]) == [0.0, 1.0]


def test_single_difficulty_has_no_negative_answers():
    from tether.data.tasks.arithmetic import arithmetic_problems

    rows = arithmetic_problems(400, seed=0, difficulty="single")
    assert all(0 <= r["answer"] <= 18 for r in rows)
    assert {r["expression"].split()[1] for r in rows} == {"+", "-"}
