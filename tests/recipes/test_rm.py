"""Reward model end to end on a tiny model: learns a simple rule, saved model scores the same,
score read at the last non-pad token, bad rows named, export, LoRA (resume: test_resume.py)."""

import json
import math
import random

import pytest
import torch

from tether.config import RMConfig, load_config
from tether.errors import ConfigError, DataError
from tether.recipes import rm

WORDS = ["movie", "plot", "actor", "scene", "music", "story", "ending", "cast"]


def rule_rows(n=160, seed=0):
    """Ground truth: the chosen completion says " good", the rejected " bad", followed by the same
    filler word, so the score token itself never reveals the answer (attention must carry it)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        rows.append({"prompt": f"Review {i}: the {a}", "chosen": f" was good and {b}",
                     "rejected": f" was bad and {b}"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides(model_dir, out_dir, data_path, *extra):
    return [f"--model.name_or_path={model_dir}", f"--run.output_dir={out_dir}",
            f"--data.path={data_path}", "--data.eval_fraction=0.2", "--data.max_length=64",
            "--train.max_steps=30", "--train.batch_size=8", "--train.micro_batch_size=4",
            "--train.lr=1e-2", "--train.warmup_ratio=0.0", "--train.schedule=constant",
            "--train.precision=fp32", "--run.progress=false", "--run.tensorboard=false", *extra]


def run_rm(*args):
    return rm.run(load_config(RMConfig, None, overrides(*args)))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    data = write_jsonl(tmp / "rows.jsonl", rule_rows())
    return run_rm(tiny_model_dir, tmp / "run", data, "--run.eval_every=10")


def test_spearman_with_gold_counts_each_sequence_once():
    """Sequences A, B, C, D with (score, gold) = (1, 0.1), (2, 0.3), (3, 0.2), (4, 0.4): score
    ranks 1 2 3 4, gold ranks 1 3 2 4, d = (0, -1, 1, 0), rho = 1 - 6 * 2 / (4 * 15) = 0.8.
    A listed twice (it was in two pairs) must not change that; a constant score gives nan."""
    scored = [((1,), 1.0, 0.1), ((2,), 2.0, 0.3), ((3,), 3.0, 0.2), ((4,), 4.0, 0.4),
              ((1,), 1.0, 0.1)]
    assert rm.spearman_with_gold(scored) == pytest.approx(0.8)
    assert math.isnan(rm.spearman_with_gold([((i,), 1.0, float(i)) for i in range(4)]))


def test_train_layers_freezes_the_trunk(tiny_model_dir):
    """rm.train_layers=1 on a 2-layer model: embeddings and layer 0 frozen; layer 1, the final
    norm and the score head train."""
    from tether.config import ModelConfig
    from tether.engine.models import freeze_trunk, load_reward_model

    model = load_reward_model(ModelConfig(name_or_path=str(tiny_model_dir)), 0)
    freeze_trunk(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and "model.norm.weight" in trainable
    assert any(n.startswith("model.layers.1.") for n in trainable)
    assert not any(n.startswith(("model.layers.0.", "model.embed_tokens")) for n in trainable)
    with pytest.raises(ConfigError, match="rm.train_layers must be >= 1"):
        freeze_trunk(model, 0)
    whole = load_reward_model(ModelConfig(name_or_path=str(tiny_model_dir)), 0)
    freeze_trunk(whole, 3)  # more than the model has: all of it trains
    assert all(p.requires_grad for p in whole.parameters())


def test_tiny_rm_learns_rule(trained):
    before, after = trained["eval_before"], trained["eval_after"]
    assert len(trained["eval_pairs"]) == 32
    assert after["eval/accuracy"] >= 0.95, after
    assert before["eval/accuracy"] < 0.9  # random head: the rule is not known at the start
    assert after["eval/margin"] > before["eval/margin"] + 1.0
    assert 0.0 <= after["eval/ece"] <= 0.5
    losses = trained["losses"]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    lines = [json.loads(x) for x in (trained["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*lines)
    for key in ("loss/rm", "rm/accuracy", "rm/margin", "eval/accuracy", "eval/margin",
                "eval/ece", "pairs/step"):
        assert key in keys, key
    assert sorted(x["step"] for x in lines if "eval/ece" in x) == [0, 10, 20, 30, 30]


def test_saved_reward_model_gives_same_scores(trained):
    from transformers import AutoModelForSequenceClassification

    from tether.rewards import RewardModelScorer

    loaded = AutoModelForSequenceClassification.from_pretrained(trained["reward_model"])
    assert loaded.config.num_labels == 1
    batch = rm.collate_pairs(trained["eval_pairs"][:6], trained["tokenizer"].pad_token_id, False)
    model = trained["model"].eval()
    with torch.no_grad():
        want = rm.sequence_scores(model, batch.input_ids, batch.attention_mask)
        got = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want.abs().max() > 0.1  # trained scores, not a zero head
    # RewardModelScorer tokenises (prompt, completion) as training did and scores the same.
    scorer = RewardModelScorer(trained["reward_model"], batch_size=4)
    rows = rule_rows()[:3]
    scores = scorer([r["prompt"] for r in rows] * 2,
                    [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    ids = [scorer.encode(r["prompt"], r["chosen"]).input_ids for r in rows]
    with torch.no_grad():
        single = [model(input_ids=torch.tensor([x])).logits[0, 0].item() for x in ids]
    assert scores[:3] == pytest.approx(single, abs=1e-5)
    assert all(c > r for c, r in zip(scores[:3], scores[3:]))


def test_score_is_read_at_last_non_pad_token(trained):
    """A right-padded batch scores each row as it scores alone, and that score is the head
    applied to the hidden state of the row's last non-pad token."""
    model, tok = trained["model"].eval(), trained["tokenizer"]
    pairs = trained["eval_pairs"][:2]
    seqs = [pairs[0].chosen.input_ids, pairs[1].rejected.input_ids[:-4], [5, 6, 7]]
    assert len({len(s) for s in seqs}) == 3
    batch = rm.pad_collate([rm.Example(s, [True] * len(s)) for s in seqs], tok.pad_token_id)
    with torch.no_grad():
        padded = rm.sequence_scores(model, batch.input_ids, batch.attention_mask)
        for i, s in enumerate(seqs):
            ids = torch.tensor([s])
            alone = rm.sequence_scores(model, ids, torch.ones_like(ids, dtype=torch.bool))
            hidden = model.model(input_ids=ids).last_hidden_state[0]  # (T, H)
            last = max(t for t, x in enumerate(s) if x != tok.pad_token_id)
            by_hand = model.score(hidden[last]).item()
            assert padded[i].item() == pytest.approx(alone.item(), abs=1e-5)
            assert alone.item() == pytest.approx(by_hand, abs=1e-5)
            assert abs(model.score(hidden[0]).item() - by_hand) > 1e-4  # not the first token


