"""`tether label`: preference labels from a local AI judge (RLAIF; docs/rlaif.md).

Stages:
    read     `label.input`, checked row by row (`validate_row`): TRL preference pairs
             (prompt / chosen / rejected) give one pair each, A = chosen, B = rejected; prompt
             rows with two or more responses in `label.responses_key` give every pair (i < j)
             of them, A = response i (pairs of two identical responses are not judged)
    judge    `label.batch_pairs` pairs at a time: `Judge.compare` under `judge.principle`, both
             orders averaged. Each batch is appended to <output_dir>/judged.jsonl and fsynced:
             a killed run resumes where it stopped and judges no pair twice
    write    <output_dir>/labels.jsonl (`tether.judge.label_row`: the preferred response is
             `chosen`, `p` = P(chosen is better) in [0.5, 1], `confidence` = 2p - 1,
             `position_disagree`; plus `row`, the input row, and for response rows `pair`, the
             indices i, j), without the rows below `label.min_confidence`; and meta.json (the
             counts, mean confidence, position disagreement, seconds per pair), both atomically

judged.jsonl's first line holds the settings a judgement depends on (`LOG_KEYS`); a config that
differs is an error naming the key. Another `label.min_confidence` refilters without judging.
DPO reads the labels with `--data.path=<output_dir>/labels.jsonl --dpo.soft_label_key=p`.
"""

from __future__ import annotations

import json
import os
import time
from itertools import combinations
from pathlib import Path
from typing import NamedTuple

from tether.config import LabelConfig, LabelParams
from tether.data.formats import read_rows, validate_row
from tether.data.preference import rows_hash
from tether.engine import dist
from tether.engine.batchlog import read_partial, write_atomic
from tether.engine.locks import lock
from tether.errors import ConfigError, DataError
from tether.eval.evaluate import progress_bar
from tether.judge import DEFAULT_PRINCIPLE, Judge, keep_confident, label_row


class Pair(NamedTuple):
    key: tuple[int, int, int]  # (input row number, index of A, index of B); (row, 0, 1) for pairs
    prompt: object  # a string or chat messages, as in the input row
    a: object  # response A: the input's chosen, or responses[i]
    b: object  # response B: the input's rejected, or responses[j]


def check(p: LabelParams) -> None:
    if p.input is None:
        raise ConfigError("label.input is not set: a file of pairs or of prompts with responses")
    if p.batch_pairs < 1:
        raise ConfigError(f"label.batch_pairs must be >= 1, got {p.batch_pairs}")
    if not 0 <= p.min_confidence <= 1:
        raise ConfigError(f"label.min_confidence must be in [0, 1] (confidence = |2 p_a - 1|), "
                          f"got {p.min_confidence}")


def _split_implicit(row: dict) -> tuple[object, object, object]:
    """(prompt, chosen, rejected); without `prompt`, the messages both share first (as DPO)."""
    if "prompt" in row or not isinstance(row["chosen"], list):
        return row.get("prompt", ""), row["chosen"], row["rejected"]
    n = 0
    while n < min(len(row["chosen"]), len(row["rejected"])) - 1 \
            and row["chosen"][n] == row["rejected"][n]:
        n += 1
    return row["chosen"][:n], row["chosen"][n:], row["rejected"][n:]


def _responses(row: dict, key: str, where: dict) -> list:
    """The row's two or more responses: non-empty strings, or with a conversational prompt
    lists of messages (a string becomes one assistant message, so each label is one style)."""
    responses, chat = row.get(key), isinstance(row["prompt"], list)
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(f"must be a list of two or more responses to judge, got "
                        f"{responses!r:.80}", field=key, **where)
    for i, r in enumerate(responses):
        ok = (isinstance(r, str) and r.strip()) or (chat and isinstance(r, list) and r and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in r))
        if not ok:
            raise DataError(f"must be a non-empty string{' or a list of messages' * chat}, got "
                            f"{r!r:.80}", field=f"{key}[{i}]", **where)
    return [[{"role": "assistant", "content": r}] if chat and isinstance(r, str) else r
            for r in responses]


