"""Every key a recipe logs to metrics.jsonl is defined in docs/metrics.md (house rule 7).

The documented names are the backticked names in the first column of docs/metrics.md's tables;
a placeholder such as `reward/<name>/mean` stands for one path segment. The logged keys come from
tiny runs of the six trainers (tests/recipes/tiny_runs.py, 2 steps each, with the options that
log the most keys: gold diagnostics, named groups, kto, user groups).
"""

import json
import re
from pathlib import Path

import pytest

from tests.recipes.tiny_runs import TRAINERS

METRICS_MD = Path(__file__).parents[1] / "docs" / "metrics.md"
NOT_METRICS = {"step"}  # the line's step counter (defined in the page's first paragraph)


def documented_names(markdown: str) -> list[str]:
    """The backticked names of each table row's first cell (header and rule rows skipped)."""
    names = []
    for line in markdown.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        first = line.split("|")[1]
        names += re.findall(r"`([^`]+)`", first)
    return names


def name_pattern(name: str) -> re.Pattern:
    """A documented name as a regex: `<anything>` matches one path segment."""
    parts = re.split(r"<[^>]+>", name)
    return re.compile("[^/]+".join(re.escape(p) for p in parts) + r"\Z")


def undocumented(keys, names: list[str]) -> list[str]:
    patterns = [name_pattern(n) for n in names]
    return sorted(k for k in set(keys) - NOT_METRICS if not any(p.match(k) for p in patterns))


def test_documented_names_and_patterns_by_hand():
    """Two rows: `a/b`, `c/<x>/mean` (two names in one cell) and a header row.
    `c/<x>/mean` matches c/q/mean, not c/q/r/mean (one segment) nor c/q/mean2 (anchored)."""
    md = "| name | formula |\n|---|---|\n| `a/b` | `not/a/name` |\n| `c/<x>/mean`, `d` | x |\n"
    names = documented_names(md)
    assert names == ["a/b", "c/<x>/mean", "d"]
    assert undocumented(["a/b", "c/q/mean", "d", "step"], names) == []
    assert undocumented(["c/q/r/mean", "c/q/mean2", "a/bc"], names) == ["a/bc", "c/q/mean2",
                                                                         "c/q/r/mean"]


def word_count(prompts, completions, **columns):
    return [len(c.split()) / 10 for c in completions]


GOLD = [f"--rewards.gold={__name__}:word_count", "--rewards.gold_every=1"]
RUNS = {  # name: (trainer, arguments): 2 steps each, the options that log the most keys
    "sft": ("sft", ["--train.max_steps=2"]),
    "rm": ("rm", ["--train.max_steps=2"]),
    "prm": ("prm", ["--train.max_steps=2"]),
    "dpo": ("dpo", ["--train.max_steps=2", "--dpo.group_robust=true", "--run.eval_generations=2",
                    *GOLD]),
    "kto": ("dpo", ["--train.max_steps=2", "--dpo.loss=kto"]),
    "grpo": ("grpo", ["--train.max_steps=2", "--grpo.beta=0.05", *GOLD]),
    "ppo": ("ppo", ["--train.max_steps=2", "--train.batch_size=4", "--train.micro_batch_size=4",
                    *GOLD]),
}


@pytest.fixture(scope="module")
def logged_keys(tiny_model_dir, tmp_path_factory) -> dict[str, set[str]]:
    """run name -> every key its metrics.jsonl holds."""
    tmp = tmp_path_factory.mktemp("metric_keys")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TETHER_CACHE", str(tmp / "cache"))  # DPO's reference log-probs
        from tether.data.tasks import sentiment

        mp.setattr(sentiment, "MAX_NEW_TOKENS", 6)  # DPO's held-out samples: short
        for name, (trainer, args) in RUNS.items():
            TRAINERS[trainer](tiny_model_dir, tmp, tmp / name, *args)
            lines = (tmp / name / "metrics.jsonl").read_text().splitlines()
            out[name] = {k for line in lines for k in json.loads(line)}
    return out


def test_every_logged_key_is_documented(logged_keys):
    names = documented_names(METRICS_MD.read_text())
    every = set().union(*logged_keys.values())
    assert {"timing/update", "timing/generate", "completions/distinct_2", "gold/mean",
            "group_weights/easy", "kto/kl"} <= every  # the runs log what they should
    assert not [k for k in every if k.startswith(("time/", "distinct/", "eval/kl"))]
    assert undocumented(every, names) == []
    # negative control: a key nobody documented is named
    assert undocumented(every | {"fake/key"}, names) == ["fake/key"]
