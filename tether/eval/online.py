"""Online diagnostics: what the RL and DPO recipes measure and watch while they train.

    distinct_n, trend      pure maths (strings / floats in, a float out)
    Watcher                warns by name, once per run, when the logged metrics show reward
                           hacking, entropy or diversity collapse, or KL past a bound; a resumed
                           run rebuilds it by replaying metrics.jsonl (`read_metrics`)
    Diagnostics            one run's gold reward, watcher and samples.jsonl, as the recipes use
                           them: `rollout_metrics` each step, `log` for every metrics line
    heldout_greedy         held-out greedy evaluation (PPO, GRPO) with the samples it wrote
    (DPO's sampled held-out completions go through `tether eval`'s `heldout_metrics`)

Every metric is defined in docs/metrics.md, every warning in docs/diagnostics.md. Recipes call
this module; it imports no recipe.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tether.config import DiagnosticsConfig, RewardsConfig
from tether.engine import dist
from tether.errors import ConfigError

SAMPLES_KEPT = 16  # prompts whose held-out completions go to samples.jsonl
TREND_TOL = 1e-3  # a fitted change across a window must exceed this (and the scatter) to count

# ------------------------------------------------------------------------------ pure maths


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over all texts, whitespace tokens (distinct-1/2 of Li et
    al. 2016: a corpus-level ratio, not a mean of per-text ratios); 0.0 without any n-gram."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def trend(values: list[float]) -> float:
    """Least-squares slope of values against their index 0..n-1 (per entry); 0.0 for n < 2.
    slope = sum_i (i - i_mean)(v_i - v_mean) / sum_i (i - i_mean)^2."""
    n = len(values)
    if n < 2:
        return 0.0
    x_mean, y_mean = (n - 1) / 2, sum(values) / n
    sxy = sum((i - x_mean) * (v - y_mean) for i, v in enumerate(values))
    return sxy / sum((i - x_mean) ** 2 for i in range(n))


def fitted_change(values: list[float]) -> float:
    """The least-squares line's change across the window, slope * (n - 1), when it stands out:
    larger than TREND_TOL and than the RMS scatter of the values around the line; else 0.0.
    (A plateau of noise has a slope too; this keeps it from counting as a rise or a fall.)"""
    n, slope = len(values), trend(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    scatter = math.sqrt(sum((v - mean - slope * (i - (n - 1) / 2)) ** 2
                            for i, v in enumerate(values)) / n)
    change = slope * (n - 1)
    return change if abs(change) > max(TREND_TOL, scatter) else 0.0


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, "nan" strings, lists, bools)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# ------------------------------------------------------------------------------ the watcher


@dataclass(frozen=True)
class DiagnosticWarning:
    name: str  # reward_hacking | entropy_collapse | diversity_collapse | kl_bound
    step: int
    message: str  # one line, with the numbers


class Watcher:
    """Reads each metrics line a run writes (`observe(step, metrics)`) and returns the warnings
    that line triggers, each name at most once per run:

      reward_hacking      over the last `window` lines with `gold/mean`, the proxy (the latest
                          `proxy` value at or before each; PPO/GRPO `reward/mean`, DPO
                          `rewards/margin`) rises while gold falls (`fitted_change`)
      entropy_collapse    `policy/entropy` < entropy_drop x its first logged value
      diversity_collapse  `completions/distinct_2` < distinct2_min x its first logged value
      kl_bound            `kl/k1` or `kl/k3` > kl_max (kl_max > 0)

    `replay(lines)` feeds the lines of an interrupted run: the state comes back and the names in
    their `warnings` lists count as fired, so a resumed run does not warn twice."""

    def __init__(self, cfg: DiagnosticsConfig, *, proxy: str = "reward/mean",
                 gold: str = "gold/mean"):
        if cfg.window < 2:
            raise ConfigError(f"diagnostics.window must be >= 2 (a trend needs two gold "
                              f"evaluations), got {cfg.window}")
        self.cfg, self.proxy_key, self.gold_key = cfg, proxy, gold
        self.fired: set[str] = set()
        self.first: dict[str, tuple[int, float]] = {}  # key -> (step, first logged value)
        self.proxy: float | None = None  # the latest proxy value
        self.points: list[tuple[int, float, float]] = []  # (step, proxy, gold) per gold line

    def observe(self, step: int, metrics: dict, *, replaying: bool = False
                ) -> list[DiagnosticWarning]:
        if not self.cfg.warn:
            return []
        found = self._update(step, metrics)
        if replaying:
            self.fired.update(n for n in metrics.get("warnings") or [] if isinstance(n, str))
            return []
        new = [w for w in found if w.name not in self.fired]
        self.fired.update(w.name for w in new)
        return new

    def replay(self, lines: list[dict]) -> None:
        for line in lines:
            self.observe(int(line.get("step", 0)), line, replaying=True)

    def _update(self, step: int, m: dict) -> list[DiagnosticWarning]:
        cfg, out = self.cfg, []
        if (p := _number(m.get(self.proxy_key))) is not None:
            self.proxy = p
        if (g := _number(m.get(self.gold_key))) is not None and self.proxy is not None:
            self.points.append((step, self.proxy, g))
            last = self.points[-cfg.window:]
            if len(last) == cfg.window:
                rise = fitted_change([q for _, q, _ in last])
                fall = fitted_change([x for _, _, x in last])
                if rise > 0 and fall < 0:
                    out.append(DiagnosticWarning("reward_hacking", step, (
                        f"over the last {cfg.window} gold evaluations (steps {last[0][0]}-{step}) "
                        f"the proxy {self.proxy_key} rose by {rise:.4g} while {self.gold_key} fell "
                        f"by {-fall:.4g} (least-squares fits): the policy may be exploiting the "
                        "proxy reward")))
        for key, name, ratio, what in (
                ("policy/entropy", "entropy_collapse", cfg.entropy_drop,
                 "diagnostics.entropy_drop"),
                ("completions/distinct_2", "diversity_collapse", cfg.distinct2_min,
                 "diagnostics.distinct2_min")):
            if (v := _number(m.get(key))) is None:
                continue
            if key not in self.first:
                self.first[key] = (step, v)
            s0, v0 = self.first[key]
            if ratio > 0 and v0 > 0 and v < ratio * v0:
                out.append(DiagnosticWarning(name, step, (
                    f"{key} {v:.4g} is below {what} {ratio:g} x its first value {v0:.4g} "
                    f"(step {s0}): the policy is collapsing onto few "
                    f"{'tokens' if name == 'entropy_collapse' else 'phrasings'}")))
        if cfg.kl_max > 0:
            over = [(k, v) for k in ("kl/k1", "kl/k3")
                    if (v := _number(m.get(k))) is not None and v > cfg.kl_max]
            if over:
                out.append(DiagnosticWarning("kl_bound", step, ", ".join(
                    f"{k} {v:.4g}" for k, v in over) + f" nats passed diagnostics.kl_max "
                    f"{cfg.kl_max:g}: the policy has moved far from the reference"))
        return out


def read_metrics(path: str | Path, up_to_step: int) -> list[dict]:
    """The lines of a metrics.jsonl with step <= up_to_step (torn or non-JSON lines skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and line.get("step", 0) <= up_to_step:
            lines.append(line)
    return lines


# ------------------------------------------------------------------------------ across ranks


def all_gather(items: list) -> list:
    """Every rank's items, concatenated in rank order (this rank's alone on one process)."""
    if not dist.is_distributed():
        return list(items)
    parts: list = [None] * dist.world_size()
    torch.distributed.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def sequence_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                kind: str) -> float:
    """Mean over all ranks' rows of `tether.eval.stats.sequence_kl` (k1 | k3 summed over each
    completion: an estimate of KL(pi || ref) per sequence). (B, C) tensors."""
    from tether.eval.stats import sequence_kl as per_sequence

    k1, k3 = per_sequence(logps.float(), ref_logps.float(), mask)
    return dist.global_mean({"k1": k1, "k3": k3}[kind].sum().item(), mask.shape[0])


