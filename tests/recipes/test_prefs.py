"""`tether prefs`: the pairing rule by hand, and a tiny-model build that caches and resumes."""

import json
from pathlib import Path

import pytest

from tether.config import PrefsParams
from tether.data.preference import pairs_by_score
from tether.engine.generate import TorchBackend
from tether.errors import ConfigError, DataError
from tether.recipes import preference_set


def test_pairs_by_score_all_pairs_higher_chosen_ties_dropped():
    """Scores a 0.9, b 0.5, c 0.45, d 0.9 (a duplicate text of a), e "" (empty) with min_gap
    0.1: the duplicate and the empty completion are dropped, leaving a, b, c. Pairs: (a, b) gap
    0.4 -> chosen a; (a, c) gap 0.45 -> chosen a; (b, c) gap 0.05 < 0.1 -> a tie, dropped.
    So two rows, in that order, carrying the prompt row's group."""
    row = {"prompt": [{"role": "user", "content": "hi"}], "group": "note"}
    out = pairs_by_score(row, ["a", "b", "c", "a", " "], [0.9, 0.5, 0.45, 0.1, 1.0], min_gap=0.1)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in out] == \
        [("a", "b"), ("a", "c")]
    assert [(r["score_chosen"], r["score_rejected"]) for r in out] == [(0.9, 0.5), (0.9, 0.45)]
    assert all(r["group"] == "note" and r["prompt"] == row["prompt"] for r in out)
    assert out[0]["chosen"][0]["role"] == "assistant"


def test_pairs_by_score_standard_prompt_and_order():
    """A string prompt gives string completions; the lower-scored first sample is rejected:
    scores (-0.2, 0.3) -> chosen "y", rejected "x", gap 0.5 >= 0.1."""
    (r,) = pairs_by_score({"prompt": "p"}, ["x", "y"], [-0.2, 0.3], min_gap=0.1)
    assert (r["chosen"], r["rejected"], r["score_chosen"], r["score_rejected"]) == \
        ("y", "x", 0.3, -0.2)


