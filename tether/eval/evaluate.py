"""`tether eval MODEL_OR_RUN`: what a model does on held-out prompts, beside its reference.

Stages: resolve (which policy, which reference, which proxy) -> sample (each model answers the
same held-out prompts, seeded) -> score (gold and proxy rewards; the reference's log-probs of the
policy's samples for the KL) -> tax (general-demonstration NLL and the other built-in task) ->
eval.json + a table. The reference goes through the same stages, so every number has a
"before" beside it. Metric names and formulas: docs/diagnostics.md.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import yaml

from tether.config import EvalConfig, ModelConfig
from tether.data.formats import tokenize_rows
from tether.data.collate import pad_collate
from tether.engine import checkpoint
from tether.engine.backends import make_backend
from tether.engine.generate import SamplingParams, encode_prompt, greedy_complete
from tether.engine.logprobs import CausalLMLogps
from tether.engine.models import load_causal_lm, load_tokenizer
from tether.engine.optimize import autocast, resolve_precision
from tether.engine.score import completion_logps
from tether.errors import ConfigError
from tether.eval.online import all_gather, distinct_n, prompt_text
from tether.eval.stats import mean_and_stderr, self_bleu, sequence_kl
from tether.eval.tasks import EvalTask, arithmetic_rows, build_task, sentiment_rows
from tether.rewards import RewardModelScorer, call_reward

GENERAL_DEMOS = Path(__file__).parent / "data" / "general_demos.jsonl"
SAMPLES_KEPT = 16  # prompts whose completions eval.json keeps (all samples of each)


# --- resolve: MODEL_OR_RUN -> a policy loader, its reference and its proxy reward ------------


@dataclass
class Source:
    label: str  # what was asked for
    load: Callable[[], tuple[torch.nn.Module, object]]  # -> (causal LM, tokenizer)
    start: str  # the model a run started from (the default reference); "default" otherwise
    run_dir: Path | None = None
    reward_model: str | None = None  # the run's own reward model, the default proxy


def model_config(spec: str) -> ModelConfig:
    """"default", a model directory or a .gguf file as a ModelConfig."""
    return ModelConfig(name_or_path=spec)


def _merged(model):
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def resolve_source(spec: str) -> Source:
    """A run directory (config.yaml; its policy/ export or its latest checkpoint), an rlhf
    pipeline directory (its PPO stage), or anything `model.name_or_path` accepts."""
    path = Path(spec)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        cfg = model_config(spec)
        return Source(spec, lambda: (load_causal_lm(cfg), load_tokenizer(cfg)), "default")
    sections = yaml.safe_load(config_path.read_text()) or {}
    if "pipeline" in sections:  # `tether rlhf`: evaluate its PPO stage against the SFT model
        ppo_dir = (sections.get("ppo") or {}).get("run", {}).get("output_dir") or path / "ppo"
        source = resolve_source(str(ppo_dir))
        rm_dir = Path((sections.get("rm") or {}).get("run", {}).get("output_dir")
                      or path / "rm") / "reward_model"
        source.reward_model = source.reward_model or (str(rm_dir) if rm_dir.is_dir() else None)
        return source
    if "rm" in sections or "prm" in sections:
        raise ConfigError(f"{path} is a reward-model run; `tether eval` evaluates a policy (give "
                          "its reward_model directory as --reward_model=... instead)")
    model = sections.get("model") or {}
    start = model.get("name_or_path", "default")
    extra = sections.get("dpo") or sections.get("ppo") or {}
    start = extra.get("ref_model") or start
    reward_model = (sections.get("ppo") or {}).get("reward_model")
    exported = path / "policy"
    if (exported / "config.json").is_file():
        cfg = model_config(str(exported))
        load = lambda: (load_causal_lm(cfg), load_tokenizer(cfg))  # noqa: E731
    else:
        ckpt = checkpoint.latest(path / "checkpoints")
        if ckpt is None:
            raise ConfigError(f"{path / 'checkpoints'} holds no complete checkpoint to evaluate")
        load = lambda: checkpoint.run_policy(sections, ckpt)  # noqa: E731
    return Source(spec, load, start, run_dir=path, reward_model=reward_model)


def output_path(cfg: EvalConfig, source: Source) -> Path:
    if cfg.output:
        return Path(cfg.output)
    return (source.run_dir or Path("runs/eval")) / "eval.json"


# --- sample: one model answers the held-out prompts ------------------------------------------


@dataclass
class SampleSet:
    """The completions one model sampled for the task's rows (G per row, row-major)."""
    prompts: list  # (B,) the prompt of each completion
    columns: dict[str, list]  # reward columns, one value per completion
    texts: list[str]  # (B,)
    rollouts: list = field(default_factory=list)  # the generation batches (engine Rollouts)
    entropy_sum: float = 0.0  # sum over completion tokens of the sampler's entropy
    tokens: int = 0  # completion tokens (EOS included)
    truncated: int = 0  # completions that hit max_new_tokens