def pairs_of_row(row: dict, number: int, source: str,
                 responses_key: str) -> tuple[list[Pair], str]:
    """(the row's pairs to judge, "pairs" | "responses"); a bad row: file, row, field."""
    fmt = validate_row(row, source, number)
    where = {"source": source, "row": number}
    if fmt == "preference":
        prompt, chosen, rejected = _split_implicit(row)
        return [Pair((number, 0, 1), prompt, chosen, rejected)], "pairs"
    if fmt != "prompt_only":
        raise DataError(f"is a row of format {fmt}; `tether label` takes preference pairs or "
                        f"prompt rows with responses in '{responses_key}'", **where)
    responses = _responses(row, responses_key, where)
    return [Pair((number, i, j), row["prompt"], responses[i], responses[j])
            for i, j in combinations(range(len(responses)), 2)
            if responses[i] != responses[j]], "responses"


def load_pairs(p: LabelParams) -> tuple[list[Pair], dict]:
    """Every pair of the input in row order, and what the log records about the input."""
    rows = read_rows(p.input)
    pairs, kinds = [], []
    for number, row in rows:
        row_pairs, kind = pairs_of_row(row, number, p.input, p.responses_key)
        if kinds and kind != kinds[0]:
            raise DataError(f"is a {kind} row but the rows before it are {kinds[0]} rows; one "
                            "kind per file", source=p.input, row=number)
        pairs += row_pairs
        kinds = [kind]
    if not pairs:
        raise DataError("holds no pair of two different responses to judge", source=p.input)
    return pairs, {"rows": len(rows), "kind": kinds[0], "sha256": rows_hash(rows)}


# The settings in judged.jsonl's first line: a judgement depends on each of them.
LOG_KEYS = ("judge.model", "judge.principle", "judge.dtype", "judge.max_text_tokens",
            "label.input", "label.responses_key")


def log_settings(cfg: LabelConfig, source: dict) -> dict:
    """`LOG_KEYS` by name; label.input is the content of the input (its rows' hash), so a
    moved file is the same input and an edited one is not."""
    return {"judge.model": cfg.judge.model,
            "judge.principle": cfg.judge.principle or DEFAULT_PRINCIPLE,
            "judge.dtype": cfg.judge.dtype, "judge.max_text_tokens": cfg.judge.max_text_tokens,
            "label.input": source["sha256"], "label.responses_key": cfg.label.responses_key}


def check_settings(logged: dict, now: dict, log_path: Path) -> None:
    for key in (k for k in LOG_KEYS if logged.get(k) != now[k]):
        old, new = ("other rows", "these rows") if key == "label.input" else \
            (repr(logged.get(key)), repr(now[key]))
        raise ConfigError(f"{key}: {log_path} was judged with {old}, this config gives {new}; "
                          "use another label.output_dir, or delete the log to judge again")


def append(log, record: dict) -> None:
    """One line, flushed and fsynced: the batch survives a kill from here on."""
    log.write(json.dumps(record, ensure_ascii=False) + "\n")
    log.flush()
    os.fsync(log.fileno())


def judged_pairs(done: dict) -> dict[tuple, tuple[float, bool, float]]:
    """{pair key: (p_a, position_disagree, option_mass)} from the log's batch records."""
    out = {}
    for b, record in done.items():
        if b != "settings":
            for k, p_a, flag, mass in zip(record["pairs"], record["p_a"],
                                          record["position_disagree"], record["option_mass"]):
                out[tuple(k)] = (p_a, flag, mass)
    return out


def label_all(pairs: list[Pair], judged: dict, kind: str) -> list[dict]:
    """One `label_row` per pair, in input order, plus `row` (and `pair` for response rows)."""
    rows = []
    for pair in pairs:
        p_a, flag, _ = judged[pair.key]
        row, i, j = pair.key
        extra = {"row": row} if kind == "pairs" else {"row": row, "pair": [i, j]}
        rows.append(label_row(pair.prompt, pair.a, pair.b, p_a, position_disagree=flag, **extra))
    return rows


