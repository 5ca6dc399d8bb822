"""Build the shipped sentiment preference set (run once by a maintainer; runs never sample).

    python scripts/build_sentiment_prefs.py   # writes tether/data/tasks/data/sentiment_prefs.jsonl

A maintainer's script, outside the package: it samples with the engine, which the data room
sits below.

For every training prompt of `tether.data.tasks.sentiment` (240 of the 288; the 48 held-out
prompts are never sampled here) it samples `--samples` completions (default 4) from the default
model, SmolLM2-135M-Instruct, in fp32 with plain ancestral sampling (temperature 1, no top-k /
top-p, so the pairs are on-policy for the default model), at most `--max-new-tokens` tokens (48).
A completion that hits the limit without EOS is cut after its last '.', '!' or '?' (kept whole if
it has none). Each completion is scored with VADER's compound sentiment; chosen = the highest,
rejected = the lowest; a prompt whose samples differ by less than 0.05 gives no pair.

Sampling uses transformers' `generate(do_sample=True)` with a KV cache (left-padded batches of
`--prompts-per-batch` prompts x `--samples`), on one CPU thread by default. Seeds: batch i draws
from `torch.manual_seed(seed * 1_000_003 + i)`, so a run is reproducible on the same torch build
and thread count, and an interrupted run resumes from `OUT.partial` with identical results.
Measured: about 40 minutes on one thread of a busy 2-core AMD EPYC (the completions' log-probs do
not depend on it: the reference model scores whatever text is shipped).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from tether.config import ModelConfig
from tether.data.tasks.sentiment import DATA_FILE, MAX_NEW_TOKENS, sentiment_score, split_prompts
from tether.engine.models import load_causal_lm, load_tokenizer

MIN_GAP = 0.05  # chosen must beat rejected by at least this much compound sentiment


def cut_unfinished(text: str) -> str:
    """Cut a completion that ran out of tokens after its last sentence end, if it has one."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[:ends[-1]] if ends else text


@torch.no_grad()
def sample(model, tokenizer, prompts: list[dict], *, samples: int, max_new_tokens: int,
           seed: int) -> list[list[str]]:
    """`samples` completions per prompt (temperature 1), cut at EOS or a sentence end."""
    texts = [tokenizer.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                         max_new_tokens=max_new_tokens, num_return_sequences=samples,
                         pad_token_id=tokenizer.pad_token_id)
    completions = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():  # (len(prompts) * samples, new)
        finished = tokenizer.eos_token_id in row
        if finished:
            row = row[:row.index(tokenizer.eos_token_id)]
        text = tokenizer.decode(row, skip_special_tokens=True).strip()
        completions.append(text if finished else cut_unfinished(text))
    return [completions[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def pair(prompt: dict, completions: list[str]) -> dict | None:
    """The row for one prompt: chosen = most positive completion, rejected = least positive."""
    scored = sorted(((sentiment_score(c), c) for c in completions if c), key=lambda x: x[0])
    if len(scored) < 2 or scored[-1][0] - scored[0][0] < MIN_GAP:
        return None
    (low, rejected), (high, chosen) = scored[0], scored[-1]
    return {"prompt": prompt["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "group": prompt["group"],
            "score_chosen": round(high, 4), "score_rejected": round(low, 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_FILE)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--prompts-per-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=0, help="first N prompts only (a check)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(ModelConfig())
    tokenizer.padding_side = "left"
    model = load_causal_lm(ModelConfig()).eval()
    prompts = split_prompts()[0]
    prompts = prompts[:args.limit] if args.limit else prompts
    partial = args.out.with_suffix(".partial")
    done = partial.read_text().splitlines() if partial.is_file() else []  # one line per batch
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    n_batches = -(-len(prompts) // args.prompts_per_batch)
    with partial.open("a", encoding="utf-8") as f:
        for b in range(len(done), n_batches):
            chunk = prompts[b * args.prompts_per_batch:(b + 1) * args.prompts_per_batch]
            groups = sample(model, tokenizer, chunk, samples=args.samples,
                            max_new_tokens=args.max_new_tokens, seed=args.seed * 1_000_003 + b)
            f.write(json.dumps(groups, ensure_ascii=False) + "\n")
            f.flush()
            print(f"batch {b + 1}/{n_batches} ({time.time() - start:.0f} s)", file=sys.stderr)
    batches = [json.loads(line) for line in partial.read_text().splitlines()]
    completions = [c for batch in batches for c in batch]
    rows = [r for p, cs in zip(prompts, completions) if (r := pair(p, cs)) is not None]
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
    tmp.replace(args.out)
    partial.unlink()
    gap = sum(r["score_chosen"] - r["score_rejected"] for r in rows) / len(rows)
    print(f"{len(rows)} pairs from {len(prompts)} prompts (mean gap {gap:.3f}) -> {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