@torch.no_grad()
def sample_set(model: CausalLMLogps, tokenizer, rows: list[dict], cfg: EvalConfig, *,
               precision: str, advance: Callable[[], None]) -> SampleSet:
    """cfg.samples_per_prompt completions per row, batch_size rows at a time, from one generator
    seeded with cfg.seed on the model's device (the global RNG is untouched, so a training run
    that evaluates this way still resumes exactly): the same seed and batch size give the same
    completions."""
    G = cfg.samples_per_prompt
    backend = make_backend(cfg.generation, model, tokenizer, precision=precision, seed=cfg.seed,
                           shared=True)  # vLLM: one engine per process, the new weights pushed
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, group_size=G)
    generator = torch.Generator(next(model.parameters()).device).manual_seed(cfg.seed)
    out = SampleSet([], {}, [])
    for start in range(0, len(rows), cfg.batch_size):
        chunk = rows[start:start + cfg.batch_size]
        rollout = backend.generate([encode_prompt(tokenizer, r["prompt"]) for r in chunk],
                                   params, generator=generator)
        out.rollouts.append(rollout)
        out.texts += rollout.texts
        out.prompts += [r["prompt"] for r in chunk for _ in range(G)]
        for key in {k for r in chunk for k in r if k != "prompt"}:
            out.columns.setdefault(key, []).extend(r.get(key) for r in chunk for _ in range(G))
        out.entropy_sum += float("nan") if rollout.entropy is None else \
            float(rollout.entropy[rollout.completion_mask].sum())  # vLLM gives none: nan
        out.tokens += int(rollout.completion_mask.sum())
        out.truncated += int(rollout.truncated.sum())
        advance()
    return out


# --- score: the metrics of one sample set -----------------------------------------------------


@dataclass
class Heldout:
    """`heldout_metrics`' answer: this rank's samples and per-completion scores, and the metrics
    of all ranks' completions."""
    samples: SampleSet  # this rank's
    metrics: dict[str, float]
    gold: list[float] | None  # one per completion of this rank (None without a gold function)
    proxy: list[float] | None  # likewise, with a proxy


