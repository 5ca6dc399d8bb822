"""`tether cai`: Constitutional AI (Bai et al. 2022) in two phases, offline, with a local judge.

    critique  SL-CAI data: for each of `cai.sl_prompts` prompts the policy answers, critiques its
              answer against a principle of the constitution (sampled, seeded) and revises it,
              the requests as follow-up user turns (`tether.judge.constitution`)   -> sft_rows.jsonl
    sft       `tether sft` on (prompt, revision) rows: the SL-CAI model            -> sft/model
    label     RL-CAI data: the SL-CAI model samples two responses to each of `cai.rl_prompts`
              other prompts; the judge compares them under a sampled principle's `compare`
              text; rows via `tether.judge.label_rows`, `cai.min_confidence` kept  -> pairs.jsonl
    dpo       `tether dpo` on the pairs with soft labels (`cai.rl: dpo`)           -> dpo/policy
    rm, ppo   or `tether rm` on the pairs, then `tether ppo` on it (`cai.rl: rm_ppo`) -> ppo/policy
    eval      `tether eval`: the final policy vs `cai.model` on held-out tone prompts (gold VADER,
              KL, entropy, diversity, alignment tax)                               -> eval/eval.json

Sampling stages append one line per batch (flushed and fsynced; a torn last line is cut) and
resume where they stopped; a finished stage writes <stage dir>/stage.json and is skipped when the
command runs again (`tether rlhf`'s markers). Default prompts: the built-in tone prompts of
`tether prefs`, none of them an eval prompt.
"""

from __future__ import annotations

import gc
import json
import random
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import torch

from tether.config import CAIConfig, GenerationConfig, ModelConfig, PrefsParams, save_config
from tether.data.prompts import encode_prompt
from tether.data.tasks.sentiment import sentiment_score
from tether.engine import checkpoint, dist
from tether.engine.batchlog import logged_batches, settings_guard, write_atomic
from tether.engine.backends import close_backend, make_backend
from tether.engine.generate import SamplingParams, seeded
from tether.engine.models import load_causal_lm, load_tokenizer
from tether.engine.optimize import resolve_precision
from tether.errors import ConfigError
from tether.eval.evaluate import progress_bar
from tether.judge.constitution import (as_messages, clean_revision, critique_turns, degenerate,
                                       load_constitution, pick_principles, revision_turns)
from tether.recipes.preference_set import load_prompts
from tether.recipes.stages import (builtin_ppo_prompts, finished, mark_finished, positive_tone,
                                   resumable)

RL_STAGES = {"dpo": ("dpo",), "rm_ppo": ("rm", "ppo")}


def stage_names(cfg: CAIConfig) -> tuple[str, ...]:
    if cfg.cai.rl not in RL_STAGES:
        raise ConfigError(f"cai.rl must be one of {', '.join(RL_STAGES)}, got '{cfg.cai.rl}'")
    return ("critique", "sft", "label", *RL_STAGES[cfg.cai.rl], "eval")


def stage_dirs(cfg: CAIConfig) -> dict[str, Path]:
    """<cai.output_dir>/<stage>, or a training stage's own `run.output_dir` when it is set."""
    own = {n: getattr(cfg, n).run.output_dir for n in ("sft", "dpo", "rm", "ppo")}
    return {n: Path(own.get(n) or Path(cfg.cai.output_dir) / n) for n in stage_names(cfg)}


def split_prompts(rows: list[dict], n_sl: int, n_rl: int, seed: int) -> tuple[list, list]:
    """(SL-CAI prompts, RL-CAI prompts): a seeded shuffle, the first n_sl, then the next n_rl."""
    if n_sl < 1 or n_rl < 1 or n_sl + n_rl > len(rows):
        raise ConfigError(f"cai.sl_prompts ({n_sl}) and cai.rl_prompts ({n_rl}) must be >= 1 "
                          f"and together at most the {len(rows)} prompts")
    order = list(range(len(rows)))
    random.Random(f"cai-prompts-{seed}").shuffle(order)
    return [rows[i] for i in order[:n_sl]], [rows[i] for i in order[n_sl:n_sl + n_rl]]


