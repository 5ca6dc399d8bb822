"""`tether label` on a tiny random judge: the pairs each input kind gives, bad rows named, the
labels equal the judge's own comparisons, a killed or torn run resumes to the same file without
judging a pair twice, a changed setting is an error naming its key; and DPO trains from the
labels with the soft label p (hand-derived first-step loss and gradient)."""

import fcntl
import json
import math
from pathlib import Path

import pytest
import torch

from tether.config import DPOConfig, LabelConfig, LabelParams, load_config
from tether.errors import ConfigError, DataError
from tether.judge import DEFAULT_PRINCIPLE, Judge
from tether.recipes import dpo, label

RESPONSE_ROWS = [
    {"prompt": "Write about your day.",
     "responses": ["A wonderful day!", "Awful.", "It was ok."]},
    {"prompt": [{"role": "user", "content": "Describe the sea."}],
     "responses": ["Calm and blue.", "Grey and cold.", "Calm and blue."]},  # one duplicate
    {"prompt": "A note to a friend.", "responses": ["Miss you!", "Go away.", "See you soon.",
                                                    "Thanks for everything."]},
]  # pairs: 3 + 2 (the duplicate pair is not judged) + 6 = 11
PAIR_ROWS = [{"prompt": "Sky colour?", "chosen": " blue", "rejected": " green"},
             {"prompt": "Two plus two?", "chosen": " four", "rejected": " five"},
             {"chosen": [{"role": "user", "content": "Hot?"},
                         {"role": "assistant", "content": "Yes"}],
              "rejected": [{"role": "user", "content": "Hot?"},
                           {"role": "assistant", "content": "No"}]}]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir, data, out, *extra) -> LabelConfig:
    return load_config(LabelConfig, None, [
        f"--label.input={data}", f"--label.output_dir={out}", f"--judge.model={model_dir}",
        "--label.batch_pairs=3", "--judge.batch_size=4", "--progress=false", *extra])


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_pairs_of_each_input_kind():
    pairs, kind = label.pairs_of_row(RESPONSE_ROWS[1], 2, "in.jsonl", "responses")
    assert kind == "responses" and [p.key for p in pairs] == [(2, 0, 1), (2, 1, 2)]
    assert (pairs[1].a, pairs[1].b) == ([{"role": "assistant", "content": "Grey and cold."}],
                                        [{"role": "assistant", "content": "Calm and blue."}])
    (pair,), kind = label.pairs_of_row(PAIR_ROWS[2], 3, "in.jsonl", "responses")
    assert kind == "pairs" and pair.key == (3, 0, 1)  # implicit prompt: the shared message
    assert pair.prompt == [{"role": "user", "content": "Hot?"}]
    assert pair.a == [{"role": "assistant", "content": "Yes"}]


def test_bad_rows_name_file_row_and_field(tmp_path):
    cases = [
        ([{"prompt": "q", "responses": ["only one"]}], r"row 1, field 'responses': .*two or more"),
        ([{"prompt": "q", "responses": ["a", 3]}], r"row 1, field 'responses\[1\]'"),
        ([{"prompt": "q"}], r"row 1, field 'responses'"),
        ([{"prompt": "q", "responses": ["a", [{"role": "assistant", "content": "b"}]]}],
         r"row 1, field 'responses\[1\]': must be a non-empty string, got"),
        ([{"prompt": "q", "chosen": "a"}], r"row 1, field 'rejected': missing"),
        ([{"prompt": "q", "completion": "a", "label": True}], r"row 1: .*format unpaired_pref"),
        ([PAIR_ROWS[0], RESPONSE_ROWS[0]], r"row 2: is a responses row but .* pairs rows"),
    ]
    for rows, match in cases:
        data = _write(tmp_path / "in.jsonl", rows)
        with pytest.raises(DataError, match=match) as err:
            label.load_pairs(LabelParams(input=str(data)))
        assert str(data) in str(err.value)
    with pytest.raises(ConfigError, match="label.input is not set"):
        label.run(LabelConfig())