@torch.no_grad()
def heldout_metrics(model: CausalLMLogps, tokenizer, rows: list[dict], cfg: EvalConfig, *,
                    gold: Callable | None, proxy: Callable | None = None,
                    reference: Callable | None = None, scores: dict[str, Callable] | None = None,
                    micro_batch_size: int, precision: str, gold_name: str = "gold",
                    advance: Callable[[], None] = lambda: None) -> Heldout:
    """The one held-out sampling-and-scoring path (`tether eval`, goodhart, DPO's in-run
    diagnostics): `sample_set` of this rank's `rows`, scored, each metric over every rank's
    completions (gathered: under torchrun the means are global):

      gold/mean, gold/stderr       the gold function (`gold_name` in its errors; None: left out)
      proxy/mean, proxy/stderr     the proxy reward (None: left out)
      <name>                       the mean of each of `scores` (metric name -> reward function)
      kl/k1, kl/k3 (+ _stderr)     `stats.sequence_kl` of each completion against the reference:
                                   `reference(fn)` returns fn(reference model), fn scoring the
                                   completions (so a recipe keeps its LoRA / reload handling);
                                   None: the model is its own reference, KL 0.0
      policy/entropy               per completion token, the sampler's (vLLM gives none: left out)
      completions/distinct_1, _2, self_bleu, completions/mean_length (tokens, EOS included),
      completions/truncated_frac

    Both models are teacher-forced in `precision`, micro_batch_size rows a forward."""
    samples = sample_set(model, tokenizer, rows, cfg, precision=precision, advance=advance)
    texts = all_gather(samples.texts)
    n = len(texts)
    metrics: dict[str, float] = {}
    golds = None if gold is None else call_reward(gold_name, gold, samples.prompts,
                                                  samples.texts, **samples.columns)
    if golds is not None:
        metrics["gold/mean"], metrics["gold/stderr"] = mean_and_stderr(all_gather(golds))
    proxy_scores = None
    if proxy is not None:
        proxy_scores = call_reward("reward_model", proxy, samples.prompts, samples.texts)
        metrics["proxy/mean"], metrics["proxy/stderr"] = mean_and_stderr(
            all_gather(proxy_scores))
    for name, fn in (scores or {}).items():
        metrics[name] = mean_and_stderr(all_gather(call_reward(
            name, fn, samples.prompts, samples.texts, **samples.columns)))[0]
    tokens = sum(all_gather([samples.tokens]))
    if samples.entropy_sum == samples.entropy_sum:  # nan: the sampler gave no entropy
        metrics["policy/entropy"] = sum(all_gather([samples.entropy_sum])) / max(1, tokens)
    metrics.update({
        "completions/distinct_1": distinct_n(texts, 1),
        "completions/distinct_2": distinct_n(texts, 2),
        "self_bleu": self_bleu(texts),
        "completions/mean_length": tokens / max(1, n),
        "completions/truncated_frac": sum(all_gather([samples.truncated])) / max(1, n),
    })
    if reference is None:
        metrics.update({"kl/k1": 0.0, "kl/k3": 0.0})
    else:
        device = next(model.parameters()).device

        def score(lm) -> list[torch.Tensor]:  # (b, C) completion log-probs per rollout
            with autocast(device, precision):
                return [completion_logps(lm, r, micro_batch_size=micro_batch_size).float()
                        for r in samples.rollouts]

        k1s, k3s = [], []
        for rollout, logps, ref in zip(samples.rollouts, score(model), reference(score)):
            k1, k3 = sequence_kl(logps, ref, rollout.completion_mask)
            k1s += k1.tolist()
            k3s += k3.tolist()
        metrics["kl/k1"], metrics["kl/k1_stderr"] = mean_and_stderr(all_gather(k1s))
        metrics["kl/k3"], metrics["kl/k3_stderr"] = mean_and_stderr(all_gather(k3s))
    return Heldout(samples, metrics, golds, proxy_scores)


def bon_samples(model: CausalLMLogps, tokenizer, task: EvalTask, proxy, cfg: EvalConfig, *,
                precision: str, advance: Callable[[], None], texts: list[str] | None = None
                ) -> dict[str, list[list]]:
    """Best-of-n's samples: cfg.samples_per_prompt = N completions of each task row
    (`sample_set`; or `texts`, saved earlier, row-major), scored by the task's gold and by the
    proxy: {"texts", "gold", "proxy"}, each (P, N) nested lists (`goodhart.bon_points` takes
    the scores)."""
    N = cfg.samples_per_prompt
    if texts is None:
        texts = sample_set(model, tokenizer, task.rows, cfg, precision=precision,
                           advance=advance).texts
    prompts = [r["prompt"] for r in task.rows for _ in range(N)]
    columns = {k: [r.get(k) for r in task.rows for _ in range(N)]
               for k in {k for r in task.rows for k in r if k != "prompt"}}
    gold = call_reward(task.gold_name, task.gold, prompts, texts, **columns)
    scores = call_reward("proxy", proxy, prompts, texts)
    rows = lambda xs: [xs[i:i + N] for i in range(0, len(xs), N)]  # noqa: E731
    return {"texts": rows(texts), "gold": rows(gold), "proxy": rows(scores)}


