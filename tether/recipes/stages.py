"""The pipeline stages that rlhf, cai, goodhart and compare share (no recipe of its own): a
stage's finished marker and resume, the built-in task's PPO prompt files and its gold reward.

    if (done := finished(stage_dir)) is None:
        out = recipe.run(resumable(stage_cfg, stage_dir))  # resumes from its checkpoint
        mark_finished(stage_dir, record)      # <stage dir>/stage.json: skipped when run again
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tether.engine import dist
from tether.engine.batchlog import write_atomic
from tether.engine.run import rerun

MARKER = "stage.json"


def finished(stage_dir: Path) -> dict | None:
    marker = stage_dir / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def mark_finished(stage_dir: Path, record: dict) -> None:
    if dist.is_main():
        write_atomic(stage_dir / MARKER, json.dumps(record, indent=1))
    dist.barrier()


def resumable(stage_cfg, stage_dir: Path):
    """The stage's config with its run directory set, resuming when a checkpoint is there (and
    starting afresh over an earlier attempt's files when none is)."""
    flags = {} if stage_cfg.run.resume else rerun(stage_dir)
    return replace(stage_cfg, run=replace(stage_cfg.run, output_dir=str(stage_dir), **flags))


def positive_tone(prompts: list, completions: list[str], **columns) -> list[float]:
    """Gold reward of the built-in sentiment task: VADER compound sentiment in [-1, 1]."""
    from tether.data.tasks.sentiment import sentiment_score

    return [sentiment_score(c) for c in completions]


def builtin_ppo_prompts(root: Path, train_pairs: Path | None = None) -> tuple[Path, Path]:
    """PPO prompt files for the built-in task: the distinct prompts of the RM's training pairs
    (in file order; without `train_pairs` those of the shipped set of `tether dpo`), and the
    held-out prompts of the generation eval (`tether eval`'s, which no pair has)."""
    from tether.data.tasks.sentiment import heldout_prompts, split_prompts

    rows = [json.loads(line) for line in train_pairs.read_text(encoding="utf-8").splitlines()] \
        if train_pairs else split_prompts()[0]
    seen, train = set(), []
    for row in rows:
        key = json.dumps(row["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            train.append({"prompt": row["prompt"], "group": row.get("group")})
    paths = root / "ppo_prompts.jsonl", root / "ppo_prompts_heldout.jsonl"
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        for path, rows in zip(paths, (train, heldout_prompts())):
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    dist.barrier()
    return paths
