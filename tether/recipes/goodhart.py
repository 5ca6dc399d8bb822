"""`tether goodhart`: reward-model over-optimisation in miniature (Gao, Schulman & Hilton 2022).

    proxy  `tether rm` on the first `proxy_pairs` built-in sentiment pairs (chosen by the gold
           reward, VADER), or the given `reward_model`              -> <out>/proxy/reward_model
    bon    the initial policy samples n_max completions of each held-out prompt, gold and proxy
           score them, and best-of-n for every n = 1..n_max is estimated from all of them at once
           (unbiased, every n-subset), at KL_bon = log n - (n - 1) / n  -> <out>/bon.json
    rl     `tether grpo` against the proxy alone (LoRA) on the sentiment task's training prompts,
           a checkpoint every grpo.run.save_every steps              -> <out>/rl/checkpoints
    eval   each checkpoint answers the held-out prompts rl_samples times: gold, proxy, and the KL
           to the initial policy (k3, summed per completion)         -> <out>/rl/eval-step-N.json
    fit    R_bon(d) = d (a - b d) and R_RL(d) = d (a - b log d) with d = sqrt(KL) and R the reward
           minus the initial policy's mean; the d at which gold peaks -> <out>/goodhart.json, .png

Each stage's output is kept and a re-run skips it: the proxy and GRPO stages by their stage.json
marker (as `tether rlhf`; an interrupted GRPO resumes from its checkpoint), best-of-n and each
checkpoint evaluation by their JSON file when it was made with the same settings.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from tether.config import EvalConfig, GoodhartConfig, ModelConfig, save_config
from tether.engine import checkpoint
from tether.engine.batchlog import write_atomic
from tether.engine.logprobs import CausalLMLogps
from tether.engine.models import load_causal_lm, load_tokenizer
from tether.engine.optimize import resolve_precision
from tether.errors import ConfigError
from tether.eval import goodhart as gh
from tether.eval.evaluate import bon_samples, heldout_metrics, progress_bar
from tether.eval.tasks import build_task
from tether.recipes import stages
from tether.rewards import RewardModelScorer

PROXY_HELDOUT = 40  # the last pairs of the built-in set: the proxy's held-out accuracy


def say(message: str) -> None:
    print(f"goodhart: {message}", flush=True)


def cached(path: Path, key: dict) -> dict | None:
    """The stage's saved result when it was made with the same settings (`key`)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("key") == key else None


# --- proxy: a reward model trained on few gold-labelled pairs --------------------------------