def length_gold(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def tiny_params(model_dir, cache, **kw):
    return PrefsParams(**{"pairs": 12, "heldout_pairs": 4, "samples_per_prompt": 3,
                          "max_new_tokens": 6, "batch_prompts": 2, "min_gap": 0.5,
                          "gold": f"{__name__}:length_gold", "model": str(model_dir),
                          "cache_dir": str(cache), **kw})


def test_build_writes_disjoint_splits_and_reads_the_cache(tiny_model_dir, tmp_path, monkeypatch):
    p = tiny_params(tiny_model_dir, tmp_path)
    train, held = preference_set.build(p, precision="fp32", progress=False, say=lambda m: None)
    train_rows = [json.loads(x) for x in train.read_text().splitlines()]
    held_rows = [json.loads(x) for x in held.read_text().splitlines()]
    assert (len(train_rows), len(held_rows)) == (12, 4)
    prompt = lambda r: r["prompt"][0]["content"]  # noqa: E731
    assert not {prompt(r) for r in train_rows} & {prompt(r) for r in held_rows}
    for r in train_rows + held_rows:  # ordered by the gold reward (length), ties dropped
        assert len(r["chosen"][0]["content"]) - len(r["rejected"][0]["content"]) >= 0.5
        assert r["score_chosen"] == len(r["chosen"][0]["content"])
    from tether.data.tasks.sentiment import heldout_prompts
    evals = {q["prompt"][0]["content"] for q in heldout_prompts()}
    assert not evals & {prompt(r) for r in train_rows + held_rows}  # no eval prompt is a pair
    meta = json.loads((train.parent / "meta.json").read_text())
    assert meta["train_pairs"] == 12 and Path(meta["samples"]).is_file()  # samples are kept

    monkeypatch.setattr(preference_set, "load_causal_lm", lambda cfg: pytest.fail("sampled again"))
    again = preference_set.build(p, precision="fp32", progress=False, say=lambda m: None)
    assert again == (train, held)
    # a different setting is a different cache directory
    seed_1 = tiny_params(tiny_model_dir, tmp_path, seed=1)
    assert preference_set.build_dir(seed_1, [], tiny_model_dir) != \
        preference_set.build_dir(tiny_params(tiny_model_dir, tmp_path), [], tiny_model_dir)


def test_killed_build_resumes_with_the_same_rows(tiny_model_dir, tmp_path, monkeypatch):
    whole = preference_set.build(tiny_params(tiny_model_dir, tmp_path / "a"), precision="fp32",
                                 progress=False, say=lambda m: None)
    calls = {"n": 0}
    real = TorchBackend.generate

    def dies_on_third(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TorchBackend, "generate", dies_on_third)
    p = tiny_params(tiny_model_dir, tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        preference_set.build(p, precision="fp32", progress=False, say=lambda m: None)
    partial = next((tmp_path / "b").glob("samples/*/samples.jsonl"))
    assert len(partial.read_text().splitlines()) == 2  # two batches kept
    with partial.open("a") as f:  # and a third cut off by the kill, half written
        f.write('{"batch": 2, "compl')
    monkeypatch.setattr(TorchBackend, "generate", real)
    again = preference_set.build(p, precision="fp32", progress=False, say=lambda m: None)
    assert [x.read_text() for x in again] == [x.read_text() for x in whole]


def test_a_larger_set_reuses_the_samples_and_extends_the_smaller(tiny_model_dir, tmp_path,
                                                                 monkeypatch):
    """Sizes and min_gap change the pairs, not the samples: the 12-pair set's held-out file is
    the 24-pair set's, its training rows are the first 12 of the 24, and building the 24-pair set
    after it samples only the batches past those the 12-pair set used."""
    small = preference_set.build(tiny_params(tiny_model_dir, tmp_path), precision="fp32",
                                 progress=False, say=lambda m: None)
    used = json.loads((small[0].parent / "meta.json").read_text())["prompts_used"]
    calls = {"n": 0}
    real = TorchBackend.generate

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TorchBackend, "generate", counted)
    big = preference_set.build(tiny_params(tiny_model_dir, tmp_path, pairs=24), precision="fp32",
                               progress=False, say=lambda m: None)
    big_used = json.loads((big[0].parent / "meta.json").read_text())["prompts_used"]
    assert calls["n"] == (big_used - used) // 2  # batch_prompts 2: only the new batches
    assert big[1].read_text() == small[1].read_text()
    assert big[0].read_text().splitlines()[:12] == small[0].read_text().splitlines()


def test_bad_settings_and_too_few_prompts(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        preference_set.check(PrefsParams(samples_per_prompt=1))
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"prompt": "Say something."}) + "\n")
    with pytest.raises(ConfigError, match="all 1 prompts gave only"):
        preference_set.build(tiny_params(tiny_model_dir, tmp_path, prompts=str(rows)),
                             precision="fp32", progress=False, say=lambda m: None)


def test_a_second_builder_of_the_same_set_is_refused(tiny_model_dir, tmp_path):
    import fcntl

    p = tiny_params(tiny_model_dir, tmp_path)
    samples = preference_set.samples_path(p, preference_set.load_prompts(p), tiny_model_dir)
    samples.parent.mkdir(parents=True)
    with samples.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another process is sampling"):
            preference_set.build(p, precision="fp32", progress=False, say=lambda m: None)


def test_prompt_file_rows_are_checked_like_rl_prompts(tmp_path):
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(DataError, match=r"row 2, field 'prompt': must be a string"):
        preference_set.load_prompts(PrefsParams(prompts=str(rows)))
    rows.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match="row 1: is not a prompt row"):
        preference_set.load_prompts(PrefsParams(prompts=str(rows)))