def test_calibration_error_by_hand():
    """diffs ln 3, -ln 3, ln 19: p = .75, .25, .95; confidences .75, .75, .95; correct 1, 0, 1.
    5 bins of width .1 on [.5, 1]: bin [.7, .8) holds 2 pairs, |1 - 1.5| = .5; bin [.9, 1]
    holds 1, |1 - .95| = .05. ECE = (.5 + .05) / 3."""
    table = rm.calibration_table(torch.tensor([math.log(3), -math.log(3), math.log(19)]))
    assert table[:, 0].tolist() == [0, 0, 2, 0, 1]
    assert rm.expected_calibration_error(table) == pytest.approx(0.55 / 3)
    perfect = rm.calibration_table(torch.tensor([50.0, 60.0]))  # p ~ 1 and always right
    assert rm.expected_calibration_error(perfect) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bad, field", [({"rejected": 7}, "rejected"),
                                        ({"chosen": ""}, "chosen"),
                                        ({"margin": "big"}, "margin")])
def test_bad_preference_row_names_file_row_field(tiny_model_dir, tmp_path, bad, field):
    rows = [dict(r, margin=1.0) for r in rule_rows(12)]
    rows[2].update(bad)
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError) as err:
        run_rm(tiny_model_dir, tmp_path / "run", data, "--rm.margin_key=margin")
    message = str(err.value)
    assert "prefs.jsonl" in message and "row 3" in message and f"field '{field}'" in message


