"""`tether compare`: DPO (a beta sweep), PPO-RLHF, GRPO and best-of-n on the sentiment task, from
one starting policy, each evaluated the same way (`tether eval`; docs/diagnostics.md).

Stages:
  prompts   the sentiment task's training prompts (those of the shipped pairs) and held-out ones
  reward    `tether rm` on its built pairs (or `reward_model`): PPO's and GRPO's reward and every
            method's proxy score
  train     one run per method with that recipe's own defaults (plus `<method>_args`), each in a
            process of its own, so that its wall time and peak RSS are its own
  evaluate  each result against the starting policy on the held-out prompts: gold (VADER),
            proxy, KL (k1, k3), entropy, distinct-2
  bon       best-of-n from the starting policy against the proxy: no training; KL = log n - (n-1)/n
  report    compare.json, a table and the gold-vs-KL frontier (compare.png; Rafailov et al. 2023,
            Fig. 2)
A method whose row is on disk (`<method dir>/compare_row.json`) is not run again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from tether.config import CompareConfig, EvalConfig, GenerationConfig, save_config
from tether.engine.batchlog import write_atomic
from tether.engine.run import rerun
from tether.errors import ConfigError, TetherError

METHODS = ("dpo", "ppo", "grpo", "bon")
ROW = "compare_row.json"


@dataclass
class Method:
    name: str  # row label: dpo-beta0.1, ppo, grpo, bon-16
    recipe: str  # dpo | ppo | grpo | bon
    run_dir: Path
    args: list[str]  # the recipe's overrides


# --- train: a recipe in a process of its own ---------------------------------------------------


def run_tether(args: list[str]) -> tuple[float, float]:
    """`python -m tether ARGS` in a child process: (wall seconds, the child's peak RSS in MiB).
    A failing child is a TetherError naming the command."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "tether", *args])
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise TetherError(f"compare: `tether {' '.join(args)}` failed (exit {child.returncode})")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss: KiB on Linux


def rerun_flags(run_dir: Path) -> list[str]:
    """--run.resume / --run.overwrite for a run started again (`tether.engine.run.rerun`)."""
    return [f"--run.{key}={str(value).lower()}" for key, value in rerun(run_dir).items()]


def generation_flags(gen: GenerationConfig) -> list[str]:
    """`--generation.key=value` for each setting of `gen` that is not the default."""
    default = GenerationConfig()
    out = []
    for f in fields(gen):
        value = getattr(gen, f.name)
        if value != getattr(default, f.name):
            shown = "null" if value is None else str(value).lower() if isinstance(value, bool) \
                else str(value)
            out.append(f"--generation.{f.name}={shown}")
    return out


def plan(cfg: CompareConfig, root: Path, reward_model: str, prompts: tuple[Path, Path]
         ) -> list[Method]:
    """The training runs, in order; every one starts from cfg.model."""
    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    start = [f"--model.name_or_path={cfg.model}", f"--train.seed={cfg.seed}",
             *generation_flags(cfg.generation)]  # every method samples with compare's sampler
    data = [f"--data.path={prompts[0]}", f"--data.eval_path={prompts[1]}"]
    out = []
    if "dpo" in cfg.methods:
        for beta in cfg.dpo_betas:
            d = root / f"dpo-beta{beta:g}"
            out.append(Method(f"dpo-beta{beta:g}", "dpo", d, [
                *start, f"--dpo.beta={beta}", "--rewards.gold=sentiment", *cfg.dpo_args]))
    if "ppo" in cfg.methods:
        out.append(Method("ppo", "ppo", root / "ppo", [
            *start, *data, f"--ppo.reward_model={reward_model}", "--rewards.gold=sentiment",
            *cfg.ppo_args]))
    if "grpo" in cfg.methods:
        out.append(Method("grpo", "grpo", root / "grpo", [
            *start, *data, f"--grpo.rewards={reward_model}", "--rewards.gold=sentiment",
            *cfg.grpo_args]))
    for m in out:
        m.args = [m.recipe, f"--run.output_dir={m.run_dir}", *rerun_flags(m.run_dir),
                  f"--run.progress={str(cfg.progress).lower()}", *m.args]
    return out


# --- evaluate: one trained policy, or best-of-n ------------------------------------------------


def eval_config(cfg: CompareConfig, model: str, reward_model: str, output: Path) -> EvalConfig:
    return EvalConfig(model=model, reference=cfg.model, task="sentiment",
                      reward_model=reward_model, num_prompts=cfg.num_prompts,
                      samples_per_prompt=cfg.samples_per_prompt,
                      max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, tax=False,
                      output=str(output), progress=cfg.progress, generation=cfg.generation)


ROW_KEYS = ("gold/mean", "gold/stderr", "proxy/mean", "kl/k1", "kl/k3", "policy/entropy",
            "completions/distinct_2")  # a row's eval metrics, named as in eval.json


def row_from_eval(name: str, report: dict, seconds: float, peak_mb: float | None) -> dict:
    m = report["results"]["policy"]["metrics"]
    return {"method": name, **{k: m.get(k) for k in ROW_KEYS}, "timing/total": round(seconds, 1),
            "memory/peak_mb": None if peak_mb is None else round(peak_mb)}


def best_of_n_rows(cfg: CompareConfig, reward_model: str) -> list[dict]:
    """Best-of-n rows: max(bon_n) samples per held-out prompt from the starting policy, scored
    by gold and proxy (`tether.eval.evaluate.bon_samples`); for each n the unbiased best-of-n
    gold and proxy over all samples and KL = log n - (n-1)/n (an upper bound; Gao et al. 2022)
    for both kl/k1 and kl/k3 (`tether.eval.goodhart.bon_points`), and distinct-2 of the
    proxy-best of each prompt's first n. Wall time: sampling and scoring all max(bon_n) samples;
    peak RSS is not separable in this process (None)."""
    from tether.engine.logprobs import CausalLMLogps
    from tether.engine.models import load_causal_lm, load_tokenizer
    from tether.engine.optimize import resolve_precision
    from tether.eval.evaluate import bon_samples, model_config
    from tether.eval.goodhart import bon_points
    from tether.eval.online import distinct_n
    from tether.eval.tasks import build_task
    from tether.rewards import RewardModelScorer

    t0 = time.perf_counter()
    ecfg = replace(eval_config(cfg, cfg.model, reward_model, Path(cfg.output_dir) / "bon"),
                   samples_per_prompt=max(cfg.bon_n))  # sampling settings only: nothing written
    task = build_task("sentiment", n=cfg.num_prompts, gold=None)
    mc = model_config(cfg.model)
    policy = CausalLMLogps(load_causal_lm(mc)).eval()
    bon = bon_samples(policy, load_tokenizer(mc), task, RewardModelScorer(reward_model), ecfg,
                      precision=resolve_precision("auto", torch.device("cpu")),
                      advance=lambda: None)
    seconds = time.perf_counter() - t0
    rows = []
    for point in bon_points(bon["proxy"], bon["gold"], cfg.bon_n):
        n = point["n"]
        picked = [texts[max(range(n), key=proxy.__getitem__)]  # the proxy-best of the first n
                  for texts, proxy in zip(bon["texts"], bon["proxy"])]
        rows.append({"method": f"bon-{n}", "gold/mean": point["gold/mean"], "gold/stderr": None,
                     "proxy/mean": point["proxy/mean"], "kl/k1": point["kl"],
                     "kl/k3": point["kl"], "policy/entropy": None,
                     "completions/distinct_2": distinct_n(picked, 2),
                     "timing/total": round(seconds, 1), "memory/peak_mb": None})
    return rows


# --- report ------------------------------------------------------------------------------------


def plot_frontier(rows: list[dict], start: dict, path: Path) -> None:
    """Gold reward against KL to the starting policy, one point per method (the start at 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.errorbar([0.0], [start["gold/mean"]], yerr=[start["gold/stderr"] or 0], fmt="k*", ms=10,
                label="starting policy")
    for kind, marker in (("dpo", "o"), ("ppo", "s"), ("grpo", "^"), ("bon", "D")):
        mine = [r for r in rows if r["method"].startswith(kind)]
        if mine:
            ax.errorbar([r["kl/k3"] for r in mine], [r["gold/mean"] for r in mine],
                        yerr=[r["gold/stderr"] or 0 for r in mine], fmt=marker, label=kind)
            for r in mine:
                ax.annotate(r["method"], (r["kl/k3"], r["gold/mean"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=0.1)  # KLs span 0.1 to tens of nats
    ax.set_xlabel("KL(policy || starting policy), nats per completion (k3; best-of-n: bound)")
    ax.set_ylabel("gold reward (mean VADER, held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    from rich.table import Table

    from tether.eval.evaluate import wide_console

    table = Table(title="tether compare: sentiment, held-out prompts")
    cols = ("method", *ROW_KEYS, "timing/total", "memory/peak_mb")
    for c in cols:
        table.add_column(c, justify="left" if c == "method" else "right", no_wrap=True)
    show = lambda v: "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    for r in rows:
        table.add_row(*(show(r.get(c)) for c in cols))
    wide_console().print(table)


# --- the pipeline ------------------------------------------------------------------------------


def cached_row(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def save_row(path: Path, row: dict | list) -> None:
    write_atomic(path, json.dumps(row, indent=1))


def run(cfg: CompareConfig) -> dict:
    from tether.eval.evaluate import evaluate
    from tether.eval.report import write_report
    from tether.recipes.stages import builtin_ppo_prompts

    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    say = lambda msg: print(f"compare: {msg}", flush=True)  # noqa: E731
    prompts = builtin_ppo_prompts(root)  # (training prompts, held-out prompts) of the pairs

    # --- reward: the proxy of every method ------------------------------------------------------
    reward_model = cfg.reward_model
    if reward_model is None:
        reward_model = str(root / "rm" / "reward_model")
        if not (Path(reward_model) / "config.json").is_file():
            say("training the reward model (tether rm on the built preference set, docs/rm.md)")
            run_tether(["rm", f"--model.name_or_path={cfg.model}", f"--run.output_dir={root / 'rm'}",
                        *rerun_flags(root / "rm"),
                        f"--run.progress={str(cfg.progress).lower()}", *cfg.rm_args])

    # --- the starting policy, evaluated once: every KL is measured from it ------------------------
    start_path = root / "start.json"
    start = cached_row(start_path)
    if start is None:
        report = evaluate(eval_config(cfg, cfg.model, reward_model, root / "start_eval.json"))
        start = row_from_eval("start", report, 0.0, None)
        save_row(start_path, start)

    # --- train + evaluate, one method at a time ---------------------------------------------------
    rows = []
    for m in plan(cfg, root, reward_model, prompts):
        row = cached_row(m.run_dir / ROW)
        if row is None:
            say(f"{m.name}: tether {' '.join(m.args)}")
            seconds, peak_mb = run_tether(m.args)
            report = evaluate(eval_config(cfg, str(m.run_dir), reward_model,
                                          m.run_dir / "eval.json"))
            write_report(m.run_dir)  # the run's report.html, now with the evaluation
            row = row_from_eval(m.name, report, seconds, peak_mb)
            save_row(m.run_dir / ROW, row)
        rows.append(row)
        say(f"{m.name}: gold {row['gold/mean']:.3f}, KL (k3) {row['kl/k3']:.2f}")
    if "bon" in cfg.methods:
        bon_path = root / "bon" / ROW
        bon = cached_row(bon_path)
        if bon is None:
            say(f"best-of-n for n in {cfg.bon_n}")
            bon_path.parent.mkdir(parents=True, exist_ok=True)
            bon = best_of_n_rows(cfg, reward_model)
            save_row(bon_path, bon)
        rows += bon

    # --- report -----------------------------------------------------------------------------------
    plot_frontier(rows, start, root / "compare.png")
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "model": cfg.model,
              "reward_model": reward_model, "start": start, "rows": rows,
              "settings": {"num_prompts": cfg.num_prompts,
                           "samples_per_prompt": cfg.samples_per_prompt,
                           "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}}
    save_row(root / "compare.json", result)
    print_table([start, *rows])
    say(f"{root / 'compare.json'}, {root / 'compare.png'}")
    return result