def test_labels_are_the_judges_comparisons(tiny_model_dir, tmp_path):
    data = _write(tmp_path / "in.jsonl", RESPONSE_ROWS)
    out = label.run(_cfg(tiny_model_dir, data, tmp_path / "out"))
    rows = _lines(out["labels"])
    assert len(rows) == 11 and [(r["row"], r["pair"]) for r in rows][:4] == \
        [(1, [0, 1]), (1, [0, 2]), (1, [1, 2]), (2, [0, 1])]
    pairs, _ = label.load_pairs(_cfg(tiny_model_dir, data, tmp_path).label)
    judge = Judge.load(str(tiny_model_dir), batch_size=4)
    want = judge.compare([p.prompt for p in pairs], [p.a for p in pairs], [p.b for p in pairs],
                         DEFAULT_PRINCIPLE)
    for r, pair, p_a in zip(rows, pairs, want.p_a.tolist()):
        assert r["p"] == pytest.approx(max(p_a, 1 - p_a), abs=1e-5)
        assert r["chosen"] == (pair.a if p_a >= 0.5 else pair.b)
        assert r["confidence"] == pytest.approx(2 * r["p"] - 1, abs=1e-9)
        assert r["prompt"] == pair.prompt and 0.5 <= r["p"] <= 1
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["judged"], meta["kept"], meta["dropped"]) == (11, 11, 0)
    assert meta["mean_confidence"] == pytest.approx(want.confidence.mean().item(), abs=1e-5)
    assert meta["position_disagree_rate"] == pytest.approx(
        want.position_disagree.float().mean().item())
    assert meta["seconds_per_pair"] > 0 and meta["principle"] == DEFAULT_PRINCIPLE
    assert meta["input_agreement"] is None

    # another min_confidence refilters from the log: no judge is loaded
    cut = sorted(r["confidence"] for r in rows)[5]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Judge, "load", lambda *a, **k: pytest.fail("judged again"))
        label.run(_cfg(tiny_model_dir, data, tmp_path / "out", f"--label.min_confidence={cut}"))
    kept = _lines(out["labels"])
    assert kept == [r for r in rows if r["confidence"] >= cut] and len(kept) == 6
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["kept"], meta["dropped"]) == (6, 5)


def test_pair_input_keeps_rows_and_measures_agreement(tiny_model_dir, tmp_path):
    data = _write(tmp_path / "pairs.jsonl", PAIR_ROWS)
    out = label.run(_cfg(tiny_model_dir, data, tmp_path / "out"))
    rows = _lines(out["labels"])
    assert [r["row"] for r in rows] == [1, 2, 3] and "pair" not in rows[0]
    responses_a = [" blue", " four", [{"role": "assistant", "content": "Yes"}]]  # the chosen
    agree = sum(r["chosen"] == a for r, a in zip(rows, responses_a))
    assert out["meta"]["input_agreement"] == pytest.approx(agree / 3)


REAL_COMPARE = Judge.compare


class Counting:
    """Judge.compare wrapped: records the pairs judged, raises KeyboardInterrupt on call `die`."""

    def __init__(self, monkeypatch, die=None):
        self.keys, self.calls, self.die, real = [], 0, die, REAL_COMPARE

        def compare(judge, prompts, a, b, principle):
            self.calls += 1
            if self.calls == self.die:
                raise KeyboardInterrupt
            self.keys += [json.dumps(pair) for pair in zip(prompts, a, b)]
            return real(judge, prompts, a, b, principle)

        monkeypatch.setattr(Judge, "compare", compare)


