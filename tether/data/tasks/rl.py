"""The RL recipes' prompts by name (`grpo.task`): the built-in tasks, or the rows of data.path."""

from __future__ import annotations

from tether.config import DataConfig, GRPOParams
from tether.data.prompts import SHOTS, PromptExample, load_rl_prompts
from tether.data.tasks import segments
from tether.data.tasks.arithmetic import DIFFICULTIES
from tether.errors import ConfigError

TASKS = {"arithmetic": load_rl_prompts, "segments": segments.load_segment_prompts}


def load_task_prompts(data: DataConfig, gc_: GRPOParams, tokenizer, *, n_eval: int
                      ) -> tuple[str | None, list[PromptExample], list[PromptExample]]:
    """(task name or None for data.path's rows, train prompts, held-out prompts); a bad
    grpo.task / task_difficulty / task_shots is a ConfigError naming the key."""
    task = gc_.task if data.path is None else None
    if task is not None and task not in TASKS:
        raise ConfigError(f"grpo.task must be one of {', '.join(TASKS)}, got '{gc_.task}'")
    if data.path is None and gc_.task_difficulty not in DIFFICULTIES:
        raise ConfigError(f"grpo.task_difficulty must be one of {', '.join(DIFFICULTIES)}, "
                          f"got '{gc_.task_difficulty}'")
    if data.path is None and not 0 <= gc_.task_shots <= len(SHOTS):
        raise ConfigError(f"grpo.task_shots must be between 0 and {len(SHOTS)}, "
                          f"got {gc_.task_shots}")
    train, held = TASKS[task or "arithmetic"](
        data, tokenizer, n_eval=n_eval, task_size=gc_.task_size,
        difficulty=gc_.task_difficulty, shots=gc_.task_shots,
        system_prompt=gc_.task_system_prompt)
    return task, train, held