def kept_samples(samples: SampleSet, gold: list[float], proxy: list[float] | None,
                 per_prompt: int) -> list[dict]:
    """The completions of the first SAMPLES_KEPT prompts, for eval.json and the report."""
    keep = min(len(samples.texts), SAMPLES_KEPT * per_prompt)
    return [{"prompt": prompt_text(samples.prompts[i]), "completion": samples.texts[i],
             "gold": gold[i], "proxy": None if proxy is None else proxy[i]}
            for i in range(keep)]


# --- tax: what the model lost elsewhere -------------------------------------------------------


@torch.no_grad()
def general_nll(model: CausalLMLogps, tokenizer, *, precision: str, batch_size: int) -> float:
    """Mean NLL per completion token of the shipped general demonstrations (48 short questions
    and answers written for tether, unrelated to both built-in tasks)."""
    from tether.config import DataConfig
    from tether.data.formats import read_rows

    examples = tokenize_rows(read_rows(GENERAL_DEMOS), tokenizer, DataConfig(max_length=256),
                             str(GENERAL_DEMOS))
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = pad_collate(examples[start:start + batch_size], tokenizer.pad_token_id)
        with autocast(torch.device("cpu"), precision):
            logps = model(batch.input_ids, batch.attention_mask).float()  # (b, T)
        total -= float(logps[batch.loss_mask].sum())
        tokens += batch.num_loss_tokens
    return total / tokens


def tax_metrics(model: CausalLMLogps, tokenizer, task: EvalTask, cfg: EvalConfig, *,
                precision: str) -> dict[str, float]:
    """tax/general_nll, and the built-in task(s) the evaluated task is not: tax/arithmetic_accuracy
    (greedy, exact verifier) and tax/sentiment (mean VADER of one sample per held-out prompt)."""
    out = {"tax/general_nll": general_nll(model, tokenizer, precision=precision,
                                          batch_size=cfg.batch_size)}
    if task.name != "arithmetic":
        from tether.data.tasks import arithmetic

        rows = arithmetic_rows(cfg.tax_problems, difficulty=cfg.arithmetic_difficulty,
                               shots=cfg.arithmetic_shots)
        texts = greedy_complete(model, tokenizer, [r["prompt"] for r in rows],
                                max_new_tokens=32, batch_size=cfg.batch_size,
                                precision=precision)
        out["tax/arithmetic_accuracy"] = sum(arithmetic.verify(t, r["answer"])
                                             for t, r in zip(texts, rows)) / len(rows)
    if task.name != "sentiment":
        from tether.data.tasks.sentiment import N_HELDOUT, sentiment_score

        one = replace(cfg, samples_per_prompt=1)
        texts = sample_set(model, tokenizer, sentiment_rows(N_HELDOUT), one, precision=precision,
                           advance=lambda: None).texts
        out["tax/sentiment"] = sum(map(sentiment_score, texts)) / len(texts)
    return out


# --- the command ------------------------------------------------------------------------------