def summary(pairs: list[Pair], judged: dict, kept: list[dict], done: dict, settings: dict,
            source: dict, p: LabelParams) -> dict:
    """meta.json, over all judged pairs: mean confidence = mean |2 p_a - 1|; position disagreement
    = fraction whose two orders prefer different responses; seconds per pair; input agreement
    = fraction of input pairs the judge orders as the input did (p_a > 0.5; pair input only)."""
    values = [judged[pair.key] for pair in pairs]
    n = len(values)
    return {"judged": n, "kept": len(kept), "dropped": n - len(kept),
            "min_confidence": p.min_confidence,
            "mean_confidence": sum(abs(2 * v[0] - 1) for v in values) / n,
            "position_disagree_rate": sum(bool(v[1]) for v in values) / n,
            "mean_option_mass": sum(v[2] for v in values) / n,
            "input_agreement": sum(v[0] > 0.5 for v in values) / n
            if source["kind"] == "pairs" else None,
            "seconds_per_pair": sum(r["seconds"] for b, r in done.items() if b != "settings") / n,
            "judge": settings["judge.model"],
            "principle": settings["judge.principle"], "input": str(p.input),
            "input_rows": source["rows"], "input_sha256": source["sha256"]}


def run(cfg: LabelConfig) -> dict:
    lp, jp = cfg.label, cfg.judge
    check(lp)
    pairs, source = load_pairs(lp)
    settings = log_settings(cfg, source)
    out = Path(lp.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path, judge = out / "judged.jsonl", None
    print(f"label: {len(pairs)} pairs from {source['rows']} rows of {lp.input}, judged by "
          f"{jp.model} ({lp.batch_pairs} pairs per batch; resumes if killed) -> {out}")

    # --- judge: the pairs the log does not hold yet, appended batch by batch -----------------
    with progress_bar(cfg.progress) as bar, log_path.open("a", encoding="utf-8") as log:
        lock(log, f"another process is labelling into {out}; wait for it or use another "
                  "label.output_dir")  # one judge per log: a second would append the same pairs
        done = read_partial(log_path)  # read under the lock; a torn last line is cut off
        bound = any(b != "settings" for b in done)  # only a judged batch binds the settings
        if bound and "settings" not in done:
            raise ConfigError(f"{log_path} has no settings line: not a `tether label` log")
        if bound:
            check_settings(done["settings"]["settings"], settings, log_path)
        judged = judged_pairs(done)
        todo = [pair for pair in pairs if pair.key not in judged]
        batch = 1 + max((b for b in done if b != "settings"), default=-1)
        task = bar.add_task("label: judge pairs", total=len(pairs),
                            completed=len(pairs) - len(todo))
        for s in range(0, len(todo), lp.batch_pairs):
            chunk = todo[s:s + lp.batch_pairs]
            if judge is None:
                judge = Judge.load(jp.model, batch_size=jp.batch_size, dtype=jp.dtype,
                                   device=dist.device(), max_text_tokens=jp.max_text_tokens)
            t0 = time.perf_counter()
            result = judge.compare([c.prompt for c in chunk], [c.a for c in chunk],
                                   [c.b for c in chunk], settings["judge.principle"])
            record = {"batch": batch, "pairs": [list(c.key) for c in chunk],  # (n,) each below
                      "p_a": result.p_a.tolist(),
                      "position_disagree": result.position_disagree.tolist(),
                      "option_mass": result.option_mass.tolist(),
                      "seconds": time.perf_counter() - t0}
            if not bound:  # the first judgement: this run's settings head the log
                log.truncate(0)  # a settings line no judgement followed binds nothing
                append(log, {"batch": "settings", "settings": settings})
                bound = True
            append(log, record)
            judged.update(judged_pairs({batch: record}))
            done[batch], batch = record, batch + 1
            bar.update(task, advance=len(chunk))

    # --- write: labels.jsonl (confident rows) and meta.json, atomically ----------------------
    rows = label_all(pairs, judged, source["kind"])
    kept = keep_confident(rows, lp.min_confidence)
    write_atomic(out / "labels.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                               for r in kept))
    meta = summary(pairs, judged, kept, done, settings, source, lp)
    write_atomic(out / "meta.json", json.dumps(meta, indent=1))
    print(f"label: {meta['kept']} of {meta['judged']} pairs kept (confidence >= "
          f"{lp.min_confidence}), mean confidence {meta['mean_confidence']:.3f}, position disagree"
          f"ment {meta['position_disagree_rate']:.1%}, {meta['seconds_per_pair']:.2f} s per pair")
    return {"labels": out / "labels.jsonl", "meta": meta}