def test_killed_and_torn_runs_resume_to_the_same_labels(tiny_model_dir, tmp_path, monkeypatch):
    data = _write(tmp_path / "in.jsonl", RESPONSE_ROWS)
    whole = label.run(_cfg(tiny_model_dir, data, tmp_path / "a"))["labels"].read_bytes()

    first = Counting(monkeypatch, die=3)  # killed during the third batch of 3 pairs
    with pytest.raises(KeyboardInterrupt):
        label.run(_cfg(tiny_model_dir, data, tmp_path / "b"))
    assert not (tmp_path / "b" / "labels.jsonl").exists()
    assert len(_lines(tmp_path / "b" / "judged.jsonl")) == 3  # settings + two batches
    again = Counting(monkeypatch)
    label.run(_cfg(tiny_model_dir, data, tmp_path / "b"))
    assert len(first.keys) + len(again.keys) == 11  # no pair judged twice, none lost
    assert not set(first.keys) & set(again.keys)
    assert (tmp_path / "b" / "labels.jsonl").read_bytes() == whole

    # a kill in the middle of writing a batch: half a line at the end of the log
    log = (tmp_path / "b" / "judged.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "judged.jsonl").write_text("".join(log[:3]) + log[3][:len(log[3]) // 2])
    torn = Counting(monkeypatch)
    label.run(_cfg(tiny_model_dir, data, tmp_path / "c"))
    assert len(torn.keys) == 11 - 6  # the torn batch and the rest, once each
    assert (tmp_path / "c" / "labels.jsonl").read_bytes() == whole
    assert all(line.endswith("\n") for line in
               (tmp_path / "c" / "judged.jsonl").read_text().splitlines(keepends=True))


def test_a_log_made_with_other_settings_is_an_error_naming_the_key(tiny_model_dir, tmp_path):
    data = _write(tmp_path / "in.jsonl", RESPONSE_ROWS[:1])
    out = tmp_path / "out"
    label.run(_cfg(tiny_model_dir, data, out))
    with pytest.raises(ConfigError, match=r"^judge.principle: .*was judged with 'Which response"):
        label.run(_cfg(tiny_model_dir, data, out, "--judge.principle=Which is kinder?"))
    with pytest.raises(ConfigError, match=r"^judge.model: "):
        label.run(_cfg(tmp_path / "other-model", data, out))
    _write(data, RESPONSE_ROWS[:2])
    with pytest.raises(ConfigError, match=r"^label.input: .*judged with other rows"):
        label.run(_cfg(tiny_model_dir, data, out))
    with (out / "judged.jsonl").open("a") as held:  # another process holds the log
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another process is labelling"):
            label.run(_cfg(tiny_model_dir, _write(data, RESPONSE_ROWS[:1]), out))


def test_a_judge_that_never_judged_binds_nothing(tiny_model_dir, tmp_path):
    """A mistyped --judge.model fails before any pair is judged; the corrected command then
    runs (issue 35: the log once refused it, "judged with '/nope'"), and its settings head the
    log. A settings line left alone by an older run binds nothing either."""
    data = _write(tmp_path / "in.jsonl", RESPONSE_ROWS[:1])
    out = tmp_path / "out"
    with pytest.raises(ConfigError):
        label.run(_cfg(tmp_path / "nope", data, out))
    assert (out / "judged.jsonl").read_text() == ""
    (out / "judged.jsonl").write_text(json.dumps(
        {"batch": "settings", "settings": {"judge.model": "/nope"}}) + "\n")
    label.run(_cfg(tiny_model_dir, data, out))
    head = _lines(out / "judged.jsonl")[0]
    assert head["batch"] == "settings" and head["settings"]["judge.model"] == str(tiny_model_dir)
    assert [r["batch"] for r in _lines(out / "judged.jsonl")] == ["settings", 0]


def test_dpo_trains_from_soft_labels(tiny_model_dir, tmp_path, monkeypatch):
    """DPO with per-pair smoothing eps = 1 - p (cDPO): with h = beta * ((pc - rc) - (pr - rr)),

        loss = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h) = -p log s(h) - (1 - p) log s(-h)

    At the first step the policy is its reference, so h = 0 for every pair and the loss is
    -p log 1/2 - (1 - p) log 1/2 = log 2 = 0.693147, whatever p. The gradient through h is
    d loss / dh = -p (1 - s(h)) + (1 - p) s(h) = s(h) - p = 1/2 - p at h = 0: zero for a pair
    labelled p = 0.5 (a coin flip teaches nothing), -1/2 for p = 1. So a set of p = 0.5 pairs
    has first-step gradient norm 0, and the same pairs with p = 1 do not."""
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    data = _write(tmp_path / "in.jsonl", RESPONSE_ROWS)
    labels = label.run(_cfg(tiny_model_dir, data, tmp_path / "label"))["labels"]

    def dpo_run(path, name, steps=1):
        return dpo.run(load_config(DPOConfig, None, [
            f"--model.name_or_path={tiny_model_dir}", f"--run.output_dir={tmp_path / name}",
            f"--data.path={path}", "--dpo.soft_label_key=p", "--dpo.beta=0.5",
            f"--train.max_steps={steps}", "--train.batch_size=4", "--train.micro_batch_size=2",
            "--train.lr=1e-2", "--train.warmup_ratio=0.0", "--train.schedule=constant",
            "--train.precision=fp32", "--data.max_length=64", "--data.eval_fraction=0.2",
            "--run.progress=false", "--run.tensorboard=false"]))

    def first_step(name):
        lines = _lines(tmp_path / name / "metrics.jsonl")
        return next(x for x in lines if x.get("step") == 1 and "loss/dpo" in x)

    out = dpo_run(labels, "dpo", steps=3)
    assert out["losses"][0] == pytest.approx(math.log(2), abs=1e-5)
    assert all(math.isfinite(x) for x in out["losses"]) and len(out["losses"]) == 3
    rows = _lines(labels)
    for p, name in ((0.5, "half"), (1.0, "one")):
        dpo_run(_write(tmp_path / f"{name}.jsonl", [{**r, "p": p} for r in rows]), name)
    assert first_step("half")["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert first_step("half")["optim/grad_norm"] < 1e-5
    assert first_step("one")["optim/grad_norm"] > 1e-3
