"""Tiny deterministic runs of the six trainers (sft, rm, prm, dpo, grpo, ppo), shared by the
golden-curve test (test_golden.py) and the kill-and-resume test (test_resume.py).

`TRAINERS[name](model_dir, tmp, out_dir, *extra)` runs the trainer in `out_dir` on its tiny data
(written under `tmp`) and returns the recipe's result; `LOSS[name]` is the metrics.jsonl key of
its per-step training loss, `WEIGHTS[name]` the result key of its trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import tiny_sft_overrides
from tether.config import (DPOConfig, GRPOConfig, PPOConfig, PRMConfig, RMConfig, SFTConfig,
                           load_config)
from tether.engine import checkpoint
from tether.recipes import dpo, grpo, ppo, prm, rm, sft

TIMING = ("timing/", "memory/", "tokens/per_second")  # differ between runs by nature


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_sft(model_dir, tmp, out_dir, *extra):
    return sft.run(load_config(SFTConfig, None, tiny_sft_overrides(model_dir, out_dir, *extra)))


def run_rm(model_dir, tmp, out_dir, *extra):
    from tests.recipes.test_rm import overrides, rule_rows

    data = write_jsonl(tmp / "rm_rows.jsonl", [dict(r, m=0.5) for r in rule_rows(40)])
    return rm.run(load_config(RMConfig, None, overrides(model_dir, out_dir, data, *extra)))


def run_prm(model_dir, tmp, out_dir, *extra):
    from tests.recipes.test_prm import overrides, stepwise_rows

    data = write_jsonl(tmp / "prm_rows.jsonl", stepwise_rows(40))
    return prm.run(load_config(PRMConfig, None, overrides(model_dir, out_dir, data, *extra)))


def run_dpo(model_dir, tmp, out_dir, *extra):
    """DPO on test_dpo's pairs (KTO, `--dpo.loss=kto`: on its unpaired examples)."""
    from tests.recipes.test_dpo import ROWS, UNPAIRED, _overrides

    rows = UNPAIRED if "--dpo.loss=kto" in extra else ROWS
    data = write_jsonl(tmp / "dpo_rows.jsonl", rows * 2)
    return dpo.run(load_config(DPOConfig, None, _overrides(model_dir, out_dir, data, *extra)))


def run_grpo(model_dir, tmp, out_dir, *extra):
    from tests.recipes.test_grpo import overrides

    return grpo.run(load_config(GRPOConfig, None, overrides(model_dir, out_dir, *extra)))


def run_ppo(model_dir, tmp, out_dir, *extra):
    from tests.recipes.test_ppo import overrides

    return ppo.run(load_config(PPOConfig, None, overrides(model_dir, out_dir, *extra)))


TRAINERS = {"sft": run_sft, "rm": run_rm, "prm": run_prm, "dpo": run_dpo, "grpo": run_grpo,
            "ppo": run_ppo}
LOSS = {"sft": "loss/sft", "rm": "loss/rm", "prm": "loss/prm", "dpo": "loss/dpo",
        "grpo": "loss/policy", "ppo": "loss/policy"}
WEIGHTS = {"sft": "policy", "rm": "model", "prm": "model", "dpo": "policy", "grpo": "policy",
           "ppo": "models"}


def training_records(run_dir: Path, loss_key: str) -> dict[int, dict]:
    """metrics.jsonl: {step: record} of the training steps (timing dropped)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(TIMING)}
            for r in rows if loss_key in r}


class Killed(Exception):
    """What `kill_after_checkpoint` raises: the process "dies" right after a checkpoint."""


def kill_after_checkpoint(monkeypatch, step: int, where: str = "") -> None:
    """checkpoint.save raises Killed right after writing checkpoint `step` (into a checkpoints
    folder whose path contains `where`); monkeypatch.undo() restores it."""
    real = checkpoint.save

    def save_then_die(root, at, **kwargs):
        path = real(root, at, **kwargs)
        if at == step and where in str(root):
            raise Killed
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_die)
