"""The judge: its pure maths (hand-worked values), and a tiny random model through the real
prompt, tokenisation, batching and order averaging."""

import doctest
import math

import pytest
import torch

import tether.judge.maths as maths
from tether.errors import ConfigError
from tether.judge import (Judge, as_text, confidence, order_average, position_disagree,
                          resolve_judge_dir, two_option_prob)


def test_maths_doctests():
    assert doctest.testmod(maths).failed == 0


def test_two_option_prob_hand_values():
    """a = log 0.6, b = log 0.2: p = 0.6 / 0.8 = 0.75; a - b = log 3 -> sigmoid = 3/4 too.
    a = log 0.01, b = log 0.04 (95% of the mass elsewhere): p = 0.01 / 0.05 = 0.2."""
    p = two_option_prob(torch.tensor([math.log(.6), math.log(.01)]),
                        torch.tensor([math.log(.2), math.log(.04)]))
    assert p.tolist() == pytest.approx([0.75, 0.2], abs=1e-6)


def test_order_average_hand_values():
    """A first: P(first) = 0.9 -> p_a_first 0.9. B first: P(first) = 0.4 -> p_a_second = 0.6.
    p_a = (0.9 + 0.6) / 2 = 0.75, confidence |1.5 - 1| = 0.5, both orders prefer A: agree."""
    p_a, first, second = order_average(torch.tensor([0.9]), torch.tensor([0.4]))
    assert (p_a.item(), first.item(), second.item()) == pytest.approx((0.75, 0.9, 0.6))
    assert confidence(p_a).item() == pytest.approx(0.5)
    assert not position_disagree(first, second).item()


def test_as_text_of_messages():
    assert as_text("hi") == "hi"
    assert as_text([{"role": "user", "content": "hello"}]) == "hello"
    assert as_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) \
        == "user: a\nassistant: b"


@pytest.fixture(scope="module")
def judge(tiny_model_dir):
    return Judge.load(str(tiny_model_dir), batch_size=3)


PROMPTS = ["Write about your day.", "Describe the sea.", "A note to a friend.", "Hi"]
A = ["I had a wonderful day!", "Calm and blue.", "Miss you lots, see you soon!", "Hello"]
B = ["Awful, just awful.", "Grey, cold and angry water under a heavy sky.", "Go away.", "No."]


def test_compare_shapes_and_order_average(judge):
    r = judge.compare(PROMPTS, A, B, "Which response is more positive?")
    for field in (r.p_a, r.p_a_first, r.p_a_second, r.position_disagree, r.option_mass):
        assert field.shape == (4,)
    assert torch.allclose(r.p_a, (r.p_a_first + r.p_a_second) / 2)
    assert ((r.p_a > 0) & (r.p_a < 1)).all() and ((r.option_mass > 0) & (r.option_mass <= 1)).all()
    assert torch.equal(r.position_disagree, (r.p_a_first - .5) * (r.p_a_second - .5) < 0)
    assert torch.allclose(r.confidence, (2 * r.p_a - 1).abs())
    assert judge.calls >= 8  # two orders per pair


def test_swapping_a_and_b_gives_one_minus_p(judge):
    """Both orders are judged, so compare(B, A).p_a = 1 - compare(A, B).p_a, and A shown first
    in one call is A shown second in the other."""
    ab = judge.compare(PROMPTS, A, B, "Which is kinder?")
    ba = judge.compare(PROMPTS, B, A, "Which is kinder?")
    assert torch.allclose(ba.p_a, 1 - ab.p_a, atol=1e-5)
    assert torch.allclose(ba.p_a_first, 1 - ab.p_a_second, atol=1e-5)


def test_batching_and_padding_do_not_change_the_numbers(tiny_model_dir, judge):
    one = Judge.load(str(tiny_model_dir), batch_size=1)
    assert torch.allclose(one.compare(PROMPTS, A, B, "Which?").p_a,
                          judge.compare(PROMPTS, A, B, "Which?").p_a, atol=1e-5)
    assert torch.allclose(one.score(PROMPTS, A, "Be kind."), judge.score(PROMPTS, A, "Be kind."),
                          atol=1e-5)


def test_score_is_a_probability_per_response(judge):
    s = judge.score(PROMPTS, A, "The response is positive.")
    assert s.shape == (4,) and ((s > 0) & (s < 1)).all()


def test_chat_message_rows_are_accepted(judge):
    r = judge.compare([[{"role": "user", "content": "Hi"}]],
                      [[{"role": "assistant", "content": "Hello!"}]],
                      [[{"role": "assistant", "content": "Go."}]], "Which is friendlier?")
    assert r.p_a.shape == (1,)


def test_long_responses_are_clipped(tiny_model_dir):
    j = Judge.load(str(tiny_model_dir), max_text_tokens=8)
    long = " ".join(["word"] * 500)
    assert len(j.tokenizer(j._clip(long), add_special_tokens=False)["input_ids"]) <= 8
    assert j.compare(["p"], [long], ["short"], "Which?").p_a.shape == (1,)


def test_errors_name_the_problem(judge, tmp_path):
    with pytest.raises(ConfigError, match="one token"):
        judge._option_ids("Answer: (", ("Apple pie and custard",))
    with pytest.raises(ConfigError, match="responses_a"):
        judge.compare(["p"], ["a", "b"], ["c"], "Which?")
    with pytest.raises(ConfigError, match="not 'default'"):
        resolve_judge_dir("no-such-judge-model-anywhere")
    with pytest.raises(ConfigError, match=".gguf files"):
        resolve_judge_dir(str(tmp_path))
    assert judge.compare([], [], [], "Which?").p_a.shape == (0,)


def test_the_default_judge_loads_and_reads_one_token_options():
    """SmolLM2-135M-Instruct: "A"/"B" after "Answer: (" and " Yes"/" No" after "Answer:" are
    single tokens, and the two options hold most of the next-token mass (the format is read)."""
    j = Judge.load(batch_size=4)
    assert len(set(j.compare_ids)) == 2 and len(set(j.pointwise_ids)) == 2
    r = j.compare(["Write about your day."], ["A lovely, happy day!"], ["A sad day."],
                  "Which response is more positive in tone?")
    assert r.option_mass.item() > 0.5


def test_label_rows_put_the_preferred_response_first():
    """p_a = (0.8, 0.3, 0.5): pair 0 keeps A (p 0.8, confidence 0.6); pair 1 swaps to B
    (p 1 - 0.3 = 0.7, confidence 0.4); pair 2 is a tie: A stays chosen, p 0.5, confidence 0.
    min_confidence 0.5 keeps pair 0 only."""
    import tether.judge.labels as labels
    from tether.judge import keep_confident, label_rows

    assert doctest.testmod(labels).failed == 0
    rows = label_rows(["q0", "q1", "q2"], ["a0", "a1", "a2"], ["b0", "b1", "b2"],
                      torch.tensor([0.8, 0.3, 0.5]), torch.tensor([False, True, False]))
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("a0", "b0"), ("b1", "a1"),
                                                           ("a2", "b2")]
    assert [r["p"] for r in rows] == pytest.approx([0.8, 0.7, 0.5])
    assert [r["confidence"] for r in rows] == pytest.approx([0.6, 0.4, 0.0])
    assert [r["position_disagree"] for r in rows] == [False, True, False]
    assert [r["prompt"] for r in keep_confident(rows, 0.5)] == ["q0"]
