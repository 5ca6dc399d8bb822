"""Process reward model end to end on a tiny model: after training the first wrong step of a
held-out solution is the first step scored below 1/2 and scores below every step before it; the
saved model loads with transformers and scores the same; the scorer plugs into the rewards
interface; bad rows are named; export; micro-batching keeps the gradient (resume:
test_resume.py)."""

import json
import random

import pytest
import torch

from tether.config import PRMConfig, load_config
from tether.data.formats import split_indices
from tether.errors import DataError
from tether.recipes import prm

WORDS = ["movie", "plot", "actor", "scene", "music", "story", "ending", "cast"]


def stepwise_rows(n=160, seed=0):
    """Ground truth: a step is wrong once any step so far says "bad". 60% of the solutions go
    wrong at one uniformly chosen step; the steps after it say "good" again but stay wrong (as a
    running sum stays wrong after its first wrong partial result), so the score at a separator
    must look back over every earlier step, and the word never sits next to the separator (a
    filler word follows it): attention has to carry it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(2, 5)
        wrong = rng.randrange(k) if rng.random() < 0.6 else None
        steps = [f"the {rng.choice(WORDS)} is {'bad' if j == wrong else 'good'} so "
                 f"{rng.choice(WORDS)}" for j in range(k)]
        rows.append({"prompt": f"Review {i}:", "completions": steps,
                     "labels": [wrong is None or j < wrong for j in range(k)]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides(model_dir, out_dir, data_path, *extra):
    return [f"--model.name_or_path={model_dir}", f"--run.output_dir={out_dir}",
            f"--data.path={data_path}", "--data.eval_fraction=0.2", "--data.max_length=128",
            "--train.max_steps=40", "--train.batch_size=8", "--train.micro_batch_size=4",
            "--train.lr=1e-2", "--train.warmup_ratio=0.0", "--train.schedule=constant",
            "--train.precision=fp32", "--run.progress=false", "--run.tensorboard=false", *extra]


def run_prm(*args):
    return prm.run(load_config(PRMConfig, None, overrides(*args)))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prm")
    data = write_jsonl(tmp / "steps.jsonl", stepwise_rows())
    return run_prm(tiny_model_dir, tmp / "run", data, "--run.eval_every=20")


def heldout_rows():
    rows = stepwise_rows()
    return [rows[i] for i in split_indices(len(rows), 0.2)[1]]


def test_first_wrong_step_gets_the_lowest_score(trained):
    from tether.rewards import ProcessRewardScorer

    before, after = trained["eval_before"], trained["eval_after"]
    assert before["eval/first_error_accuracy"] < 0.5 and after["eval/first_error_accuracy"] == 1.0
    assert after["eval/step_accuracy"] >= 0.95 and after["eval/solution_accuracy"] >= 0.95
    assert after["eval/loss"] < 0.5 * before["eval/loss"]
    rows = heldout_rows()
    scores = ProcessRewardScorer(trained["process_reward_model"], batch_size=8).score(
        [r["prompt"] for r in rows], [r["completions"] for r in rows])
    with_error = 0
    for row, p in zip(rows, scores.steps):
        assert len(p) == len(row["labels"])
        if all(row["labels"]):
            assert min(p) > 0.5, (row, p)
            continue
        with_error += 1
        first = row["labels"].index(False)
        # the first wrong step scores below 1/2 and below every (correct) step before it
        assert p[first] < 0.5 and all(q > 0.5 > p[first] for q in p[:first]), (row, p)
        assert p[first] == min(p[:first + 1])
    assert with_error >= 10
    # aggregate (min): every correct solution ranks above every solution with a wrong step
    ok = [t for r, t in zip(rows, scores.total) if all(r["labels"])]
    bad = [t for r, t in zip(rows, scores.total) if not all(r["labels"])]
    assert min(ok) > max(bad)
    lines = [json.loads(x) for x in (trained["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*lines)
    for key in ("loss/prm", "prm/step_accuracy", "prm/steps", "eval/loss", "eval/step_accuracy",
                "eval/solution_accuracy", "eval/first_error_accuracy"):
        assert key in keys, key
    assert sorted(x["step"] for x in lines if "eval/first_error_accuracy" in x) == [0, 20, 40, 40]


def test_saved_prm_loads_with_transformers_and_scores_the_same(trained):
    from transformers import AutoModelForTokenClassification

    from tether.rewards import ProcessRewardScorer, WeightedSum

    out_dir = trained["process_reward_model"]
    loaded = AutoModelForTokenClassification.from_pretrained(out_dir)
    assert loaded.config.num_labels == 1
    assert loaded.config.tether_prm == {"step_separator": "\n", "aggregate": "min"}
    batch = prm.collate_steps(trained["eval_examples"][:6], trained["tokenizer"].pad_token_id)
    model = trained["model"].eval()
    with torch.no_grad():
        want = prm.step_logits(model, batch)  # (B, S)
        got = prm.step_logits(loaded, batch)
    torch.testing.assert_close(got[batch.step_mask], want[batch.step_mask], atol=1e-5, rtol=1e-5)
    assert want[batch.step_mask].abs().max() > 1.0  # a trained head, not a zero one

    # The scorer: steps as a list or as one string split at the separator score the same, and
    # equal sigmoid of the training-time logits; aggregates by hand.
    rows = heldout_rows()[:3]
    prompts = [r["prompt"] for r in rows]
    scorer = ProcessRewardScorer(out_dir, batch_size=2)
    as_list = scorer.score(prompts, [r["completions"] for r in rows])
    as_text = scorer.score(prompts, ["\n".join(r["completions"]) + "\n" for r in rows])
    assert [len(p) for p in as_text.steps] == [len(r["completions"]) for r in rows]
    assert sum(as_text.steps, []) == pytest.approx(sum(as_list.steps, []), abs=1e-6)
    for r, p, total in zip(rows, as_list.steps, as_list.total):
        ids, positions = scorer.encode(r["prompt"], r["completions"])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :, 0]
        assert p == pytest.approx(torch.sigmoid(logits[positions]).tolist(), abs=1e-5)
        assert total == pytest.approx(min(p))
    product = ProcessRewardScorer(out_dir, aggregate="prod")(prompts, [r["completions"]
                                                                       for r in rows])
    assert product == pytest.approx([torch.tensor(p).prod().item() for p in as_list.steps])
    assert scorer(["x"], [""]) == [0.0]  # no step: nothing to reward
    # one more component of the rewards interface, logged on its own
    combo = WeightedSum([("prm", scorer, 2.0), ("length", lambda p, c, **_: [0.5] * len(c), 1.0)])
    out = combo.score(prompts, ["\n".join(r["completions"]) for r in rows])
    assert out.components["prm"] == pytest.approx(as_list.total, abs=1e-6)
    assert out.total == pytest.approx([2 * t + 0.5 for t in as_list.total], abs=1e-6)


def test_first_below_half_by_hand():
    """Row 0: p = .9 .4 .2 -> the first step below 1/2 is 1. Row 1: .6 .7 (.1 is padding) -> none,
    so S = 3. Row 2: .3 -> 0."""
    probs = torch.tensor([[0.9, 0.4, 0.2], [0.6, 0.7, 0.1], [0.3, 0.9, 0.9]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    assert prm.first_below_half(probs, mask).tolist() == [1, 3, 0]


@pytest.mark.parametrize("bad, field", [
    ({"labels": [True]}, "labels"),                       # 1 label for 2 steps
    ({"labels": [True, 1]}, "labels[1]"),                 # not a bool
    ({"completions": ["fine", "  "]}, "completions[1]"),  # empty step
    ({"completions": ["a\nb", "c"]}, "completions[0]"),   # holds the separator
])
def test_bad_stepwise_row_names_file_row_field(tiny_model_dir, tmp_path, bad, field):
    rows = stepwise_rows(12)
    rows[2] = {"prompt": "p", "completions": ["one", "two"], "labels": [True, False], **bad}
    data = write_jsonl(tmp_path / "steps.jsonl", rows)
    with pytest.raises(DataError) as err:
        run_prm(tiny_model_dir, tmp_path / "run", data)
    message = str(err.value)
    assert "steps.jsonl" in message and "row 3" in message and f"field '{field}'" in message


def test_export_of_a_prm_run_is_its_process_reward_model(tiny_model_dir, tmp_path):
    """`tether export` of a prm run writes the same model (and separator/aggregate) as the run
    (resume: tests/recipes/test_resume.py)."""
    from transformers import AutoModelForTokenClassification

    from tether.cli import main

    data = write_jsonl(tmp_path / "steps.jsonl", stepwise_rows(40))
    out = run_prm(tiny_model_dir, tmp_path / "run", data, "--train.max_steps=2",
                  "--prm.aggregate=prod")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    exported = AutoModelForTokenClassification.from_pretrained(tmp_path / "hf")
    final = AutoModelForTokenClassification.from_pretrained(out["process_reward_model"])
    assert exported.config.tether_prm == final.config.tether_prm == {
        "step_separator": "\n", "aggregate": "prod"}
    for (name, p), (_, q) in zip(exported.named_parameters(), final.named_parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)


def test_micro_batching_does_not_change_the_gradient(tiny_model_dir, default_tokenizer):
    """Loss units are solutions: 4 solutions in one micro-batch or in 2 + 2 (or 1 + 3) give the
    same gradient although their step counts differ."""
    from tether.config import DataConfig, ModelConfig
    from tether.data.stepwise import tokenize_stepwise_rows
    from tether.engine.models import load_value_model
    from tether.engine.optimize import accumulate_gradients

    torch.manual_seed(0)
    model = load_value_model(ModelConfig(name_or_path=str(tiny_model_dir)),
                             default_tokenizer.pad_token_id)
    examples = tokenize_stepwise_rows(list(enumerate(stepwise_rows(4), 1)), default_tokenizer,
                                      DataConfig(max_length=128), "rows", "\n")
    assert len({len(e.step_labels) for e in examples}) > 1
    pad = default_tokenizer.pad_token_id
    grads = []
    for split in ([examples], [examples[:2], examples[2:]], [examples[:1], examples[1:]]):
        model.zero_grad()
        out = accumulate_gradients(model, [prm.collate_steps(e, pad) for e in split],
                                   loss_fn=prm.prm_loss, count_units=lambda b: b.num_examples,
                                   device=torch.device("cpu"), precision="fp32")
        assert out["units"] == 4
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-6, rtol=1e-5)


def test_builtin_running_sums_with_lora(tiny_model_dir, tmp_path):
    """With no data path `tether prm` trains on the built-in running-sum set; with LoRA only the
    adapters and the head train, and the saved (merged) model scores as the trained one."""
    from transformers import AutoModelForTokenClassification

    from tether.cli import main

    out = prm.run(load_config(PRMConfig, None, [
        f"--model.name_or_path={tiny_model_dir}", f"--run.output_dir={tmp_path / 'run'}",
        "--train.max_steps=2", "--train.batch_size=4", "--train.micro_batch_size=4",
        "--train.lr=1e-2", "--train.precision=fp32", "--model.lora.r=4",
        "--run.progress=false", "--run.tensorboard=false"]))
    assert len(out["eval_examples"]) == 40  # 10% of the 400 built-in solutions
    trainable = out["trainable"]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss/prm" in x] == [1, 2]
    loaded = AutoModelForTokenClassification.from_pretrained(out["process_reward_model"])
    names = {n for n, _ in loaded.named_parameters()}
    assert "score.weight" in names and not any("lora_" in n for n in names)
    batch = prm.collate_steps(out["eval_examples"][:4], out["tokenizer"].pad_token_id)
    with torch.no_grad():
        want = prm.step_logits(out["model"].eval(), batch)
        got = prm.step_logits(loaded, batch)
    torch.testing.assert_close(got[batch.step_mask], want[batch.step_mask], atol=1e-5, rtol=1e-5)
    # a bad aggregate is a one-line config error from the CLI (exit 2) before any model loads
    assert main(["prm", "--prm.aggregate=mean", f"--run.output_dir={tmp_path / 'bad'}"]) == 2
