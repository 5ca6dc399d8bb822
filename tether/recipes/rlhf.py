"""`tether rlhf`: the three stages of RLHF in one command, each feeding the next.

    sft  the base model on demonstrations             -> <out>/sft/model          (plain HF dir)
    rm   a reward model on the SFT model's backbone   -> <out>/rm/reward_model    (seq. classifier)
    ppo  the SFT model as policy (and critic), the
         SFT model as frozen reference, the RM scores -> <out>/ppo/policy

Each stage is the ordinary recipe (`tether sft`, `tether rm`, `tether ppo`) run with its own
config section. A stage that finished writes <stage dir>/stage.json and is skipped when the
pipeline is run again; a stage that was interrupted resumes from its latest checkpoint. With no
arguments every stage uses built-in data: arithmetic demonstrations for SFT, the built-in
preference set of `tether rm` (positive tone) for the RM, and that set's prompts for PPO, with
the task's gold reward (VADER sentiment) logged beside the reward model's (docs/rlhf.md).
"""

from __future__ import annotations

import gc
import time
from dataclasses import replace
from pathlib import Path

from tether.config import RLHFConfig, save_config
from tether.engine import checkpoint, dist
from tether.recipes.preference_set import build as build_prefs
from tether.recipes.stages import (builtin_ppo_prompts, finished, mark_finished, positive_tone,
                                   resumable)

STAGES = ("sft", "rm", "ppo")


def stage_dirs(cfg: RLHFConfig) -> dict[str, Path]:
    root = Path(cfg.pipeline.output_dir)
    return {name: Path(getattr(cfg, name).run.output_dir or root / name) for name in STAGES}


def stage_outputs(dirs: dict[str, Path]) -> dict[str, Path]:
    """What each stage hands on: the SFT model, the reward model, the PPO policy."""
    return {"sft": dirs["sft"] / "model", "rm": dirs["rm"] / "reward_model",
            "ppo": dirs["ppo"] / "policy"}


def stage_configs(cfg: RLHFConfig, dirs: dict[str, Path]) -> dict:
    """Each stage's config, the previous stages' outputs filled in where left empty: the SFT
    model under RM and PPO, the reward model under PPO, and, when both the RM and PPO use the
    built-in data, PPO on the prompts of the RM's built-in set with its gold reward logged."""
    outputs = stage_outputs(dirs)
    rm_cfg = replace(cfg.rm, model=replace(
        cfg.rm.model, name_or_path=cfg.rm.model.name_or_path or str(outputs["sft"])))
    pc, data, rewards = cfg.ppo.ppo, cfg.ppo.data, cfg.ppo.rewards
    pc = replace(pc, reward_model=pc.reward_model or str(outputs["rm"]))
    if cfg.rm.data.path is None:  # the built set (`tether prefs`): built or read from its cache
        pairs, held_pairs = build_prefs(cfg.rm.prefs, precision=cfg.rm.train.precision,
                                        progress=cfg.rm.run.progress, say=print)
        rm_cfg = replace(rm_cfg, data=replace(rm_cfg.data, path=str(pairs),
                                              eval_path=str(held_pairs)))
    if cfg.rm.data.path is None and data.path is None:
        train, held = builtin_ppo_prompts(Path(cfg.pipeline.output_dir), Path(rm_cfg.data.path))
        data = replace(data, path=str(train), eval_path=str(held))
        if pc.rewards is None:  # the gold reward beside the proxy, weight 0: logged only
            pc = replace(pc, rewards=[f"{positive_tone.__module__}:positive_tone"],
                         reward_weights=[0.0])
        # and as `rewards.gold`: gold/mean beside reward/mean, watched for reward hacking
        rewards = replace(rewards, gold=rewards.gold or "sentiment")
    ppo_cfg = replace(cfg.ppo, data=data, ppo=pc, rewards=rewards, model=replace(
        cfg.ppo.model, name_or_path=cfg.ppo.model.name_or_path or str(outputs["sft"])))
    return {"sft": cfg.sft, "rm": rm_cfg, "ppo": ppo_cfg}