class Sampler:
    """A stage's policy behind the engine's backend (`generation`; loaded on the first call);
    its batches go to a resumable log (`tether.engine.batchlog`). `close` when done."""

    def __init__(self, model: str, precision: str, generation: GenerationConfig):
        self.cfg, self.backend, self.generation = ModelConfig(name_or_path=model), None, generation
        self.tokenizer = load_tokenizer(self.cfg)
        self.precision = resolve_precision(precision, torch.device("cpu"))

    def __call__(self, conversations: list, params: SamplingParams, generator) -> list[str]:
        self.backend = self.backend or make_backend(self.generation, load_causal_lm(
            self.cfg).eval(), self.tokenizer, precision=self.precision)
        ids = [encode_prompt(self.tokenizer, c) for c in conversations]
        return self.backend.generate(ids, params, generator=generator).texts  # (N * G,)

    def close(self) -> None:
        if self.backend is not None:
            close_backend(self.backend)
            self.backend = None


# --- critique: answer -> (critique -> revision) x rounds --------------------------------------


def critique_batch(sample, rows: list[dict], principles: list, picks: list[list[int]], *,
                   params: SamplingParams, seed: int, batch: int) -> dict:
    """One batch of SL-CAI: picks[i][r] is prompt i's principle in round r. Each generation is
    one batched call with its own seeded generator (seed, batch, turn)."""
    conversations = [as_messages(r["prompt"]) for r in rows]
    answers = sample(conversations, params, seeded(seed, batch, 0))
    conversations = [c + [{"role": "assistant", "content": a}]
                     for c, a in zip(conversations, answers)]
    critiques, revisions = [[] for _ in rows], [[] for _ in rows]
    for r in range(len(picks[0])):
        asked = [critique_turns(c, principles[p[r]]) for c, p in zip(conversations, picks)]
        said = sample(asked, params, seeded(seed, batch, 2 * r + 1))
        asked = [revision_turns(c, s, principles[p[r]]) for c, s, p in zip(asked, said, picks)]
        revised = [clean_revision(t) for t in sample(asked, params, seeded(seed, batch, 2 * r + 2))]
        conversations = [c + [{"role": "assistant", "content": t}] for c, t in zip(asked, revised)]
        for i in range(len(rows)):
            critiques[i].append(said[i])
            revisions[i].append(revised[i])
    return {"answers": answers, "critiques": critiques, "revisions": revisions,
            "principles": [[principles[k].name for k in p] for p in picks]}


def sft_rows(prompts: list[dict], records: list[dict], *, min_words: int
             ) -> tuple[list[dict], Counter]:
    """(prompt, final revision) as TRL conversational prompt-completion rows; degenerate
    revisions (`constitution.degenerate`) are left out and counted by reason."""
    rows, dropped = [], Counter()
    flat = [(i, rec) for rec in records for i in range(len(rec["answers"]))]
    for row, (i, rec) in zip(prompts, flat):
        revision = rec["revisions"][i][-1]
        reason = degenerate(revision, min_words=min_words)
        if reason:
            dropped[reason] += 1
            continue
        rows.append({"prompt": as_messages(row["prompt"]),
                     "completion": [{"role": "assistant", "content": revision}],
                     **{k: v for k, v in row.items() if k != "prompt"}})
    return rows, dropped


