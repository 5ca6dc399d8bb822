"""User groups (segments) of a GRPO run: prompts carrying a `group` field, each group with its own
reward functions (`grpo.group_rewards`), per-group metrics, and the fairness mode
(`grpo.group_fairness: dro`) that weighs the sequences of lagging groups up (docs/grpo.md).

Not to be confused with GRPO's sample groups (the G completions of one prompt, which the
advantages compare): a user group is a set of prompts, and its rows are all the samples of them.
The maths is pure (`tether.advantages.group_dro_weights`, `sequence_group_weights`); this module
keeps the weights between steps, sums over ranks and names the metrics. A helper of `tether grpo`
(recipes/grpo.py) only: GRPO's algorithm, so it sits beside its recipe, not in engine/.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from tether.advantages import group_dro_weights, group_reward_gains, sequence_group_weights
from tether.config import GRPOParams
from tether.data.tasks import segments
from tether.engine import dist
from tether.errors import ConfigError
from tether.losses import kl_penalty
from tether.judge.reward import JudgeReward
from tether.rewards import GroupedRewards, WeightedSum, load_reward, reward_name

FAIRNESS = ("none", "dro", "dro_gain")
NO_GROUP = "none"  # the group of a row without one, when other rows have one


def _group_of(value) -> str:
    if value is None or value == "":
        return NO_GROUP
    if not isinstance(value, str):
        raise ConfigError(f"a prompt row's `group` must be a string, got {value!r}")
    return value


class UserGroups:
    """The run's user groups (sorted names; none when no prompt has a `group`), its rewards (a
    `GroupedRewards` routing each row to its group's functions, or the plain `WeightedSum`) and,
    with fairness on, the group weights w (K,) on the simplex (uniform at the start; in the
    checkpoint's trainer state)."""

    def __init__(self, gc_: GRPOParams, prompts: list, rewards: WeightedSum, *,
                 task: str | None = None):
        if gc_.group_fairness not in FAIRNESS:
            raise ConfigError(f"grpo.group_fairness must be one of {', '.join(FAIRNESS)}, got "
                              f"'{gc_.group_fairness}'")
        if gc_.group_step_size < 0:
            raise ConfigError(f"grpo.group_step_size must be >= 0, got {gc_.group_step_size}")
        grouped = any(p.columns.get("group") not in (None, "") for p in prompts)
        for p in prompts if grouped else ():  # every row names its group, for the rewards
            p.columns["group"] = _group_of(p.columns.get("group"))
        self.names = sorted({p.columns["group"] for p in prompts}) if grouped else []
        self.fair, self.step_size = gc_.group_fairness != "none", gc_.group_step_size
        self.gain = gc_.group_fairness == "dro_gain"  # DRO on each group's gain over its start
        if self.fair and len(self.names) < 2:
            raise ConfigError(f"grpo.group_fairness={gc_.group_fairness} needs prompts of at "
                              f"least 2 groups (their `group` field), got {self.names or 'none'}")
        table, weights = gc_.group_rewards, gc_.group_reward_weights
        if not table and task == "segments":  # the built-in task's groups want their own
            table, weights = segments.GROUP_REWARDS, segments.GROUP_REWARD_WEIGHTS
        self.rewards = self._routed(gc_, table, weights, rewards) if table else rewards
        K = max(1, len(self.names))
        self.weights = torch.full((K,), 1.0 / K, dtype=torch.float64)  # (K,)
        self.baseline = torch.full((K,), math.nan, dtype=torch.float64)  # (K,) dro_gain's starts
        self._step: tuple[torch.Tensor, torch.Tensor] | None = None  # (sums (K,), counts (K,))

    def _routed(self, gc_: GRPOParams, table: dict, weights: dict, default: WeightedSum):
        for key, names in (("grpo.group_rewards", table), ("grpo.group_reward_weights", weights)):
            extra = sorted(set(names) - set(self.names if key.endswith("rewards") else table))
            if extra:
                raise ConfigError(f"{key} names group(s) {', '.join(extra)}, which no prompt has "
                                  f"(groups: {', '.join(self.names) or 'none'})")
        functions = {name: fn for name, fn, _ in default.components}
        specs = {reward_name(spec): spec for spec in gc_.rewards}
        per_group = {}
        for group, group_specs in table.items():
            w = weights.get(group) or [1.0] * len(group_specs)
            if not group_specs or len(w) != len(group_specs):
                raise ConfigError(f"grpo.group_rewards.{group} needs at least one reward function "
                                  f"and grpo.group_reward_weights.{group} one weight per function "
                                  f"(got {len(group_specs)} functions, {len(w)} weights)")
            for spec in group_specs:
                name = reward_name(spec)
                if specs.setdefault(name, spec) != spec:
                    raise ConfigError(f"grpo.group_rewards.{group}: '{spec}' and '{specs[name]}' "
                                      f"would both be logged as reward/{name}; rename one")
                if name not in functions:
                    functions[name] = load_reward(spec, judge=partial(JudgeReward, gc_.judge))
            per_group[group] = {reward_name(s): float(x) for s, x in zip(group_specs, w)}
        fallback = {name: w for name, _, w in default.components}
        if set(self.names) <= set(table):  # every group has its own: grpo.rewards goes unused
            fallback = {}
            functions = {k: v for k, v in functions.items()
                         if any(k in w for w in per_group.values())}
        return GroupedRewards(list(functions.items()), per_group, fallback)

    def ids(self, prompts: list, group_size: int) -> torch.Tensor:
        """(B,) long: the group index of each row (row i continues prompt i // G); 0 without
        groups."""
        index = {name: i for i, name in enumerate(self.names)}
        return torch.tensor([index.get(p.columns.get("group"), 0) for p in prompts],
                            dtype=torch.long).repeat_interleave(group_size)

    def update(self, reward: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The step's group means of `reward` (B,) over all ranks; with fairness, the weights'
        exponentiated-gradient step on them (`group_dro_weights`) and each row's factor on its
        advantage, c_i = w_{g_i} N / sum_k n_k w_k (`sequence_group_weights`); else 1 (and
        without groups nothing is summed). (B,)"""
        if not self.names:
            return torch.ones_like(reward)
        K = len(self.weights)
        counts = dist.all_reduce_sum(torch.bincount(ids, minlength=K).double()).cpu()  # (K,)
        sums = dist.all_reduce_sum(torch.bincount(ids, reward.double(), minlength=K)).cpu()
        self._step = (sums, counts)
        if not self.fair:
            return torch.ones_like(reward)
        signal = sums / counts.clamp(min=1)  # (K,) the step's mean reward of each group
        if self.gain:
            signal, self.baseline = group_reward_gains(signal, counts, self.baseline)
        self.weights, _ = group_dro_weights(signal, counts, self.weights,
                                            step_size=self.step_size)
        return sequence_group_weights(self.weights, ids, counts).to(reward.dtype)

    def means(self, ids: torch.Tensor, key: str, values) -> dict[str, float]:
        """`group/<name>/<key>`: the mean of `values` (one per row, NaN = no value) over each
        group's rows of all ranks; groups without a value this step are left out."""
        if not self.names:
            return {}
        values = torch.as_tensor(values, dtype=torch.float64)
        have = ~values.isnan()
        K = len(self.names)
        n = dist.all_reduce_sum(torch.bincount(ids[have], minlength=K).double()).cpu()
        s = dist.all_reduce_sum(torch.bincount(ids[have], values[have], minlength=K)).cpu()
        return {f"group/{name}/{key}": (s[k] / n[k]).item()
                for k, name in enumerate(self.names) if n[k] > 0}

    def metrics(self, ids: torch.Tensor, lengths: torch.Tensor,
                kl: torch.Tensor | None = None) -> dict[str, float]:
        """group/<name>/reward (from `update`), /length (completion tokens), /kl (k3 per sequence,
        rows with reference log-probs) and, with fairness, /weight = K w_g (1 = uniform)."""
        if not self.names:
            return {}
        sums, counts = self._step
        out = {f"group/{name}/reward": (sums[k] / counts[k]).item()
               for k, name in enumerate(self.names) if counts[k] > 0}
        out.update(self.means(ids, "length", lengths.double()))
        if kl is not None:
            out.update(self.means(ids, "kl", kl))
        if self.fair:
            out.update({f"group/{name}/weight": len(self.names) * w
                        for name, w in zip(self.names, self.weights.tolist())})
        return out

    def state(self) -> dict:
        """What a checkpoint keeps: the fairness weights by group name (dro_gain: and the
        baselines)."""
        out = {"group_weights": dict(zip(self.names, self.weights.tolist()))} if self.fair else {}
        if self.gain:  # NaN (no rows yet) saved as None
            out["group_baselines"] = {n: None if math.isnan(b) else b
                                      for n, b in zip(self.names, self.baseline.tolist())}
        return out

    def load_state(self, state: dict) -> None:
        if self.fair:
            saved = state.get("group_weights", {})
            if sorted(saved) != self.names:
                raise ConfigError(f"the checkpoint's group weights are for groups {sorted(saved)}, "
                                  f"this run's prompts have {self.names}")
            self.weights = torch.tensor([saved[name] for name in self.names], dtype=torch.float64)
        if self.gain:
            saved = state.get("group_baselines", {})
            self.baseline = torch.tensor([math.nan if saved.get(n) is None else saved[n]
                                          for n in self.names], dtype=torch.float64)

    def summary(self, before: dict, after: dict) -> list[str]:
        """Console lines: each group's held-out reward (and accuracy) before -> after."""
        lines = []
        for name in self.names:
            parts = [f"{k} {before[key]:.3f} -> {after[key]:.3f}"
                     for k in ("reward", "accuracy", "gold")
                     if (key := f"eval/group/{name}/{k}") in before and key in after]
            if parts:
                lines.append(f"held-out group {name} (greedy): {', '.join(parts)}")
        return lines

    def row_kl(self, rollout, batches: list, rows: torch.Tensor) -> torch.Tensor | None:
        """(B,) k3 of each rollout row against the reference log-probs filled into `batches`
        (built from rollout rows `rows`, in order; a batch's rows beyond `rows` are fillers),
        summed over the completion, with the sampler's own log-probs (`rollout.logps`); NaN for
        rows without. None without groups (nothing to log it for)."""
        return row_kl(rollout, batches, rows) if self.names else None


def row_kl(rollout, batches: list, rows: torch.Tensor) -> torch.Tensor:
    """`UserGroups.row_kl`, for any rollout."""
    out = torch.full((len(rollout.texts),), float("nan"), dtype=torch.float64)
    start = 0
    for b in batches:
        idx = rows[start:start + len(b.ref_logps)]
        C = b.ref_logps.shape[1]
        k3 = kl_penalty(rollout.logps[idx, :C].float(), b.ref_logps[:len(idx)].float().cpu(),
                        kind="k3")  # (n, C)
        mask = rollout.completion_mask[idx, :C]
        out[idx] = torch.where(mask, k3, torch.zeros_like(k3)).sum(dim=1).double()
        start += len(b.ref_logps)
    return out
