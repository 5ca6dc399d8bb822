"""`tether compare` mechanics on tiny random models: every method runs in its own process, is
evaluated against the starting policy, and lands in compare.json, the table and the plot."""

import json

from tether.config import CompareConfig, load_config
from tether.recipes import compare

COMMON = ["--train.precision=fp32", "--run.tensorboard=false", "--train.max_steps=1"]


def tiny_prefs(model_dir, cache) -> list[str]:
    """A tiny built preference set from the tiny model in a test directory (the default set
    would sample the default model for minutes into the user's cache)."""
    return [f"--prefs.model={model_dir}", f"--prefs.cache_dir={cache}", "--prefs.pairs=8",
            "--prefs.heldout_pairs=2", "--prefs.samples_per_prompt=3", "--prefs.max_new_tokens=6",
            "--prefs.batch_prompts=4", "--prefs.min_gap=0.5",
            "--prefs.gold=tests.recipes.test_prefs:length_gold"]


def test_tiny_compare_end_to_end(tiny_model_dir, tmp_path, capsys):
    root = tmp_path / "cmp"
    lists = {
        "rm_args": [*COMMON, "--train.batch_size=4", "--train.micro_batch_size=4",
                    "--data.max_length=64", *tiny_prefs(tiny_model_dir, tmp_path / "prefs")],
        "dpo_args": [*COMMON, "--train.batch_size=4", "--train.micro_batch_size=4",
                     "--data.max_length=64", "--run.eval_generations=2"],
        "ppo_args": [*COMMON, "--train.batch_size=4", "--train.micro_batch_size=4",
                     "--ppo.max_new_tokens=4", "--run.eval_generations=2"],
        "grpo_args": [*COMMON, "--grpo.group_size=2", "--grpo.prompts_per_step=2",
                      "--grpo.max_new_tokens=4", "--train.micro_batch_size=4",
                      "--run.eval_generations=2"],
    }
    overrides = [f"--output_dir={root}", f"--model={tiny_model_dir}", "--dpo_betas=[0.1]",
                 "--bon_n=[1,2]", "--num_prompts=2", "--samples_per_prompt=2",
                 "--max_new_tokens=4", "--progress=false"]
    cfg = load_config(CompareConfig, None, overrides)
    for key, value in lists.items():
        setattr(cfg, key, value)
    out = compare.run(cfg)

    names = [r["method"] for r in out["rows"]]
    assert names == ["dpo-beta0.1", "ppo", "grpo", "bon-1", "bon-2"]
    saved = json.loads((root / "compare.json").read_text())
    assert saved["rows"] == out["rows"] and (root / "compare.png").stat().st_size > 1000
    trained = {r["method"]: r for r in out["rows"][:3]}
    for r in trained.values():
        assert r["timing/total"] > 0 and r["memory/peak_mb"] > 100  # a child process of its own
        assert r["kl/k3"] >= 0 and -1 <= r["gold/mean"] <= 1
    bon1, bon2 = out["rows"][3:]
    # best-of-1 is the plain mean of all samples: its proxy mean is the start's mean proxy
    # score of the same kind of samples only in expectation, but its gold is a VADER mean
    assert all(-1 <= r["gold/mean"] <= 1 for r in (bon1, bon2))
    assert bon1["kl/k3"] == 0.0 and abs(bon2["kl/k3"] - (0.6931472 - 0.5)) < 1e-6
    assert out["start"]["kl/k3"] == 0.0
    assert "completions/distinct_2" in capsys.readouterr().out

    # a second call reuses every row on disk: nothing trains again
    again = compare.run(cfg)
    assert again["rows"] == out["rows"]