def train_proxy(cfg: GoodhartConfig, root: Path) -> dict:
    """`tether rm` on the first proxy_pairs pairs, the last PROXY_HELDOUT held out."""
    from tether.data.tasks.sentiment import preference_rows
    from tether.recipes import rm

    stage_dir = Path(cfg.rm.run.output_dir or root / "proxy")
    done = stages.finished(stage_dir)
    if done is not None and done["pairs"] != cfg.proxy_pairs:
        raise ConfigError(f"{stage_dir} holds a proxy trained on {done['pairs']} pairs, not "
                          f"proxy_pairs={cfg.proxy_pairs}: give another output_dir")
    if done is not None:
        say(f"proxy: trained earlier ({done['output']}), skipped")
        return done
    rows = preference_rows()
    if not cfg.rm.train.batch_size <= cfg.proxy_pairs <= len(rows) - PROXY_HELDOUT:
        raise ConfigError(f"proxy_pairs must be between rm.train.batch_size "
                          f"({cfg.rm.train.batch_size}) and {len(rows) - PROXY_HELDOUT}, got "
                          f"{cfg.proxy_pairs}")
    stage_dir.mkdir(parents=True, exist_ok=True)
    train, held = stage_dir / "proxy_pairs.jsonl", stage_dir / "proxy_pairs_heldout.jsonl"
    for path, part in ((train, rows[:cfg.proxy_pairs]), (held, rows[-PROXY_HELDOUT:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    rm_cfg = replace(cfg.rm, data=replace(cfg.rm.data, path=str(train), eval_path=str(held)),
                     model=replace(cfg.rm.model, name_or_path=cfg.rm.model.name_or_path
                                   or cfg.model),
                     run=replace(cfg.rm.run, progress=cfg.rm.run.progress and cfg.progress))
    say(f"proxy: training a reward model on {cfg.proxy_pairs} gold-labelled pairs in {stage_dir}")
    t0 = time.perf_counter()
    out = rm.run(stages.resumable(rm_cfg, stage_dir))
    record = {"output": str(out["reward_model"]), "pairs": cfg.proxy_pairs,
              "heldout_pairs": PROXY_HELDOUT,
              "heldout_accuracy": [out["eval_before"]["eval/accuracy"],
                                   out["eval_after"]["eval/accuracy"]],
              "seconds": round(time.perf_counter() - t0, 1)}
    stages.mark_finished(stage_dir, record)
    del out
    gc.collect()
    return record


# --- sampling and scoring on the held-out prompts --------------------------------------------


def eval_config(cfg: GoodhartConfig, per_prompt: int, precision: str) -> EvalConfig:
    return EvalConfig(model=cfg.model, samples_per_prompt=per_prompt,
                      max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, precision=precision,
                      batch_size=max(1, cfg.batch_rows // per_prompt), progress=cfg.progress,
                      generation=cfg.generation)


def best_of_n_stage(cfg, root, policy, tokenizer, task, proxy, proxy_path, precision) -> dict:
    """n_max samples per held-out prompt from the initial policy, scored by gold and proxy. Saved
    samples of the same settings are reused; with another proxy they are only scored again."""
    key = {"model": cfg.model, "num_prompts": cfg.num_prompts, "n_max": cfg.n_max,
           "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "precision": precision}
    path = root / "bon.json"
    saved = cached(path, key)
    if saved is not None and saved["scored_by"] == [task.gold_name, proxy_path]:
        say(f"best-of-n: {path} holds the samples and their scores, skipped")
        return saved
    t0 = time.perf_counter()
    ecfg = eval_config(cfg, cfg.n_max, precision)
    if saved is not None:
        say(f"best-of-n: scoring the samples of {path} with the proxy {proxy_path}")
        scored = bon_samples(policy, tokenizer, task, proxy, ecfg, precision=precision,
                             advance=lambda: None,
                             texts=[t for row in saved["texts"] for t in row])
    else:
        with progress_bar(cfg.progress) as progress:
            bar = progress.add_task(f"best-of-n: {cfg.n_max} samples x {len(task.rows)} prompts",
                                    total=-(-len(task.rows) // ecfg.batch_size))
            scored = bon_samples(policy, tokenizer, task, proxy, ecfg, precision=precision,
                                 advance=lambda: progress.advance(bar))
    out = {"key": key, "scored_by": [task.gold_name, proxy_path], **scored,
           "seconds": round(time.perf_counter() - t0, 1)}
    write_atomic(path, json.dumps(out, indent=1, ensure_ascii=False))
    return out


# --- rl: GRPO against the proxy, then each checkpoint evaluated ------------------------------


def rl_stage(cfg: GoodhartConfig, root: Path, proxy_path: str) -> dict:
    from tether.recipes import grpo

    g = cfg.grpo
    stage_dir = Path(g.run.output_dir or root / "rl")
    done = stages.finished(stage_dir)
    if done is not None and done["proxy"] != proxy_path:
        raise ConfigError(f"{stage_dir} holds a GRPO run against the proxy {done['proxy']}, not "
                          f"{proxy_path}: give another output_dir")
    if done is not None:
        say(f"rl: GRPO finished earlier ({stage_dir}), skipped")
        return done
    train, held = stages.builtin_ppo_prompts(root)  # the sentiment task's train / held-out prompts
    stage_cfg = replace(
        g, model=replace(g.model, name_or_path=g.model.name_or_path or cfg.model),
        data=replace(g.data, path=g.data.path or str(train),
                     eval_path=g.data.eval_path or str(held)),
        grpo=replace(g.grpo, rewards=g.grpo.rewards or [proxy_path]),
        rewards=replace(g.rewards, gold=g.rewards.gold or cfg.gold),
        run=replace(g.run, progress=g.run.progress and cfg.progress))
    stage_cfg = stages.resumable(stage_cfg, stage_dir)
    say(f"rl: GRPO against the proxy, {g.train.max_steps} steps, a checkpoint every "
        f"{g.run.save_every}, in {stage_dir}")
    t0 = time.perf_counter()
    out = grpo.run(stage_cfg)
    record = {"output": str(stage_dir), "proxy": proxy_path, "steps": len(out["history"]),
              "seconds": round(time.perf_counter() - t0, 1)}
    stages.mark_finished(stage_dir, record)
    del out
    gc.collect()
    return record


def eval_checkpoint(cfg, ckpt: Path, sections: dict, reference, tokenizer, task, proxy, key,
                    precision, progress) -> dict:
    """Gold, proxy and KL (k1, k3) to the initial policy of one checkpoint's samples."""
    lm, _ = checkpoint.run_policy(sections, ckpt)
    lm = lm.merge_and_unload() if hasattr(lm, "merge_and_unload") else lm
    policy = CausalLMLogps(lm).eval()
    ecfg = eval_config(cfg, cfg.rl_samples, precision)
    bar = progress.add_task(f"rl: {ckpt.name}", total=-(-len(task.rows) // ecfg.batch_size))
    held = heldout_metrics(policy, tokenizer, task.rows, ecfg, gold=task.gold,
                           gold_name=task.gold_name, proxy=proxy,
                           reference=lambda fn: fn(reference), micro_batch_size=16,
                           precision=precision, advance=lambda: progress.advance(bar))
    step = json.loads((ckpt / checkpoint.STATE).read_text())["step"]
    return {"key": key, "step": step, "metrics": held.metrics, "texts": held.samples.texts[:8]}


def rl_points(cfg, rl_dir: Path, reference, tokenizer, task, proxy, proxy_path,
              precision) -> list[dict]:
    sections = yaml.safe_load((rl_dir / "config.yaml").read_text())
    ckpts = sorted(p for p in (rl_dir / "checkpoints").glob("step-*")
                   if (p / checkpoint.STATE).is_file())
    points = []
    with progress_bar(cfg.progress) as progress:
        for ckpt in ckpts:
            key = {"checkpoint": ckpt.name, "proxy": proxy_path, "gold": task.gold_name,
                   "num_prompts": cfg.num_prompts, "rl_samples": cfg.rl_samples,
                   "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
                   "precision": precision, "model": cfg.model}
            path = rl_dir / f"eval-{ckpt.name}.json"
            result = cached(path, key)
            if result is None:
                result = eval_checkpoint(cfg, ckpt, sections, reference, tokenizer, task, proxy,
                                         key, precision, progress)
                write_atomic(path, json.dumps(result, indent=1, ensure_ascii=False))
            m = result["metrics"]
            points.append({"step": result["step"], "kl": m["kl/k3"], "d": math.sqrt(max(
                0.0, m["kl/k3"])), **{k: m.get(k) for k in POINT_KEYS}})
    return points


POINT_KEYS = ("gold/mean", "gold/stderr", "proxy/mean", "proxy/stderr", "kl/k1", "kl/k3",
              "policy/entropy", "completions/distinct_2")  # an RL point's eval metrics


# --- fit, verdict, plot, table ----------------------------------------------------------------

FORMS = {"bon": (gh.fit_bon, gh.peak_bon, gh.r_bon), "rl": (gh.fit_rl, gh.peak_rl, gh.r_rl)}


def fit_curves(points: dict[str, list[dict]], baseline: dict) -> dict:
    """Each method x reward: the fitted (a, b) of R = reward - baseline, and where it peaks."""
    fits = {}
    for method, pts in points.items():
        fit_fn, peak_fn, _ = FORMS[method]
        d_max = max((p["d"] for p in pts), default=0.0)
        for reward in ("gold", "proxy"):
            key = f"{reward}/mean"
            try:
                f = fit_fn([p["d"] for p in pts], [p[key] - baseline[key] for p in pts])
            except (ValueError, RuntimeError) as err:
                fits.setdefault(method, {})[reward] = {"error": str(err)}
                continue
            peak = peak_fn(f.a, f.b)
            fits.setdefault(method, {})[reward] = {  # stderr null: as many points as unknowns
                **{k: None if v != v else v for k, v in asdict(f).items()},
                "peak_d": peak, "d_max": d_max,
                "peak_in_range": peak is not None and peak < d_max}
    return fits


def show_d(d: float) -> str:
    return f"{d:.2f}" if d < 1e3 else f"{d:.2e}"  # a peak far out: exp(a / b - 1) can be huge


def verdict(method: str, pts: list[dict], fit: dict) -> str:
    """Whether gold turned down inside the measured range, by the fit and by the points."""
    if "error" in fit:
        return f"{method}: no fit ({fit['error']})"
    best = max(pts, key=lambda p: p["gold/mean"])
    seen = (f"highest measured gold at d = {best['d']:.2f}"
            + (" (the largest d)" if best is pts[-1] else
               f", {pts[-1]['gold/mean'] - best['gold/mean']:+.3f} at d = {pts[-1]['d']:.2f}"))
    if fit["peak_in_range"]:
        return (f"{method}: gold peaks at d = {fit['peak_d']:.2f}, inside the measured range "
                f"(d <= {fit['d_max']:.2f}): gold diverges from proxy; {seen}")
    where = "no peak" if fit["peak_d"] is None else f"fitted peak at d = {show_d(fit['peak_d'])}"
    return (f"{method}: gold still rising at d = {fit['d_max']:.2f} ({where}, beyond the "
            f"measured range): no divergence measured; {seen}")


def plot(points: dict[str, list[dict]], baseline: dict, fits: dict, path: Path) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    titles = {"bon": "best-of-n (n = 1..n_max)", "rl": "GRPO against the proxy (checkpoints)"}
    for ax, (method, pts) in zip(fig.subplots(1, 2), points.items()):
        right = ax.twinx()
        d_max = max([p["d"] for p in pts] + [1e-3])
        grid = np.linspace(0, d_max * 1.15, 200)
        for axis, reward, colour, marker in ((ax, "gold", "tab:blue", "o"),
                                             (right, "proxy", "tab:orange", "s")):
            key = f"{reward}/mean"
            axis.plot([0] + [p["d"] for p in pts], [0] + [p[key] - baseline[key] for p in pts],
                      marker, color=colour, ms=4, label=f"{reward} (measured)")
            fit = fits.get(method, {}).get(reward, {})
            if "a" in fit:
                axis.plot(grid, FORMS[method][2](grid, fit["a"], fit["b"]), "-", color=colour,
                          lw=1.2, label=f"{reward} fit a={fit['a']:.3f} b={fit['b']:.3f}")
            axis.set_ylabel(f"{reward} - initial mean", color=colour)
        gold = fits.get(method, {}).get("gold", {})
        if gold.get("peak_d") is not None and gold["peak_d"] <= grid[-1]:
            ax.axvline(gold["peak_d"], color="tab:blue", ls=":", lw=1, label="gold peak (fit)")
        ax.set_xlabel("d = sqrt(KL to the initial policy)  [nats^0.5]")
        ax.set_title(titles[method])
        lines = ax.get_legend_handles_labels(), right.get_legend_handles_labels()
        ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=7,
                  loc="upper left")
    fig.savefig(path, dpi=110, metadata={"Software": None})


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tether goodhart: R_bon(d) = d (a - b d), R_RL(d) = d (a - b log d), "
                        "d = sqrt(KL)")
    for col in ("method", "reward", "a", "b", "points", "d measured", "peak d (fit)"):
        table.add_column(col, justify="left" if col in ("method", "reward") else "right")
    for method, by_reward in result["fits"].items():
        for reward, f in by_reward.items():
            if "error" in f:
                table.add_row(method, reward, "-", "-", "-", "-", f["error"][:40])
                continue
            peak = "none (rising)" if f["peak_d"] is None else show_d(f["peak_d"])
            err = lambda k: "" if f[k] is None else f" ± {f[k]:.4f}"  # noqa: E731
            table.add_row(method, reward, f"{f['a']:.4f}{err('a_stderr')}",
                          f"{f['b']:.4f}{err('b_stderr')}", str(f["points"]),
                          f"<= {f['d_max']:.3f}", peak + (" (in range)" if f["peak_in_range"]
                                                          else ""))
    Console().print(table)
    for line in result["verdict"].values():
        print(f"goodhart: {line}")
    print(f"goodhart: {result['path']} and {result['plot']} ({result['seconds']:.0f} s)")


# --- the pipeline -----------------------------------------------------------------------------


def run(cfg: GoodhartConfig) -> dict:
    t0 = time.perf_counter()
    if cfg.n_max < 2 or cfg.rl_samples < 1 or cfg.num_prompts < 1:
        raise ConfigError("n_max must be >= 2, rl_samples and num_prompts >= 1")
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    precision = resolve_precision(cfg.precision, torch.device("cpu"))
    task = build_task("sentiment", n=cfg.num_prompts, gold=cfg.gold)
    seconds = {}

    # --- proxy ------------------------------------------------------------------------------
    proxy_record = ({"output": cfg.reward_model, "pairs": None} if cfg.reward_model
                    else train_proxy(cfg, root))
    proxy_path = proxy_record["output"]
    seconds["proxy"] = proxy_record.get("seconds", 0.0)
    proxy = RewardModelScorer(proxy_path)

    # --- best-of-n from the initial policy (which is also the reference of every KL) ---------
    model_cfg = ModelConfig(name_or_path=cfg.model)
    initial = CausalLMLogps(load_causal_lm(model_cfg)).eval()
    tokenizer = load_tokenizer(model_cfg)
    bon = best_of_n_stage(cfg, root, initial, tokenizer, task, proxy, proxy_path, precision)
    seconds["bon"] = bon["seconds"]
    points = {"bon": gh.bon_points(bon["proxy"], bon["gold"], range(1, cfg.n_max + 1))}
    baseline = {k: points["bon"][0][k] for k in ("gold/mean", "proxy/mean")}

    # --- rl: GRPO against the proxy, each checkpoint scored by both rewards -----------------
    rl_record = rl_stage(cfg, root, proxy_path)
    seconds["rl"] = rl_record.get("seconds", 0.0)
    t1 = time.perf_counter()
    points["rl"] = rl_points(cfg, Path(rl_record["output"]), initial, tokenizer, task, proxy,
                             proxy_path, precision)
    seconds["rl_eval"] = round(time.perf_counter() - t1, 1)

    # --- fit, save, plot --------------------------------------------------------------------
    fits = fit_curves(points, baseline)
    result = {
        "tether_goodhart": 1, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["tether", *sys.argv[1:]]) if sys.argv[0].endswith("tether") else "",
        "settings": {**asdict(cfg), "precision": precision}, "gold": task.gold_name,
        "prompts": task.split, "proxy": proxy_record, "kl_estimator": "k3 (rl), bon_kl (bon)",
        "baseline": baseline, "points": points, "fits": fits,
        "verdict": {m: verdict(m, points[m], fits[m]["gold"]) for m in points if points[m]},
        "stage_seconds": seconds, "seconds": round(time.perf_counter() - t0, 1),
        "path": str(root / "goodhart.json"), "plot": str(root / "goodhart.png"),
    }
    plot(points, baseline, fits, root / "goodhart.png")
    write_atomic(root / "goodhart.json", json.dumps(result, indent=1, ensure_ascii=False))
    print_table(result)
    return result