def test_sft_row_is_refused_with_its_row(tiny_model_dir, tmp_path):
    rows = rule_rows(12)
    rows[4] = {"prompt": "hi", "completion": "there"}
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError, match=r"prefs.jsonl, row 5: .*tether rm"):
        run_rm(tiny_model_dir, tmp_path / "run", data)


def test_export_of_an_rm_run_is_its_reward_model(tiny_model_dir, tmp_path):
    """`tether export` of an rm run writes the same reward model as the run's own reward_model/
    (resume: tests/recipes/test_resume.py)."""
    from transformers import AutoModelForSequenceClassification

    from tether.cli import main

    data = write_jsonl(tmp_path / "rows.jsonl", rule_rows(40))
    out = run_rm(tiny_model_dir, tmp_path / "run", data, "--train.max_steps=2")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    final = AutoModelForSequenceClassification.from_pretrained(out["reward_model"])
    for (name, p), (_, q) in zip(exported.named_parameters(), final.named_parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)


def test_built_set_and_lora_keeps_score_head_trainable(tiny_model_dir, tmp_path):
    """No data.path: the set `tether prefs` builds (here sampled from the tiny model, ordered by
    length), its held-out file as the eval pairs, and eval/spearman from its gold scores."""
    from transformers import AutoModelForSequenceClassification

    cfg = load_config(RMConfig, None, [
        f"--model.name_or_path={tiny_model_dir}", f"--run.output_dir={tmp_path / 'run'}",
        "--train.max_steps=2", "--train.batch_size=4", "--train.micro_batch_size=4",
        "--train.lr=1e-2", "--train.precision=fp32", "--model.lora.r=4",
        f"--prefs.model={tiny_model_dir}", f"--prefs.cache_dir={tmp_path / 'prefs'}",
        "--prefs.pairs=12", "--prefs.heldout_pairs=6", "--prefs.samples_per_prompt=3",
        "--prefs.max_new_tokens=6", "--prefs.batch_prompts=2", "--prefs.min_gap=0.5",
        "--prefs.gold=tests.recipes.test_prefs:length_gold",
        "--run.progress=false", "--run.tensorboard=false"])
    out = rm.run(cfg)
    assert (len(out["eval_pairs"]), out["train_pairs"]) == (6, 12)
    assert -1 <= out["eval_after"]["eval/spearman"] <= 1
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "eval/spearman" in logged[-1]
    trainable = out["trainable"]
    assert any("lora_" in n for n in trainable)
    assert any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    loaded = AutoModelForSequenceClassification.from_pretrained(out["reward_model"])
    ids = torch.tensor([out["eval_pairs"][0].chosen.input_ids])
    with torch.no_grad():
        got = loaded(input_ids=ids).logits[0, 0]
        want = out["model"](input_ids=ids).logits[0, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    names = {n for n, _ in loaded.named_parameters()}
    assert "score.weight" in names and not any("lora_" in n for n in names)


def test_micro_batching_does_not_change_the_gradient(tiny_model_dir, default_tokenizer):
    """Loss units are pairs: 4 pairs in one micro-batch or in 2 + 2 give the same gradient."""
    from tether.config import DataConfig, ModelConfig
    from tether.engine.models import load_reward_model
    from tether.engine.optimize import accumulate_gradients

    torch.manual_seed(0)
    model = load_reward_model(ModelConfig(name_or_path=str(tiny_model_dir)),
                              default_tokenizer.pad_token_id)
    rows = [dict(r, m=0.3 * i) for i, r in enumerate(rule_rows(4))]
    pairs = rm.tokenize_reward_rows(list(enumerate(rows, 1)), default_tokenizer,
                                    DataConfig(max_length=64), "rows", "m")
    pad = default_tokenizer.pad_token_id
    grads = []
    for split in ([pairs], [pairs[:2], pairs[2:]], [pairs[:1], pairs[1:]]):
        model.zero_grad()
        out = accumulate_gradients(
            model, [rm.collate_pairs(p, pad, True) for p in split],
            loss_fn=lambda m, b: rm.rm_loss(m, b, center_coef=0.1),
            count_units=lambda b: b.num_pairs, device=torch.device("cpu"), precision="fp32")
        assert out["units"] == 4
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-6, rtol=1e-5)
