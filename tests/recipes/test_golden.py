"""Golden curves: a tiny deterministic run of each trainer (sft, rm, prm, dpo, grpo, ppo; 6 steps,
fp32) must reproduce its committed per-step curves in tests/recipes/golden/.

A change that should not change the maths (refactor, speed-up) keeps these numbers; a change that
does must say why and regenerate them: `TETHER_REGEN_GOLDEN=1 pytest tests/recipes/test_golden.py`
(`-k NAME` for one). The tolerance is `TOLERANCE`, in one place.
"""

import json
import os
from pathlib import Path

import pytest

from tests.recipes.tiny_runs import LOSS, TRAINERS, training_records

GOLDEN = Path(__file__).parent / "golden"
TOLERANCE = {"rel": 1e-4, "abs": 1e-6}  # pytest.approx; from one machine for now (issue 35)
# The RL trainers' curves: the loss alone is near zero by construction (advantages are centred),
# so their reward and KL are held too.
CURVES = {"grpo": ("loss/policy", "reward/mean", "kl/k3"),
          "ppo": ("loss/policy", "value/loss", "reward/mean", "kl/k1")}

CASES = {  # golden file: (trainer, arguments)
    "sft_tiny": ("sft", ["--run.eval_generations=0"]),
    "sft_tiny_packed": ("sft", ["--run.eval_generations=0", "--data.packing=true",
                                "--train.batch_size=2", "--train.micro_batch_size=1",
                                "--data.max_length=128"]),
    "rm_tiny": ("rm", ["--train.max_steps=6"]),
    "prm_tiny": ("prm", ["--train.max_steps=6"]),
    "dpo_tiny": ("dpo", ["--dpo.loss=dpo", "--dpo.beta=0.5", "--train.max_steps=6"]),
    "dpo_tiny_kto": ("dpo", ["--dpo.loss=kto", "--dpo.beta=0.5", "--train.max_steps=6"]),
    "grpo_tiny": ("grpo", ["--grpo.loss_type=dapo", "--grpo.beta=0.05",
                           "--grpo.num_iterations=2", "--grpo.dynamic_sampling=false"]),
    "ppo_tiny": ("ppo", ["--train.max_steps=6", "--train.batch_size=4",
                         "--train.micro_batch_size=4"]),
}


def curves(trainer: str, run_dir: Path) -> dict[str, list[float]]:
    records = training_records(run_dir, LOSS[trainer])
    return {key: [records[s][key] for s in sorted(records)]
            for key in CURVES.get(trainer, (LOSS[trainer],))}


def stored(golden: dict, trainer: str) -> dict[str, list[float]]:
    """A golden file's curves (the first files hold the loss alone, as "losses")."""
    return golden["curves"] if "curves" in golden else {LOSS[trainer]: golden["losses"]}


@pytest.mark.parametrize("name", list(CASES))
def test_golden_curve(name, tiny_model_dir, tmp_path, monkeypatch):
    trainer, args = CASES[name]
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))  # DPO's reference log-probs
    TRAINERS[trainer](tiny_model_dir, tmp_path, tmp_path / name, *args)
    got = curves(trainer, tmp_path / name)
    assert all(len(values) == 6 for values in got.values()), got
    path = GOLDEN / f"{name}.json"
    if os.environ.get("TETHER_REGEN_GOLDEN"):
        path.write_text(json.dumps({"overrides": args, "curves": got}, indent=1) + "\n")
    golden = stored(json.loads(path.read_text()), trainer)
    assert got.keys() == golden.keys()
    for key, values in golden.items():
        assert got[key] == pytest.approx(values, **TOLERANCE), key