def run(cfg: RLHFConfig) -> dict:
    from tether.recipes import ppo, rm, sft

    dist.init()
    dirs = stage_dirs(cfg)
    outputs = stage_outputs(dirs)
    root = Path(cfg.pipeline.output_dir)
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, root / "config.yaml")

    def say(message: str) -> None:
        if dist.is_main():
            print(f"rlhf: {message}", flush=True)

    configs = stage_configs(cfg, dirs)
    runners = {"sft": sft.run, "rm": rm.run, "ppo": ppo.run}

    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    for name in STAGES:
        stage_dir = dirs[name]
        done = finished(stage_dir)
        if done is not None:
            say(f"stage {name}: finished earlier ({done['output']}), skipped")
            results[name] = {"skipped": True, **done}
            continue
        stage_cfg = resumable(configs[name], stage_dir)
        say(f"stage {name}: {'resuming' if stage_cfg.run.resume else 'starting'} in {stage_dir}")
        t0 = time.perf_counter()
        out = runners[name](stage_cfg)
        if name == "sft":  # a plain HF directory that the RM and PPO stages load
            if dist.is_main():
                checkpoint.export_run(stage_dir, outputs["sft"], force=True,
                                      inside_run=True)
            dist.barrier()
        timings[name] = time.perf_counter() - t0
        record = {"stage": name, "output": str(outputs[name]), "seconds": round(timings[name], 1),
                  **summary(name, out)}
        mark_finished(stage_dir, record)
        results[name] = {"skipped": False, **record}
        del out  # free this stage's models before the next stage loads its own
        gc.collect()
        say(f"stage {name}: done in {timings[name]:.0f} s -> {outputs[name]}")
    say("summary: " + "; ".join(f"{n}: {describe(n, results[n])}" for n in STAGES))
    return {"stages": results, "dirs": dirs, "outputs": outputs}


def summary(name: str, out: dict) -> dict:
    """The numbers worth keeping from a finished stage (JSON-able)."""
    if name == "sft":
        return {"eval_loss": [out["eval_before"], out["eval_after"]],
                "accuracy": [out["accuracy_before"], out["accuracy_after"]]}
    if name == "rm":
        return {k.split("/")[1]: [out["eval_before"].get(k), out["eval_after"].get(k)]
                for k in ("eval/accuracy", "eval/spearman")}
    history = out["history"]
    first, last = (history[0], history[-1]) if history else ({}, {})
    return {**{k: [first.get(k), last.get(k)] for k in ("reward/mean", "gold/mean", "kl/k1")},
            "eval": {k: [out["eval_before"].get(k), out["eval_after"].get(k)]
                     for k in out["eval_before"]}}


def describe(name: str, record: dict) -> str:
    def pair(values, fmt="{:.3f}"):
        a, b = values or (None, None)
        show = lambda v: "n/a" if v is None else fmt.format(v)  # noqa: E731
        return f"{show(a)} -> {show(b)}"

    if name == "sft":
        return (f"held-out loss {pair(record.get('eval_loss'))}, accuracy "
                f"{pair(record.get('accuracy'), '{:.1%}')}")
    if name == "rm":
        return (f"held-out pair accuracy {pair(record.get('accuracy'), '{:.1%}')}, Spearman "
                f"with gold {pair(record.get('spearman'))}")
    held = ", ".join(f"{k} {pair(v)}" for k, v in (record.get("eval") or {}).items())
    gold = record.get("gold/mean") or [None]
    return (f"reward {pair(record.get('reward/mean'))}, KL {pair(record.get('kl/k1'))}"
            + (f", gold {pair(gold)}" if gold[-1] is not None else "")
            + (f"; held-out greedy: {held}" if held else ""))
