"""`tether eval` end to end on tiny random models: held-out splits, determinism, KL, run dirs."""

import json

import pytest

from tests.conftest import tiny_sft_overrides
from tether.cli import main
from tether.config import EvalConfig, SFTConfig, load_config
from tether.data.tasks import builtin_sft_rows, sentiment
from tether.eval.evaluate import evaluate
from tether.eval.online import prompt_text
from tether.eval.tasks import arithmetic_rows, build_task
from tether.errors import ConfigError

SMALL = ["--num_prompts=4", "--samples_per_prompt=2", "--max_new_tokens=6", "--batch_size=4",
         "--tax_problems=4", "--precision=fp32", "--progress=false"]


def _cfg(model, out, *extra):
    return load_config(EvalConfig, None, [f"--model={model}", f"--output={out}", *SMALL, *extra])


@pytest.fixture(scope="module")
def other_tiny_dir(tmp_path_factory, default_tokenizer):
    """A second tiny Llama (another seed) to serve as a reference that differs from the policy."""
    from tether.engine.models import tiny_llama

    path = tmp_path_factory.mktemp("tiny-ref")
    tiny_llama(vocab_size=len(default_tokenizer), tie=True, seed=1,
               pad_token_id=default_tokenizer.pad_token_id).save_pretrained(path)
    default_tokenizer.save_pretrained(path)
    return path


def test_heldout_prompts_are_never_training_prompts():
    from tether.data.prompts import builtin_prompt_rows, split_task_rows

    held = {prompt_text(r["prompt"]) for r in arithmetic_rows(64)}
    assert len(held) == 64
    for train in (builtin_sft_rows(), builtin_prompt_rows(200, seed=1),
                  split_task_rows(1000, 64)[0]):
        assert not held & {prompt_text(r["prompt"]) for r in train}
    # the GRPO demo's 1-digit task: its held-out problems, less the 3 ("3 + 4", "4 - 4",
    # "3 - 1") that the SFT or PPO prompts also hold
    single = {prompt_text(r["prompt"]) for r in arithmetic_rows(64, difficulty="single")}
    grpo_train, grpo_held = split_task_rows(1000, 64, difficulty="single")
    assert not single & {prompt_text(r["prompt"]) for r in grpo_train}
    assert len({prompt_text(r["prompt"]) for r in grpo_held} - single) == 3
    pairs = {prompt_text(r["prompt"]) for r in sentiment.preference_rows()}
    task = build_task("sentiment", n=48, gold=None)
    assert len(task.rows) == 48 and not pairs & {prompt_text(r["prompt"]) for r in task.rows}


def test_task_errors_name_what_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="needs a gold reward function"):
        build_task(str(tmp_path / "x.jsonl"), n=4, gold=None)
    with pytest.raises(ConfigError, match="task must be one of"):
        build_task("poetry", n=4, gold=None)
    with pytest.raises(ConfigError, match="holds out 48"):
        build_task("sentiment", n=100, gold=None)


def test_eval_is_deterministic_and_kl_is_zero_against_itself(tiny_model_dir, tmp_path):
    """Against itself the policy's KL estimates are exactly 0 (same forwards); two runs with one
    seed write the same numbers and samples."""
    a = evaluate(_cfg(tiny_model_dir, tmp_path / "a.json", f"--reference={tiny_model_dir}"))
    b = evaluate(_cfg(tiny_model_dir, tmp_path / "b.json", f"--reference={tiny_model_dir}"))
    pol = a["results"]["policy"]
    assert pol["metrics"]["kl/k1"] == 0.0 and pol["metrics"]["kl/k3"] == 0.0
    assert pol == b["results"]["policy"]
    assert pol["samples"] == a["results"]["reference"]["samples"]  # same model, same seed
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["task"] == "sentiment" and saved["gold"] == "sentiment"
    assert "held-out" in saved["split"]
    keys = {"gold/mean", "gold/stderr", "kl/k1", "kl/k3", "policy/entropy",
            "completions/distinct_1", "completions/distinct_2", "self_bleu",
            "completions/mean_length", "tax/general_nll", "tax/arithmetic_accuracy"}
    assert keys <= set(pol["metrics"])
    assert len(pol["samples"]) == 8  # 4 prompts x 2 samples
    assert all(-1 <= s["gold"] <= 1 for s in pol["samples"])


def test_eval_against_another_reference(tiny_model_dir, other_tiny_dir, tmp_path):
    """A different reference: k3 is positive (k3 >= 0 on every sample, 0 only if equal); the
    reference's own row has KL 0; the arithmetic task's tax is the sentiment score."""
    out = evaluate(_cfg(tiny_model_dir, tmp_path / "e.json", f"--reference={other_tiny_dir}",
                        "--task=arithmetic"))
    pol, ref = (out["results"][k]["metrics"] for k in ("policy", "reference"))
    assert pol["kl/k3"] > 0 and ref["kl/k3"] == 0.0
    assert "tax/sentiment" in pol and "tax/arithmetic_accuracy" not in pol
    assert 0.0 <= pol["gold/mean"] <= 1.0  # the verifier scores 0 or 1
    assert out["gold"] == "arithmetic"


def test_eval_of_a_run_directory_defaults_to_its_start(tiny_model_dir, tmp_path, capsys):
    """A run's reference is the model it started from and eval.json lands in the run."""
    from tether.recipes import sft

    run_dir = tmp_path / "sft"
    sft.run(load_config(SFTConfig, None, tiny_sft_overrides(tiny_model_dir, run_dir)))
    assert "loss/sft" in (run_dir / "report.html").read_text()  # every recipe writes its report
    code = main(["eval", str(run_dir), *[a.replace("--", "--", 1) for a in SMALL],
                 "--tax", "false"])
    assert code == 0
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["reference_path"] == str(tiny_model_dir)
    assert saved["results"]["policy"]["metrics"]["kl/k3"] > 0  # SFT moved it
    assert "gold/mean" in capsys.readouterr().out  # the table
    assert "kl/k3" in (run_dir / "report.html").read_text()  # rewritten with the eval table


def test_eval_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["eval"]) == 2
    assert main(["eval", "default", "--tsk=arithmetic"]) == 2
    err = capsys.readouterr().err
    assert "usage: tether eval" in err and "did you mean 'task'" in err
