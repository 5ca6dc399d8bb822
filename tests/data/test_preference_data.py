"""Preference data: chosen and rejected share the prompt's tokens, the loss mask covers exactly
each completion, KTO gets unpaired examples, and a bad row names file, row and field."""

import json

import pytest

from scripts.build_sentiment_prefs import MIN_GAP, cut_unfinished, pair
from tether.config import DataConfig
from tether.data.formats import render_chat, text_ids
from tether.data.preference import (PreferencePair, UnpairedExample, builtin_preference_rows,
                                    builtin_sentiment_rows, load_preference_data, tokenize_pair)
from tether.data.tasks import sentiment
from tether.data.tasks.arithmetic import extract_answer
from tether.errors import DataError

CHAT = {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "chosen": [{"role": "assistant", "content": "2 + 2 = 4\nAnswer: 4"}],
        "rejected": [{"role": "assistant", "content": "2 + 2 = 5\nAnswer: 5"}]}
PLAIN = {"prompt": "The sky is", "chosen": " blue", "rejected": " a shade of green"}


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _pair(row, tok, **kw):
    return tokenize_pair(row, tok, max_length=kw.get("max_length", 256),
                         truncation=kw.get("truncation", True), source="t.jsonl", row_index=1)


def _split(example):
    first = example.loss_mask.index(True)
    assert all(example.loss_mask[first:]), "completion tokens are contiguous to the end"
    return example.input_ids[:first], example.input_ids[first:]


@pytest.mark.parametrize("row", [PLAIN, CHAT], ids=["standard", "conversational"])
def test_prompt_shared_and_mask_covers_each_completion(row, default_tokenizer):
    tok = default_tokenizer
    pair = _pair(row, tok)
    c_prompt, c_completion = _split(pair.chosen)
    r_prompt, r_completion = _split(pair.rejected)
    assert c_prompt == r_prompt  # identical prompt tokens
    if isinstance(row["prompt"], str):
        assert c_prompt == text_ids(tok, row["prompt"])
        assert c_completion == text_ids(tok, row["chosen"]) + [tok.eos_token_id]
        assert r_completion == text_ids(tok, row["rejected"]) + [tok.eos_token_id]
    else:
        prompt = render_chat(tok, row["prompt"], generation_prompt=True)
        assert c_prompt == text_ids(tok, prompt)
        full = render_chat(tok, row["prompt"] + row["chosen"])
        assert c_completion == text_ids(tok, full[len(prompt):])  # tokenised alone
        assert tok.decode(r_completion).startswith("2 + 2 = 5")
    assert sum(pair.chosen.loss_mask) == len(c_completion)
    assert sum(pair.rejected.loss_mask) == len(r_completion)


def test_implicit_conversational_prompt_is_the_shared_prefix(default_tokenizer):
    row = {"chosen": CHAT["prompt"] + CHAT["chosen"], "rejected": CHAT["prompt"] + CHAT["rejected"]}
    assert _pair(row, default_tokenizer) == _pair(CHAT, default_tokenizer)


def test_truncation_keeps_prompt_or_errors(default_tokenizer):
    pair = _pair(PLAIN, default_tokenizer, max_length=5)
    assert len(pair.rejected.input_ids) == 5 and any(pair.rejected.loss_mask)
    with pytest.raises(DataError, match=r"t.jsonl, row 1, field 'rejected': is too long"):
        _pair(PLAIN, default_tokenizer, max_length=5, truncation=False)


@pytest.mark.parametrize("bad, field, words", [
    ({"prompt": "a", "chosen": "b", "rejected": 3}, "rejected", "must be a string"),
    ({"prompt": "a", "chosen": "b"}, "rejected", "missing"),
    ({"prompt": "a", "chosen": "b", "rejected": "c", "group": 1}, "group", "must be a string"),
    ({"prompt": "a", "completion": "b", "label": True}, "label", "only dpo.loss=kto"),
    ({"prompt": "a", "chosen": " ", "rejected": "c"}, "chosen", "is empty"),
])
def test_bad_row_names_file_row_field(bad, field, words, tmp_path, default_tokenizer):
    path = _jsonl(tmp_path / "pref.jsonl", [PLAIN, bad])
    with pytest.raises(DataError) as err:
        load_preference_data(DataConfig(path=str(path), eval_fraction=0.0), default_tokenizer)
    assert str(err.value).startswith(f"{path}, row 2, field '{field}'")
    assert words in str(err.value)