def progress_bar(enabled: bool):
    """rich's progress display for the evaluation stages (disabled: prints nothing)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=not enabled, transient=False)


def evaluate(cfg: EvalConfig) -> dict:
    """The whole evaluation as the eval.json mapping (also written to disk)."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if cfg.samples_per_prompt < 1 or cfg.num_prompts < 1:
        raise ConfigError("num_prompts and samples_per_prompt must be >= 1")
    if cfg.temperature <= 0:
        raise ConfigError(f"temperature must be > 0 (eval samples), got {cfg.temperature}")
    precision = resolve_precision(cfg.precision, torch.device("cpu"))
    source = resolve_source(cfg.model)
    task = build_task(cfg.task, n=cfg.num_prompts, gold=cfg.gold,
                      difficulty=cfg.arithmetic_difficulty, shots=cfg.arithmetic_shots)
    if not task.rows:
        raise ConfigError(f"task {cfg.task} has no held-out prompts to evaluate")
    reward_model = cfg.reward_model or source.reward_model
    ref_spec = cfg.reference or source.start

    lm, tokenizer = source.load()
    policy = CausalLMLogps(_merged(lm)).eval()
    ref_cfg = model_config(ref_spec)
    reference = CausalLMLogps(load_causal_lm(ref_cfg)).eval()
    if len(load_tokenizer(ref_cfg)) != len(tokenizer):
        raise ConfigError(f"reference {ref_spec} has another vocabulary than {cfg.model}: the KL "
                          "between them is not defined")
    proxy = RewardModelScorer(reward_model, batch_size=cfg.batch_size) if reward_model else None

    results = {}
    batches = -(-len(task.rows) // cfg.batch_size)
    with progress_bar(cfg.progress) as progress:
        for name, model in (("policy", policy), ("reference", reference)):
            bar = progress.add_task(f"sample {name}", total=batches)
            held = heldout_metrics(
                model, tokenizer, task.rows, cfg, gold=task.gold, gold_name=task.gold_name,
                proxy=proxy, reference=(lambda fn: fn(reference)) if name == "policy" else None,
                micro_batch_size=cfg.batch_size, precision=precision,
                advance=lambda b=bar: progress.advance(b))
            metrics = held.metrics
            if cfg.tax:
                bar = progress.add_task(f"alignment tax ({name})", total=1)
                metrics.update(tax_metrics(model, tokenizer, task, cfg, precision=precision))
                progress.advance(bar)
            results[name] = {"metrics": metrics,
                             "samples": kept_samples(held.samples, held.gold, held.proxy,
                                                     cfg.samples_per_prompt)}
    report = {
        "tether_eval": 1, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["tether", *sys.argv[1:]]) if sys.argv[0].endswith("tether") else "",
        "model_path": cfg.model, "reference_path": ref_spec, "task": task.name,
        "gold": task.gold_name, "proxy": reward_model, "split": task.split,
        "settings": {**asdict(cfg), "precision": precision}, "results": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = output_path(cfg, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    tmp.replace(out)
    report["path"] = str(out)
    return report


ORDER = ("gold/mean", "proxy/mean", "kl/k1", "kl/k3", "policy/entropy",
         "completions/distinct_1", "completions/distinct_2", "self_bleu",
         "completions/mean_length", "completions/truncated_frac", "tax/general_nll",
         "tax/arithmetic_accuracy", "tax/sentiment")


def table_rows(report: dict) -> list[tuple[str, float, float]]:
    """(metric, reference, policy) in display order; standard errors are shown with the means."""
    pol, ref = (report["results"][k]["metrics"] for k in ("policy", "reference"))
    return [(k, ref.get(k, float("nan")), pol[k]) for k in ORDER if k in pol]


def wide_console():
    """rich's console; off a terminal (a pipe, a log file) wide enough for a whole table."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def print_table(report: dict) -> None:
    from rich.table import Table

    pol = report["results"]["policy"]["metrics"]
    table = Table(title=f"tether eval: {report['task']} ({report['split']}); gold = "
                        f"{report['gold']}, proxy = {report['proxy'] or 'none'}")
    for col in ("metric", f"reference ({report['reference_path']})",
                f"policy ({report['model_path']})", "delta"):
        table.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
    for key, before, after in table_rows(report):
        err = pol.get(key.replace("/mean", "/stderr") if key.endswith("/mean") else f"{key}_stderr")
        shown = f"{after:.4f}" + (f" ± {err:.4f}" if err is not None else "")
        table.add_row(key, f"{before:.4f}", shown, f"{after - before:+.4f}")
    wide_console().print(table)
    print(f"eval.json: {report['path']} ({report['seconds']:.0f} s)")


def run(cfg: EvalConfig) -> dict:
    report = evaluate(cfg)
    print_table(report)
    return report
