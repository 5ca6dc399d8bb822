"""Resume equals uninterrupted, for every trainer: a run "killed" right after a mid-run checkpoint
(and a metrics line it logged after that checkpoint) and resumed with `--run.resume=true` logs the
same metrics for every step, to the bit (fp32 on CPU), once each, and ends with bitwise the same
weights as the run that was never stopped, whatever the caller's RNG did in between.

Each case also resumes its trainer's own state: DPO's group-robust weights, GRPO's fairness
weights (and two iterations per rollout against a reference), PPO's adaptive KL coefficient,
RM's margins. The SFT case through the `tether` command, kill -9 and Ctrl-C: test_failure_resume.py.
"""

import json

import pytest
import torch

from tests.recipes.tiny_runs import (LOSS, TRAINERS, WEIGHTS, Killed, kill_after_checkpoint,
                                     training_records)

CASES = {  # name: (trainer, checkpoint step killed after, arguments)
    "sft": ("sft", 3, ["--run.save_every=3"]),
    "rm": ("rm", 2, ["--train.max_steps=4", "--run.save_every=2", "--rm.margin_key=m",
                     "--rm.center_coef=0.01"]),
    "prm": ("prm", 2, ["--train.max_steps=4", "--run.save_every=2", "--prm.aggregate=prod"]),
    "dpo-group-robust": ("dpo", 3, ["--run.save_every=3", "--train.max_steps=6",
                                    "--dpo.group_robust=true", "--dpo.group_step_size=0.5",
                                    "--data.eval_fraction=0.1", "--train.batch_size=4"]),
    "grpo-dapo": ("grpo", 2, ["--train.max_steps=4", "--run.save_every=2",
                              "--grpo.loss_type=dapo", "--grpo.num_iterations=2",
                              "--grpo.beta=0.05", "--grpo.dynamic_sampling=false"]),
    "grpo-dro": ("grpo", 2, ["--train.max_steps=4", "--run.save_every=2",
                             "--grpo.prompts_per_step=4", "--grpo.group_fairness=dro",
                             "--grpo.group_step_size=2.0", "GROUPS"]),
    "ppo-adaptive-kl": ("ppo", 2, ["--train.max_steps=3", "--run.save_every=2",
                                   "--train.batch_size=4", "--train.micro_batch_size=4",
                                   "--ppo.kl_target=0.01", "--ppo.kl_horizon=40",
                                   "--ppo.kl_coef=0.2"]),
}


def _args(name, tmp_path):
    """The case's arguments; "GROUPS": test_grpo's two user groups, each with its own reward."""
    trainer, kill_at, args = CASES[name]
    if "GROUPS" not in args:
        return args
    from tests.recipes.test_grpo import _group_rows

    _, data = _group_rows(tmp_path)
    rewards = ("--grpo.group_rewards={a: [tests.recipes.test_grpo:space_fraction], "
               "b: [tests.recipes.test_grpo:half_spaces]}")
    return [a for a in args if a != "GROUPS"] + [*data, rewards]


@pytest.mark.parametrize("name", list(CASES))
def test_resume_equals_uninterrupted(name, tiny_model_dir, tmp_path, monkeypatch):
    trainer, kill_at, _ = CASES[name]
    run, loss, args = TRAINERS[trainer], LOSS[trainer], _args(name, tmp_path)
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))  # DPO's reference log-probs
    full = run(tiny_model_dir, tmp_path, tmp_path / "full", *args)

    kill_after_checkpoint(monkeypatch, kill_at)
    with pytest.raises(Killed):
        run(tiny_model_dir, tmp_path, tmp_path / "cut", *args)
    monkeypatch.undo()
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # a step logged after the checkpoint
        f.write(json.dumps({"step": kill_at + 1, loss: -1.0}) + "\n")
    torch.manual_seed(999)  # the resumed run owes nothing to the caller's RNG
    cut = run(tiny_model_dir, tmp_path, tmp_path / "cut", *args, "--run.resume=true")

    expected = training_records(tmp_path / "full", loss)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert sum(f'"{loss}"' in line for line in lines) == len(expected)  # the stale line went
    resumed = training_records(tmp_path / "cut", loss)
    assert sorted(resumed) == sorted(expected) and len(expected) > kill_at
    for step, record in expected.items():
        assert resumed[step] == record, (step, resumed[step], record)
    weights = dict(cut[WEIGHTS[trainer]].named_parameters())
    for key, p in full[WEIGHTS[trainer]].named_parameters():
        assert torch.equal(p, weights[key]), key