def prompt_text(prompt: Any) -> str:
    """A prompt as text: a string as it is; chat messages: the last user message's content."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str((users or prompt or [{"content": ""}])[-1].get("content", ""))
    return str(prompt)


def item_prompts(items: list, tokenizer) -> list[str]:
    """The distinct prompts of preference items (pairs or unpaired examples), in order, as the
    text the model saw (chat template included): each item's tokens before its completion,
    decoded. Items without a prompt are left out."""
    seen: dict[str, None] = {}
    for item in items:
        example = item.sequences[0]
        n = example.loss_mask.index(True) if True in example.loss_mask else 0
        if n:
            seen.setdefault(tokenizer.decode(example.input_ids[:n]), None)
    return list(seen)


def sample_rows(prompts: list, texts: list[str], **scores: list[float] | None) -> list[dict]:
    """samples.jsonl rows of this rank's held-out share (prompts[rank::world], as the recipes
    split them), gathered in prompt order: the first SAMPLES_KEPT prompts. `scores`: name ->
    one float per completion (None: left out)."""
    rank, world = dist.rank(), dist.world_size()
    mine = [(rank + j * world, {"prompt": prompt_text(p), "completion": t,
                                **{k: float(v[j]) for k, v in scores.items() if v is not None}})
            for j, (p, t) in enumerate(zip(prompts, texts)) if rank + j * world < SAMPLES_KEPT]
    return [row for _, row in sorted(all_gather(mine), key=lambda x: x[0])]


# ------------------------------------------------------------------------------ for the recipes


class Diagnostics:
    """One run's online diagnostics: the gold reward (`rewards.gold`), the watcher (rebuilt from
    metrics.jsonl on resume) and RUN_DIR/samples.jsonl (a resumed run keeps the lines of steps
    before its resume step). Build it after the run directory exists."""

    def __init__(self, rewards: RewardsConfig, diagnostics: DiagnosticsConfig, run_dir, *,
                 start_step: int, proxy: str = "reward/mean"):
        from tether.rewards import load_reward

        if rewards.gold_every < 0:
            raise ConfigError(f"rewards.gold_every must be >= 0 (0: at the held-out evaluations "
                              f"only), got {rewards.gold_every}")
        self.gold = load_reward(rewards.gold) if rewards.gold else None
        self.gold_every = rewards.gold_every
        self.watcher = Watcher(diagnostics, proxy=proxy)
        run_dir = Path(run_dir)
        if start_step > 0:
            self.watcher.replay(read_metrics(run_dir / "metrics.jsonl", start_step))
        self.samples_path = run_dir / "samples.jsonl"
        if dist.is_main() and self.samples_path.exists():
            kept = [t for t in self.samples_path.read_text().splitlines()
                    if start_step and _step_of(t) < start_step]
            self.samples_path.write_text("".join(t + "\n" for t in kept))

    def gold_due(self, step: int) -> bool:
        """Whether the completions of (1-based) `step` get a gold score."""
        return self.gold is not None and self.gold_every > 0 and step % self.gold_every == 0

    def gold_scores(self, prompts: list, texts: list[str],
                    columns: dict[str, list] | None = None) -> list[float] | None:
        """One gold score per completion (None without `rewards.gold`)."""
        from tether.rewards import call_reward

        if self.gold is None:
            return None
        return call_reward("gold", self.gold, prompts, texts, **(columns or {}))

    def rollout_metrics(self, step: int, prompts: list, texts: list[str],
                        columns: dict[str, list] | None = None,
                        by_group: Callable | None = None) -> dict[str, float]:
        """`completions/distinct_2` of the step's completions (all ranks) and, on gold steps,
        `gold/mean`: the mean gold score of the same completions (prompts: one per text), and
        `by_group(golds)`'s metrics (GRPO's user groups: group/<name>/gold)."""
        out = {"completions/distinct_2": distinct_n(all_gather(texts), 2)}
        if self.gold_due(step):
            golds = self.gold_scores(prompts, texts, columns)
            out["gold/mean"] = dist.global_mean(sum(golds), len(texts))
            out.update(by_group(golds) if by_group is not None else {})
        return out

    def log(self, logger, step: int, metrics: dict, samples: list[dict] | None = None) -> None:
        """Watch the line, print each new warning once and add `warnings` / `warning_messages`
        to it, write it to metrics.jsonl; `samples` (held-out completions) go to samples.jsonl."""
        new = self.watcher.observe(step, metrics)
        for w in new:
            logger.print(f"warning: {w.name}: {w.message}")
        if new:
            metrics["warnings"] = [w.name for w in new]
            metrics["warning_messages"] = [w.message for w in new]
        logger.log(step, metrics)
        if samples and dist.is_main():
            with open(self.samples_path, "a") as f:
                f.writelines(json.dumps({"step": step, **row}) + "\n" for row in samples)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # a torn line: dropped


@torch.no_grad()
def heldout_greedy(backend, reward_fn, prompts: list, *, max_new_tokens: int,
                   gold: Callable | None = None) -> tuple[dict[str, float], list[dict]]:
    """Greedy completions of held-out `PromptExample`s, each rank an equal share: eval/reward
    (the weighted total), eval/reward/<name> per component, eval/accuracy when the prompts carry
    an exact `answer`, eval/gold with a gold function, and when they carry a `group` the same
    over each group's prompts (eval/group/<name>/reward, /accuracy, /gold); and the
    samples.jsonl rows of the first SAMPLES_KEPT prompts (prompt, completion, reward, gold).
    ({}, []) without prompts."""
    from tether.engine.generate import SamplingParams
    from tether.engine.score import sequence_rewards
    from tether.rewards import call_reward

    prompts = prompts[:len(prompts) - len(prompts) % dist.world_size()]  # equal shares
    if not prompts:
        return {}, []
    share = prompts[dist.rank()::dist.world_size()]
    texts = backend.generate([p.ids for p in share], SamplingParams(
        max_new_tokens=max_new_tokens, temperature=0.0)).texts
    columns = {k: [p.columns.get(k) for p in share] for k in share[0].columns}
    asked = [p.prompt for p in share]
    total, components = sequence_rewards(reward_fn, asked, texts, columns)
    sums = {"eval/reward": total.sum().item(),
            **{f"eval/reward/{k}": sum(v) for k, v in components.items()}}
    hits = None
    if "answer" in columns:
        from tether.data.tasks import arithmetic

        hits = [float(arithmetic.verify(t, int(a))) for t, a in zip(texts, columns["answer"])]
        sums["eval/accuracy"] = sum(hits)
    golds = None if gold is None else call_reward("gold", gold, asked, texts, **columns)
    if golds is not None:
        sums["eval/gold"] = sum(golds)
    metrics = {k: dist.all_reduce_sum(v).item() / len(prompts) for k, v in sums.items()}
    groups = [p.columns.get("group") for p in prompts]  # every rank's prompts: the same names
    per_row = {"reward": total.tolist(), "accuracy": hits, "gold": golds}
    for name in sorted({g for g in groups if g is not None}, key=str):
        mine = [p.columns.get("group") == name for p in share]
        metrics.update({f"eval/group/{name}/{k}": dist.all_reduce_sum(
            sum(v for v, m in zip(values, mine) if m)).item() / groups.count(name)
            for k, values in per_row.items() if values is not None})
    return metrics, sample_rows(asked, texts, reward=total.tolist(), gold=golds)


def rollout_kl(rollout, batches: list) -> dict[str, float]:
    """kl/k1 and kl/k3 of a GRPO rollout against the reference log-probs filled into `batches`
    (`micro_batches` of all its rows, in order): the sampler's own log-probs (`rollout.logps`,
    the tempered distribution the reference is scored at) against `b.ref_logps`, per sequence."""
    ref = torch.zeros_like(rollout.logps)
    row = 0
    for b in batches:
        ref[row:row + len(b.ref_logps), :b.ref_logps.shape[1]] = b.ref_logps.to(ref.device)
        row += len(b.ref_logps)
    mask = rollout.completion_mask
    return {f"kl/{k}": sequence_kl(rollout.logps, ref, mask, k) for k in ("k1", "k3")}