def critique_stage(cfg: CAIConfig, stage_dir: Path, prompts: list[dict], principles) -> dict:
    c, B = cfg.cai, cfg.cai.batch_prompts
    if c.rounds < 1:
        raise ConfigError(f"cai.rounds must be >= 1, got {c.rounds}")
    log = stage_dir / "revisions.jsonl"
    settings_guard(log, {"model": c.model, "principles": [asdict(p) for p in principles],
                         "prompts": prompts, **{k: getattr(c, k) for k in (
                             "rounds", "max_new_tokens", "temperature", "seed", "batch_prompts")}})
    flat = pick_principles(len(prompts) * c.rounds, len(principles), seed=c.seed, stage="sl")
    picks = [flat[i * c.rounds:(i + 1) * c.rounds] for i in range(len(prompts))]
    sample = Sampler(c.model, c.precision, cfg.generation)
    params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.temperature)
    n_batches = -(-len(prompts) // B)
    with progress_bar(c.progress) as bar:
        task = bar.add_task("cai: answer -> critique -> revise", total=n_batches)
        records = logged_batches(log, n_batches, lambda b: critique_batch(
            sample, prompts[b * B:(b + 1) * B], principles, picks[b * B:(b + 1) * B],
            params=params, seed=c.seed, batch=b), progress=lambda n: bar.update(task, completed=n))
    sample.close()
    rows, dropped = sft_rows(prompts, records, min_words=c.min_words)
    if not rows:
        raise ConfigError(f"every one of the {len(prompts)} revisions was degenerate "
                          f"({dict(dropped)}); see {log}")
    write_atomic(stage_dir / "sft_rows.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                       for r in rows))
    vader = lambda texts: sum(map(sentiment_score, texts)) / max(1, len(texts))  # noqa: E731
    return {"prompts": len(prompts), "kept": len(rows), "dropped": dict(dropped),
            "vader": [vader([a for r in records for a in r["answers"]]),
                      vader([t[-1] for r in records for t in r["revisions"]])]}


# --- label: two responses per prompt, compared by the judge -----------------------------------


def reply_like(prompt, text: str):
    """A response in the prompt's style: an assistant message after chat messages, else text."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def gold_agreement(rows: list[dict], min_gap: float = 0.1) -> tuple[float | None, int]:
    """(fraction of pairs where the judge's `chosen` has the higher gold score, pairs counted):
    only pairs whose gold scores differ by at least `min_gap` count; None when none does."""
    decided = [r for r in rows if abs(r["gold_chosen"] - r["gold_rejected"]) >= min_gap]
    agree = sum(r["gold_chosen"] > r["gold_rejected"] for r in decided)
    return (agree / len(decided) if decided else None), len(decided)


def sample_pairs(cfg: CAIConfig, log: Path, policy: Path, prompts: list[dict], batches,
                 bar) -> list[str]:
    """Two responses per prompt from the SL-CAI model: (2 * len(prompts),) texts, pairs adjacent."""
    c = cfg.cai
    sample = Sampler(str(policy), c.precision, cfg.generation)
    params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=c.rl_temperature,
                            group_size=2)
    task = bar.add_task("cai: sample response pairs", total=len(batches))
    records = logged_batches(log, len(batches), lambda b: {"responses": sample(
        [prompts[i]["prompt"] for i in batches[b]], params, seeded(c.seed, b))},
        progress=lambda n: bar.update(task, completed=n))
    sample.close()
    return [t for rec in records for t in rec["responses"]]


def judge_batch(judge, prompts: list[dict], pairs: list[tuple], texts: list[str]) -> dict:
    """pairs (i, response_a, response_b) judged under texts[i], one call per principle:
    {"index": [i], "p_a": [P(a better)], "disagree": [the two orders disagree]}."""
    p_a, disagree = {}, {}
    for text in dict.fromkeys(texts[i] for i, _, _ in pairs):  # (in first-seen order)
        part = [p for p in pairs if texts[p[0]] == text]
        res = judge.compare([prompts[i]["prompt"] for i, _, _ in part], [a for _, a, _ in part],
                            [b for _, _, b in part], text)
        for (i, _, _), p, d in zip(part, res.p_a.tolist(), res.position_disagree.tolist()):
            p_a[i], disagree[i] = p, d
    index = [i for i, _, _ in pairs]
    return {"index": index, "p_a": [p_a[i] for i in index],
            "disagree": [disagree[i] for i in index]}


def label_stage(cfg: CAIConfig, stage_dir: Path, policy: Path, prompts: list[dict],
                principles) -> dict:
    from tether.judge import Judge, as_text, keep_confident, label_rows

    c, B, jc = cfg.cai, cfg.cai.batch_prompts, cfg.judge
    picks = pick_principles(len(prompts), len(principles), seed=c.seed, stage="rl")
    texts = [principles[k].compare for k in picks]  # (P,) each prompt's judging principle
    batches = [range(s, min(s + B, len(prompts))) for s in range(0, len(prompts), B)]
    log, judged_log = stage_dir / "samples.jsonl", stage_dir / "judged.jsonl"
    settings_guard(log, {"policy": str(policy), "trained": finished(policy.parent),
                         "prompts": prompts, **{k: getattr(c, k) for k in (
                             "max_new_tokens", "rl_temperature", "seed", "batch_prompts")}})
    settings_guard(judged_log, {"judge": asdict(jc), "texts": texts})
    judge = None

    def judged(b: int) -> dict:  # the pairs whose two responses differ
        nonlocal judge
        judge = judge or Judge.load(jc.model, batch_size=jc.batch_size, dtype=jc.dtype,
                                    max_text_tokens=jc.max_text_tokens)
        mine = [(i, responses[2 * i], responses[2 * i + 1]) for i in batches[b]]
        return judge_batch(judge, prompts, [p for p in mine if p[1].strip() != p[2].strip()],
                           texts)

    with progress_bar(c.progress) as bar:
        responses = sample_pairs(cfg, log, policy, prompts, batches, bar)  # (2P,)
        gc.collect()  # the sampler's model is gone before the judge loads
        task = bar.add_task("cai: judge pairs", total=len(batches))
        records = logged_batches(judged_log, len(batches), judged,
                                 progress=lambda n: bar.update(task, completed=n))
    index = [i for rec in records for i in rec["index"]]
    reply = lambda i, k: reply_like(prompts[i]["prompt"], responses[2 * i + k])  # noqa: E731
    rows = label_rows([prompts[i]["prompt"] for i in index], [reply(i, 0) for i in index],
                      [reply(i, 1) for i in index],
                      torch.tensor([p for rec in records for p in rec["p_a"]]),
                      torch.tensor([d for rec in records for d in rec["disagree"]],
                                   dtype=torch.bool))
    for row, i in zip(rows, index):
        row.update({k: v for k, v in prompts[i].items() if k != "prompt"},
                   principle=principles[picks[i]].name,
                   gold_chosen=sentiment_score(as_text(row["chosen"])),
                   gold_rejected=sentiment_score(as_text(row["rejected"])))
    kept = keep_confident(rows, c.min_confidence)
    if not kept:
        raise ConfigError(f"no judged pair has confidence >= cai.min_confidence "
                          f"({c.min_confidence}) out of {len(rows)}; lower it")
    write_atomic(stage_dir / "pairs.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                    for r in kept))
    agreement, decided = gold_agreement(rows)
    n = max(1, len(rows))
    return {"prompts": len(prompts), "identical": len(prompts) - len(rows), "judged": len(rows),
            "kept": len(kept), "position_disagree": sum(r["position_disagree"] for r in rows) / n,
            "mean_confidence": sum(r["confidence"] for r in rows) / n,
            "gold_agreement": agreement, "gold_decided": decided}


# --- the pipeline -----------------------------------------------------------------------------


def stage_config(cfg: CAIConfig, dirs: dict[str, Path], name: str):
    """A training stage's config with the pipeline's model and rows where its own are empty:
    sft starts from cai.model on the revisions; dpo, rm and ppo from the SL-CAI model, dpo and
    rm on the judged pairs, ppo on their prompts with the RM stage's reward model."""
    section, sl_model = getattr(cfg, name), dirs["sft"] / "model"
    start, rows = {"sft": (cfg.cai.model, dirs["critique"] / "sft_rows.jsonl"),
                   "ppo": (str(sl_model), None)}.get(name, (str(sl_model), dirs["label"]
                                                            / "pairs.jsonl"))
    out = replace(section, model=replace(section.model,
                                         name_or_path=section.model.name_or_path or start))
    if rows is not None:
        out = replace(out, data=replace(out.data, path=out.data.path or str(rows)))
    if name != "ppo":
        return out
    pc, rewards, data = out.ppo, out.rewards, out.data
    pc = replace(pc, reward_model=pc.reward_model or str(dirs["rm"] / "reward_model"))
    if data.path is None:  # the judged pairs' prompts; held out: the eval's tone prompts
        train, held = builtin_ppo_prompts(dirs["ppo"], dirs["label"] / "pairs.jsonl")
        data = replace(data, path=str(train), eval_path=str(held))
        if pc.rewards is None:  # the gold reward logged beside the proxy, weight 0
            pc = replace(pc, rewards=[f"{positive_tone.__module__}:positive_tone"],
                         reward_weights=[0.0])
        rewards = replace(rewards, gold=rewards.gold or "sentiment")
    return replace(out, ppo=pc, data=data, rewards=rewards)


def run(cfg: CAIConfig) -> dict:
    from tether.eval.evaluate import print_table
    from tether.eval.evaluate import run as evaluate
    from tether.recipes import dpo, ppo, rm, sft

    dist.init()
    if dist.world_size() > 1:
        raise ConfigError("tether cai runs on one process (its stages sample and judge there)")
    names, dirs, root = stage_names(cfg), stage_dirs(cfg), Path(cfg.cai.output_dir)
    policy = dirs[names[-2]] / "policy"  # the last training stage's (dpo or ppo)
    principles = load_constitution(cfg.cai.constitution)
    sl_prompts, rl_prompts = split_prompts(load_prompts(PrefsParams(prompts=cfg.cai.prompts)),
                                           cfg.cai.sl_prompts, cfg.cai.rl_prompts, cfg.cai.seed)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    say = lambda message: print(f"cai: {message}", flush=True)  # noqa: E731
    say(f"{len(principles)} principles ({', '.join(p.name for p in principles)}); "
        f"{len(sl_prompts)} SL-CAI and {len(rl_prompts)} RL-CAI prompts; stages "
        f"{' -> '.join(names)} in {root}")

    results = {}
    for name in names:
        stage_dir = dirs[name]
        if (done := finished(stage_dir)) is not None:
            say(f"stage {name}: finished earlier, skipped")
            results[name] = {"skipped": True, **done}
            continue
        say(f"stage {name}: starting in {stage_dir}")
        stage_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if name == "critique":
            record = critique_stage(cfg, stage_dir, sl_prompts, principles)
        elif name == "label":
            record = label_stage(cfg, stage_dir, dirs["sft"] / "model", rl_prompts, principles)
        elif name == "eval":
            ecfg = replace(cfg.eval, model=cfg.eval.model or str(policy),
                           reference=cfg.eval.reference or cfg.cai.model,
                           output=cfg.eval.output or str(stage_dir / "eval.json"),
                           progress=cfg.eval.progress and cfg.cai.progress)
            record = eval_summary(evaluate(ecfg))
        else:  # a training stage: the recipe itself, resumed from its checkpoint if it has one
            runner = {"sft": sft.run, "dpo": dpo.run, "rm": rm.run, "ppo": ppo.run}[name]
            out = runner(resumable(stage_config(cfg, dirs, name), stage_dir))
            if name in ("sft", "dpo"):  # a plain HF directory for the next stage / the eval
                checkpoint.export_run(stage_dir, stage_dir / ("model" if name == "sft"
                                                              else "policy"),
                                      force=True, inside_run=True)
            del out
            record = train_summary(name, stage_dir)
        gc.collect()
        record["seconds"] = round(time.perf_counter() - t0, 1)
        mark_finished(stage_dir, {"stage": name, **record})
        results[name] = {"skipped": False, "stage": name, **record}
        say(f"stage {name}: done in {record['seconds']:.0f} s")
    if results["eval"]["skipped"]:  # the table of the earlier run
        report = json.loads(Path(results["eval"]["eval_json"]).read_text())
        print_table({**report, "path": results["eval"]["eval_json"]})
    lines = [f"  {n}: {describe(n, results[n])}" for n in names]
    say("summary\n" + "\n".join(lines))
    write_atomic(root / "summary.json", json.dumps(results, indent=1))
    return {"stages": results, "dirs": dirs, "policy": policy}


SUMMARY_KEYS = {"sft": ("loss/sft", "eval/loss"),
                "dpo": ("loss/dpo", "rewards/accuracy", "eval/loss", "eval/rewards/accuracy"),
                "rm": ("loss/rm", "eval/accuracy"), "ppo": ("reward/mean", "gold/mean", "kl/k1")}


def train_summary(name: str, run_dir: Path) -> dict:
    """[first, last] logged value of the stage's key metrics (its metrics.jsonl, which a resumed
    run keeps whole); None for a metric never logged."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = {}
    for key in SUMMARY_KEYS[name]:
        values = [x[key] for x in lines if key in x]
        out[key] = [values[0], values[-1]] if values else None
    return out


EVAL_KEYS = ("gold/mean", "kl/k1", "policy/entropy", "completions/distinct_2", "tax/general_nll",
             "tax/arithmetic_accuracy")


def eval_summary(report: dict) -> dict:
    pol, ref = (report["results"][k]["metrics"] for k in ("policy", "reference"))
    return {"eval_json": report["path"], **{k: [ref.get(k), pol[k]] for k in EVAL_KEYS
                                            if k in pol}}


def describe(name: str, r: dict) -> str:
    """One summary line of a finished stage's record."""
    def pair(key, fmt="{:.3f}"):
        show = lambda v: "n/a" if v is None or v != v else fmt.format(v)  # noqa: E731
        return " -> ".join(show(v) for v in (r.get(key) or (None, None)))

    pct = "{:.1%}"
    if name == "critique":
        return (f"{r['kept']}/{r['prompts']} revisions kept (dropped: {r['dropped'] or 'none'}); "
                f"VADER answers -> revisions {pair('vader', '{:+.3f}')}")
    if name == "label":
        agree = "n/a" if r["gold_agreement"] is None else pct.format(r["gold_agreement"])
        return (f"{r['judged']} pairs judged ({r['identical']} identical skipped), {r['kept']} "
                f"kept; position disagreement {pct.format(r['position_disagree'])}, mean "
                f"confidence {r['mean_confidence']:.3f}, agreement with VADER {agree} of "
                f"{r['gold_decided']} decided pairs")
    keys = [k for k in EVAL_KEYS if k in r] if name == "eval" else SUMMARY_KEYS[name]
    return ("start model -> policy: " if name == "eval" else "") + ", ".join(
        f"{key} {pair(key, pct if 'accuracy' in key else '{:.3f}')}" for key in keys)
