"""The built preference set (`tether prefs`; `tether rm` and `tether rlhf` without data): sample a
model and order pairs by a gold reward. A helper module, no recipe: prefs, rm and rlhf call `build`.

The way the DPO paper built its IMDb set (Rafailov et al. 2023, section 6.1): prompts, several
completions sampled from the model, and every pair of a prompt's completions ordered by a gold
scorer (here `prefs.gold`, VADER's compound sentiment by default; any `rewards.gold` name works).

Stages:
    prompts   the built-in tone prompts (tether.data.tasks.sentiment.prompt_pool, 2,312 prompts,
              none of them an eval prompt) or `prefs.prompts`, shuffled with `prefs.seed`
    sample    `prefs.batch_prompts` prompts at a time, `prefs.samples_per_prompt` completions each
              (one prefill per prompt, seeded by (seed, batch)); each batch is appended to
              <root>/samples/<hash>/samples.jsonl, which is kept: a killed build resumes where
              it stopped, and a set that differs only in its sizes or min_gap reuses the samples
    pair      `tether.data.preference.pairs_by_score`: every pair whose gold scores differ by
              >= `prefs.min_gap` (smaller gaps are ties, dropped). A prompt's pairs all go to one
              side: held-out prompts first until `prefs.heldout_pairs`, then training prompts
              until `prefs.pairs`; the build stops when both are reached
    write     <cache>/train.jsonl, <cache>/heldout.jsonl (TRL preference rows + "group",
              "score_chosen", "score_rejected") and <cache>/meta.json, atomically

The cache directory is named by a hash of every setting that changes the rows (docs/rm.md), so a
second run with the same settings reads the files and samples nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from tether.config import GenerationConfig, ModelConfig, PrefsParams
from tether.data.formats import read_rows, validate_row
from tether.data.preference import pairs_by_score
from tether.data.prompts import PROMPT_FORMATS, encode_prompt
from tether.engine import dist
from tether.engine.batchlog import read_partial, write_atomic
from tether.engine.backends import close_backend, make_backend
from tether.engine.generate import SamplingParams, seeded
from tether.engine.locks import lock
from tether.engine.models import cache_dir, load_causal_lm, load_tokenizer, resolve_model_dir
from tether.engine.optimize import resolve_precision
from tether.errors import ConfigError, DataError
from tether.eval.evaluate import progress_bar
from tether.rewards import call_reward, load_reward

FILES = ("train.jsonl", "heldout.jsonl")


def load_prompts(p: PrefsParams) -> list[dict]:
    """Prompt rows ({"prompt", other fields...}): the file `prefs.prompts` or the built-in pool."""
    if p.prompts is None:
        from tether.data.tasks.sentiment import prompt_pool

        return prompt_pool()
    rows = []
    for number, row in read_rows(p.prompts):  # checked as the RL recipes check prompt rows
        if validate_row(row, p.prompts, number) not in PROMPT_FORMATS:
            raise DataError("is not a prompt row; prefs.prompts takes {'prompt', ...} rows (the "
                            "other fields go to the gold reward)", source=p.prompts, row=number)
        rows.append(row)
    if not rows:
        raise DataError("holds no rows", source=p.prompts)
    return rows


PAIRING = ("pairs", "heldout_pairs", "min_gap")  # settings that change the pairs, not the samples


def cache_key(p: PrefsParams, prompts: list[dict], model_dir: Path, *, samples_only=False,
              generation: GenerationConfig | None = None) -> str:
    """Hash of everything that changes the rows: the settings but `cache_dir` (batch_prompts
    stays in: it changes the seeds), the prompts, the sampling model's directory and
    weight-file sizes, and the sampler's settings unless it is the default (hf). `samples_only`
    leaves out the pairing settings (`PAIRING`)."""
    drop = ("cache_dir", "model", "prompts") + (PAIRING if samples_only else ())
    settings = {k: v for k, v in asdict(p).items() if k not in drop}
    if generation is not None and generation.backend != "hf":
        settings["generation"] = asdict(generation)
    weights = sorted((f.name, f.stat().st_size) for f in model_dir.glob("*.safetensors"))
    blob = json.dumps([settings, prompts, str(model_dir.resolve()), weights], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root(p: PrefsParams) -> Path:
    return Path(p.cache_dir) if p.cache_dir else cache_dir() / "prefs"


def build_dir(p: PrefsParams, prompts: list[dict], model_dir: Path,
              generation: GenerationConfig | None = None) -> Path:
    return cache_root(p) / cache_key(p, prompts, model_dir, generation=generation)


def samples_path(p: PrefsParams, prompts: list[dict], model_dir: Path,
                 generation: GenerationConfig | None = None) -> Path:
    """The sampled batches, shared by every set that differs only in `PAIRING`."""
    key = cache_key(p, prompts, model_dir, samples_only=True, generation=generation)
    return cache_root(p) / "samples" / key / "samples.jsonl"


def check(p: PrefsParams) -> None:
    if p.pairs < 1 or p.heldout_pairs < 0:
        raise ConfigError("prefs.pairs must be >= 1 and prefs.heldout_pairs >= 0")
    if p.samples_per_prompt < 2:
        raise ConfigError(f"prefs.samples_per_prompt must be >= 2 (a pair needs two "
                          f"completions), got {p.samples_per_prompt}")
    if p.min_gap <= 0:
        raise ConfigError(f"prefs.min_gap must be > 0 (pairs closer are ties), got {p.min_gap}")
    if p.temperature <= 0 or p.batch_prompts < 1 or p.max_new_tokens < 1:
        raise ConfigError("prefs.temperature, prefs.batch_prompts and prefs.max_new_tokens "
                          "must be > 0")


def build(p: PrefsParams, *, precision: str = "auto", progress: bool = True, say=print,
          generation: GenerationConfig | None = None) -> tuple[Path, Path]:
    """(train.jsonl, heldout.jsonl) of the built set: read from the cache, else built there,
    sampled by `generation`'s backend (None: the default, hf)."""
    check(p)
    generation = generation or GenerationConfig()
    prompts = load_prompts(p)
    model_cfg = ModelConfig(name_or_path=p.model)
    model_dir = resolve_model_dir(model_cfg)
    out = build_dir(p, prompts, model_dir, generation)
    paths = tuple(out / f for f in FILES)
    if all(path.is_file() for path in paths):
        say(f"prefs: cached set {out}")
        return paths
    if not dist.is_main():
        raise ConfigError(f"the preference set {out} is not built yet: run `tether prefs` (or "
                          "the recipe on one process) once first")
    out.mkdir(parents=True, exist_ok=True)
    partial_path = samples_path(p, prompts, model_dir, generation)
    partial_path.parent.mkdir(parents=True, exist_ok=True)
    batches = shuffled_batches(prompts, p)
    tokenizer, lm, backend = load_tokenizer(model_cfg), None, None
    gold = load_reward(p.gold)
    params = SamplingParams(max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                            group_size=p.samples_per_prompt)
    G = p.samples_per_prompt
    train, held = [], []
    t0 = time.perf_counter()
    say(f"prefs: building {p.pairs} + {p.heldout_pairs} held-out pairs in {out} "
        f"({G} samples per prompt from {model_dir}, ordered by {p.gold}; resumes if killed)")
    with progress_bar(progress) as bar, partial_path.open("a", encoding="utf-8") as log:
        lock(log, f"another process is sampling {partial_path}; wait for it (the samples are "
                  "then read from there)")  # one sampler per file: a second would append the same
        done = read_partial(partial_path)  # read under the lock: no batch is sampled twice
        task = bar.add_task("prefs: sample + score", total=p.pairs + p.heldout_pairs)
        used = 0
        for b, chunk in enumerate(batches):
            if len(train) >= p.pairs and len(held) >= p.heldout_pairs:
                break
            used += len(chunk)
            if b not in done:
                if backend is None:
                    lm = load_causal_lm(model_cfg).eval()
                    backend = make_backend(generation, lm, tokenizer, seed=p.seed,
                                           precision=resolve_precision(precision,
                                                                       torch.device("cpu")))
                rollout = backend.generate([encode_prompt(tokenizer, r["prompt"]) for r in chunk],
                                           params, generator=seeded(p.seed, b))
                columns = {k: [r.get(k) for r in chunk for _ in range(G)]
                           for k in {k for r in chunk for k in r if k != "prompt"}}
                scores = call_reward(p.gold, gold, [r["prompt"] for r in chunk for _ in range(G)],
                                     rollout.texts, **columns)
                done[b] = {"batch": b, "completions": rollout.texts, "scores": scores}
                log.write(json.dumps(done[b], ensure_ascii=False) + "\n")
                log.flush()
            texts, scores = done[b]["completions"], done[b]["scores"]
            for i, row in enumerate(chunk):
                side = held if len(held) < p.heldout_pairs else train
                side += pairs_by_score(row, texts[i * G:(i + 1) * G], scores[i * G:(i + 1) * G],
                                       min_gap=p.min_gap)
            bar.update(task, completed=min(len(train), p.pairs) + min(len(held), p.heldout_pairs))
    if backend is not None:
        close_backend(backend)
    if len(train) < p.pairs or len(held) < p.heldout_pairs:
        raise ConfigError(f"all {len(prompts)} prompts gave only {len(train)} training and "
                          f"{len(held)} held-out pairs (prefs.pairs {p.pairs}, "
                          f"prefs.heldout_pairs {p.heldout_pairs}): lower them or prefs.min_gap, "
                          "raise prefs.samples_per_prompt, or add prompts (prefs.prompts)")
    meta = {"settings": asdict(p), "model": str(model_dir), "samples": str(partial_path),
            "prompts_used": used}
    write_set(out, train[:p.pairs], held[:p.heldout_pairs], meta, time.perf_counter() - t0)
    say(f"prefs: {p.pairs} train + {p.heldout_pairs} held-out pairs (mean gold gap "
        f"{meta['mean_gap']:.3f}) in {meta['seconds']:.0f} s -> {out}")
    return paths


def shuffled_batches(prompts: list[dict], p: PrefsParams) -> list[list[dict]]:
    """The prompts in the seed's order, `prefs.batch_prompts` at a time (one resume point each)."""
    order = list(range(len(prompts)))
    random.Random(f"prefs-{p.seed}").shuffle(order)
    return [[prompts[i] for i in order[s:s + p.batch_prompts]]
            for s in range(0, len(order), p.batch_prompts)]


def write_set(out: Path, train: list[dict], held: list[dict], meta: dict, seconds: float) -> None:
    """train.jsonl, heldout.jsonl and meta.json (the counts and the mean gold gap added to
    `meta`), each atomically."""
    for path, rows in zip((out / f for f in FILES), (train, held)):
        write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    gaps = [r["score_chosen"] - r["score_rejected"] for r in train + held]
    meta.update({"train_pairs": len(train), "heldout_pairs": len(held),
                 "mean_gap": sum(gaps) / len(gaps), "seconds": round(seconds, 1)})
    write_atomic(out / "meta.json", json.dumps(meta, indent=1))