def test_sft_row_is_rejected(tmp_path, default_tokenizer):
    path = _jsonl(tmp_path / "pref.jsonl", [PLAIN, {"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match="row 2: is a prompt completion row"):
        load_preference_data(DataConfig(path=str(path), eval_fraction=0.0), default_tokenizer)


def test_kto_gets_unpaired_examples(tmp_path, default_tokenizer):
    rows = [PLAIN, CHAT, {"prompt": "Hi", "completion": " there", "label": False, "group": "g"}]
    path = _jsonl(tmp_path / "pref.jsonl", rows)
    train, held, _ = load_preference_data(DataConfig(path=str(path), eval_fraction=0.0),
                                          default_tokenizer, unpaired=True)
    assert not held and all(isinstance(x, UnpairedExample) for x in train)
    assert [x.desirable for x in train] == [True, False, True, False, False]
    assert train[-1].group == "g"
    pair = _pair(PLAIN, default_tokenizer)
    assert train[0].example == pair.chosen and train[1].example == pair.rejected
    for x in train:  # the KL sequence: the same prompt, another example's completion
        prompt, completion = _split(x.example)
        kl_prompt, kl_completion = _split(x.kl_example)
        assert kl_prompt == prompt and kl_completion != completion


def test_paired_load_splits_rows_and_hash_tracks_content(tmp_path, default_tokenizer):
    path = _jsonl(tmp_path / "pref.jsonl", [PLAIN] * 9 + [CHAT])
    train, held, digest = load_preference_data(DataConfig(path=str(path), eval_fraction=0.2),
                                               default_tokenizer)
    assert len(train) == 8 and len(held) == 2 and isinstance(train[0], PreferencePair)
    _jsonl(tmp_path / "pref.jsonl", [PLAIN] * 9 + [dict(CHAT, group="x")])
    changed = load_preference_data(DataConfig(path=str(path), eval_fraction=0.2),
                                   default_tokenizer)[2]
    assert changed != digest
    # another split of the same rows orders the items differently: another hash
    assert load_preference_data(DataConfig(path=str(path), eval_fraction=0.3),
                                default_tokenizer)[2] != changed


def test_builtin_preference_rows():
    rows = builtin_preference_rows(50)
    assert rows == builtin_preference_rows(50)  # deterministic
    for row in rows:
        right = extract_answer(row["chosen"][0]["content"])
        wrong = extract_answer(row["rejected"][0]["content"])
        assert right != wrong and 1 <= abs(right - wrong) <= 10
        assert row["group"] in ("addition", "subtraction")
    assert {r["group"] for r in rows} == {"addition", "subtraction"}


def test_sentiment_score_hand_values():
    """VADER: compound = x / sqrt(x^2 + 15), x the sum of the words' lexicon valences.
    'good' has valence 1.9: 1.9 / sqrt(3.61 + 15) = 0.4404; 'bad' -2.5: -2.5 / sqrt(21.25) =
    -0.5423; no lexicon word: 0."""
    assert sentiment.sentiment_score("good") == pytest.approx(0.4404, abs=1e-4)
    assert sentiment.sentiment_score("bad") == pytest.approx(-0.5423, abs=1e-4)
    assert sentiment.sentiment_score("the bus") == 0.0


def test_sentiment_prompts_split_is_fixed_and_disjoint():
    prompts = sentiment.sentiment_prompts()
    texts = [p["prompt"][0]["content"] for p in prompts]
    assert len(texts) == len(set(texts)) == len(sentiment.TEMPLATES) * len(sentiment.SUBJECTS)
    train, held = sentiment.split_prompts()
    assert (train, held) == sentiment.split_prompts()  # deterministic
    assert len(held) == sentiment.N_HELDOUT and len(train) + len(held) == len(prompts)
    held_texts = {p["prompt"][0]["content"] for p in held}
    assert not held_texts & {p["prompt"][0]["content"] for p in train}
    assert sentiment.heldout_prompts(5) == held[:5]
    assert {p["group"] for p in held} == {"review", "note", "message"}


def test_builtin_sentiment_rows_are_scored_pairs_of_training_prompts(default_tokenizer):
    """The shipped set: one pair per training prompt (none from a held-out prompt), chosen more
    positive than rejected by the stored VADER scores, which the lexicon reproduces; every row
    tokenises whole (no truncation at the default max_length)."""
    rows = builtin_sentiment_rows()
    train_prompts = {p["prompt"][0]["content"] for p in sentiment.split_prompts()[0]}
    assert len(rows) >= 200
    seen = set()
    for row in rows:
        prompt = row["prompt"][0]["content"]
        assert prompt in train_prompts and prompt not in seen
        seen.add(prompt)
        assert row["score_chosen"] - row["score_rejected"] >= MIN_GAP - 1e-4
        assert row["group"] in ("review", "note", "message")
    for row in rows[::25]:  # the stored scores are the lexicon's
        for side in ("chosen", "rejected"):
            assert sentiment.sentiment_score(row[side][0]["content"]) == pytest.approx(
                row[f"score_{side}"], abs=1e-4)
    train, held, _ = load_preference_data(DataConfig(eval_fraction=0.1, truncation=False),
                                          default_tokenizer, rows=rows, source="built-in")
    assert len(train) + len(held) == len(rows)


def test_build_script_pairs_most_and_least_positive():
    assert cut_unfinished("A fine day. And then the") == "A fine day."
    assert cut_unfinished("Wow! Great") == "Wow!"
    assert cut_unfinished("It cost 3.5 euros and") == "It cost 3.5 euros and"  # no sentence end
    prompt = {"prompt": [{"role": "user", "content": "Write a note."}], "group": "note"}
    row = pair(prompt, ["It was bad.", "It was good.", "It was a bus."])
    assert row["chosen"][0]["content"] == "It was good."
    assert row["rejected"][0]["content"] == "It was bad."
    assert row["score_chosen"] > 0 > row["score_rejected"] and row["group"] == "note"
    assert pair(prompt, ["The bus.", "A bus."]) is None  # both 0: no preference
