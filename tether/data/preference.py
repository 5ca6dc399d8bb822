"""Preference rows -> tokenised chosen/rejected pairs (DPO family) or unpaired examples (KTO).

Row formats (TRL's; validated by `tether.data.formats.validate_row`):
    preference            {"prompt"?, "chosen", "rejected", "group"?}
    unpaired_preference   {"prompt", "completion", "label": bool, "group"?}
Standard rows hold strings, conversational rows lists of {"role", "content"} messages. A
conversational preference row without "prompt" uses the messages that chosen and rejected share
at the start as the prompt; a standard one without "prompt" has an empty prompt.

As in SFT, the prompt and each completion are tokenised separately and joined, so the prompt's
tokens are identical in the chosen and the rejected sequence, no token spans the boundary, and
the loss mask is True exactly on the completion's tokens. Standard rows end with EOS.

For KTO a paired row becomes two unpaired examples (chosen desirable, rejected undesirable).
Each unpaired example also carries a mismatched sequence (its prompt with another example's
completion) from which KTO estimates its reference point KL(policy || reference).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass

import torch

from tether.config import DataConfig
from tether.data.collate import Example, pad_collate
from tether.data.formats import (Rows, check_not_null, completion_suffix, read_rows, render_chat,
                                  text_ids, validate_row)
from tether.data.tasks import arithmetic, sentiment
from tether.errors import ConfigError, DataError

PREFERENCE_FORMATS = ("preference", "unpaired_preference")


@dataclass
class PreferencePair:
    chosen: Example
    rejected: Example
    group: str = ""
    ref: tuple[float, float] | None = None  # reference log-probs of (chosen, rejected), summed
    p: float | None = None  # soft label P(chosen is better) (dpo.soft_label_key); None = hard

    @property
    def sequences(self) -> tuple[Example, Example]:
        return self.chosen, self.rejected


@dataclass
class UnpairedExample:
    example: Example  # prompt + completion
    kl_example: Example  # the same prompt + another example's completion (KTO's KL estimate)
    desirable: bool
    group: str = ""
    ref: tuple[float, float] | None = None  # reference log-probs of (example, kl_example)

    @property
    def sequences(self) -> tuple[Example, Example]:
        return self.example, self.kl_example


@dataclass
class PreferenceBatch:
    """B pairs as 2B rows: rows [:B] are the chosen (KTO: the examples), rows [B:] the rejected
    (KTO: the mismatched KL sequences). Rows i and B + i share their prompt: with `prompt_len`
    P >= 1 columns [:P] hold each row's prompt left-padded to P and columns [P:] its completion
    right-padded, so the prompt can run once per pair and the lm_head only on columns [P:]. P = 0
    when some pair shares no first token (rows then are right-padded whole)."""
    input_ids: torch.Tensor  # (2B, T) long
    attention_mask: torch.Tensor  # (2B, T) bool, True on real tokens
    loss_mask: torch.Tensor  # (2B, T) bool, True on completion tokens
    ref_logps: torch.Tensor | None  # (2B,) fp32 summed reference log-probs; None if ref-free
    group_ids: torch.Tensor  # (B,) long, index into the run's sorted group names
    desirable: torch.Tensor  # (B,) bool; KTO labels (all True for pairs)
    kl: torch.Tensor | None = None  # () KTO: the step's detached KL estimate (set by the loop)
    prompt_len: int = 0  # P: columns of left-padded prompt (0: none, rows right-padded)
    multiple: int = 0  # prompt and completion columns padded to multiples of this (0: off)
    label_smoothing: torch.Tensor | None = None  # (B,) per-pair cDPO smoothing 1 - p; None: hard

    @property
    def num_pairs(self) -> int:
        return self.group_ids.shape[0]

    def trimmed(self, rows: slice = slice(None)) -> tuple[torch.Tensor, ...]:
        """(input_ids, attention_mask, loss_mask) of `rows` without the trailing padding
        columns none of them uses (see `trim`)."""
        return trim(self.input_ids[rows], self.attention_mask[rows], self.loss_mask[rows],
                    prompt_len=self.prompt_len, multiple=self.multiple)

    def to(self, device) -> "PreferenceBatch":
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return PreferenceBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def shared_prompt_length(first: Example, second: Example) -> int:
    """How many first tokens the two sequences share before either's loss mask begins (at most
    the shorter length - 1, so each keeps a token after it)."""
    n, limit = 0, min(len(first.input_ids), len(second.input_ids)) - 1
    while (n < limit and first.input_ids[n] == second.input_ids[n]
           and not first.loss_mask[n] and not second.loss_mask[n]):
        n += 1
    return n


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (n itself when multiple <= 1)."""
    return -(-n // multiple) * multiple if multiple > 1 else n


def pair_rows(items: list, pad_id: int, multiple: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(input_ids (2B, T), attention_mask (2B, T), loss_mask (2B, T), P) of the items' two
    sequences each, first sequences in rows [:B]: every row's shared prompt left-padded to P
    columns and the rest right-padded after them (P = 0, plain right padding, when a pair
    shares no first token). With `multiple` > 1, P and T - P are multiples of it."""
    firsts, seconds = zip(*(item.sequences for item in items))
    prompts = [shared_prompt_length(a, b) for a, b in zip(firsts, seconds)]
    P = round_up(max(prompts), multiple) if min(prompts) > 0 else 0
    offsets = [P - p for p in prompts] * 2 if P else None  # left padding of each row
    b = pad_collate(list(firsts) + list(seconds), pad_id, offsets)
    ids, attn, loss = b.input_ids, b.attention_mask, b.loss_mask
    extra = P + round_up(ids.shape[1] - P, multiple) - ids.shape[1]  # right padding to add
    if extra:
        ids = torch.cat([ids, ids.new_full((ids.shape[0], extra), pad_id)], 1)
        attn, loss = (torch.cat([t, t.new_zeros(t.shape[0], extra)], 1) for t in (attn, loss))
    return ids, attn, loss, P


def collate_preference(items: list, pad_id: int, groups: list[str],
                       multiple: int = 0) -> PreferenceBatch:
    input_ids, attention_mask, loss_mask, prompt_len = pair_rows(items, pad_id, multiple)
    ref = None if items[0].ref is None else torch.tensor(
        [it.ref[0] for it in items] + [it.ref[1] for it in items], dtype=torch.float32)
    soft = None if getattr(items[0], "p", None) is None else torch.tensor(
        [1.0 - it.p for it in items], dtype=torch.float32)
    return PreferenceBatch(
        input_ids, attention_mask, loss_mask, ref,
        torch.tensor([groups.index(it.group) for it in items], dtype=torch.long),
        torch.tensor([getattr(it, "desirable", True) for it in items], dtype=torch.bool),
        prompt_len=prompt_len, multiple=multiple, label_smoothing=soft)


def trim(input_ids, attention_mask, loss_mask, *, prompt_len: int = 0, multiple: int = 0):
    """Drop the trailing padding columns that none of these rows uses (keeping the completion
    columns, those after `prompt_len`, a multiple of `multiple` when it is > 1)."""
    used = int(attention_mask.any(0).nonzero().max()) + 1
    T = min(prompt_len + round_up(used - prompt_len, multiple), input_ids.shape[1])
    return input_ids[:, :T], attention_mask[:, :T], loss_mask[:, :T]


# ------------------------------------------------------------------------------ tokenisation


def preference_texts(row: dict, tokenizer, where: dict) -> tuple[str, dict[str, str]]:
    """(prompt text, {completion field: completion text}) of a preference or unpaired row."""
    fields = [f for f in ("chosen", "rejected", "completion") if f in row]
    first = row.get("prompt", row[fields[0]])
    if not isinstance(first, list):  # standard: plain strings, EOS after each completion
        eos = tokenizer.eos_token or ""
        return row.get("prompt", ""), {f: row[f] + eos for f in fields}
    if "prompt" in row:
        prompt_msgs = row["prompt"]
        completions = {f: row[f] for f in fields}
    else:  # implicit prompt: the messages chosen and rejected share at the start
        n = 0
        while (n < min(len(row["chosen"]), len(row["rejected"])) - 1
               and row["chosen"][n] == row["rejected"][n]):
            n += 1
        prompt_msgs = row["chosen"][:n]
        completions = {f: row[f][n:] for f in fields}
    prompt = render_chat(tokenizer, prompt_msgs, generation_prompt=True) if prompt_msgs else ""
    texts = {}
    for f, msgs in completions.items():
        full = render_chat(tokenizer, prompt_msgs + msgs)
        texts[f] = completion_suffix(full, prompt, where, f)
    return prompt, texts


def join(prompt_ids: list[int], completion_ids: list[int], *, max_length: int, truncation: bool,
         where: dict, field: str) -> Example:
    """prompt + completion ids; loss mask True exactly on the (possibly truncated) completion."""
    ids = prompt_ids + completion_ids
    mask = [False] * len(prompt_ids) + [True] * len(completion_ids)
    mask[0] = False  # nothing predicts the first token
    cut = max(0, len(ids) - max_length)
    if cut:
        if not truncation:
            raise DataError(f"is too long: {len(ids)} tokens with the prompt but data.max_length "
                            f"is {max_length} (raise it, or set data.truncation=true)",
                            field=field, **where)
        if len(prompt_ids) >= max_length:
            raise DataError(f"prompt is {len(prompt_ids)} tokens but data.max_length is "
                            f"{max_length}: no room for the completion", field="prompt", **where)
        ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        raise DataError("has no completion tokens to learn from", field=field, **where)
    return Example(ids, mask, truncated=cut)


def _group(row: dict, where: dict) -> str:
    group = row.get("group", "")
    if not isinstance(group, str):
        raise DataError(f"must be a string, got {type(group).__name__}", field="group", **where)
    return group


def soft_label(row: dict, key: str, where: dict) -> float:
    """The row's P(chosen is better) from field `key` (dpo.soft_label_key), a number in
    [0.5, 1]: `tether label` always makes the judge's preferred response the chosen one."""
    value = row.get(key)
    if key not in row or value is None:
        raise DataError(f"missing (dpo.soft_label_key names it: P(chosen is better), e.g. the "
                        "'p' that `tether label` writes)", field=key, **where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.5 <= value <= 1:
        raise DataError(f"must be a number in [0.5, 1] (P(chosen is better); below 0.5 swap "
                        f"chosen and rejected), got {value!r}", field=key, **where)
    return float(value)


def tokenize_pair(row: dict, tokenizer, *, max_length: int, truncation: bool, source: str,
                  row_index: int, soft_label_key: str | None = None) -> PreferencePair:
    where = {"source": source, "row": row_index}
    prompt, texts = preference_texts(row, tokenizer, where)
    prompt_ids = text_ids(tokenizer, prompt) if prompt else []
    chosen, rejected = (join(prompt_ids, text_ids(tokenizer, texts[f]), max_length=max_length,
                             truncation=truncation, where=where, field=f)
                        for f in ("chosen", "rejected"))
    p = soft_label(row, soft_label_key, where) if soft_label_key else None
    return PreferencePair(chosen, rejected, _group(row, where), p=p)


def tokenize_unpaired(row: dict, fmt: str, tokenizer, *, source: str,
                      row_index: int) -> list[tuple[list[int], list[int], bool, str, dict]]:
    """(prompt ids, completion ids, desirable, group, where) per example of the row."""
    where = {"source": source, "row": row_index}
    prompt, texts = preference_texts(row, tokenizer, where)
    prompt_ids = text_ids(tokenizer, prompt) if prompt else []
    group = _group(row, where)
    if fmt == "unpaired_preference":
        return [(prompt_ids, text_ids(tokenizer, texts["completion"]), row["label"], group, where)]
    return [(prompt_ids, text_ids(tokenizer, texts["chosen"]), True, group, where),
            (prompt_ids, text_ids(tokenizer, texts["rejected"]), False, group, where)]


# ------------------------------------------------------------------------------ data sets


def rows_hash(rows: Rows) -> str:
    """sha256 of the rows' content (order included): part of the reference cache key."""
    h = hashlib.sha256()
    for number, row in rows:
        h.update(json.dumps([number, row], sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def drop_identical_pairs(rows: Rows, tokenizer, source: str) -> Rows:
    """The rows without the preference pairs whose chosen and rejected completions are the same
    text once formatted: there is nothing to prefer (DPO's loss is flat at log 2, a reward model
    cannot rank them). Prints how many it dropped; rows that are all such pairs are an error."""
    same = [number for number, row in rows if _identical(row, tokenizer, source, number)]
    if not same:
        return rows
    if len(same) == len(rows):
        raise DataError(f"chosen and rejected are identical in every one of its {len(rows)} "
                        "pairs: there is nothing to prefer", source=source)
    shown = ", ".join(map(str, same[:10])) + (", ..." if len(same) > 10 else "")
    print(f"dropped {len(same)} pairs whose chosen and rejected are identical (file {source}, "
          f"rows {shown})", flush=True)
    dropped = set(same)
    return [(number, row) for number, row in rows if number not in dropped]


def _identical(row: dict, tokenizer, source: str, number: int) -> bool:
    if validate_row(row, source, number) != "preference":
        return False  # not a pair: the tokenising loop names the row's problem
    _, texts = preference_texts(row, tokenizer, {"source": source, "row": number})
    return texts["chosen"] == texts["rejected"]


def tokenize_preference_rows(rows: Rows, tokenizer, cfg: DataConfig, source: str, *,
                             unpaired: bool, soft_label_key: str | None = None) -> list:
    """Validate and tokenise: PreferencePairs, or (unpaired=True, for KTO) UnpairedExamples."""
    pairs, singles = [], []
    for number, row in rows:
        fmt = validate_row(row, source, number)
        if fmt not in PREFERENCE_FORMATS:
            check_not_null(row, PREFERENCE_FORMATS, {"source": source, "row": number})
            raise DataError(f"is a {fmt.replace('_', ' ')} row; `tether dpo` takes preference "
                            "rows ('chosen' + 'rejected', optional 'prompt') or, for "
                            "dpo.loss=kto, unpaired rows ('prompt' + 'completion' + 'label')",
                            source=source, row=number)
        if unpaired:
            singles += tokenize_unpaired(row, fmt, tokenizer, source=source, row_index=number)
        elif fmt == "unpaired_preference":
            raise DataError("is an unpaired row ('label'); only dpo.loss=kto takes unpaired rows",
                            source=source, row=number, field="label")
        else:
            pairs.append(tokenize_pair(row, tokenizer, max_length=cfg.max_length,
                                       truncation=cfg.truncation, source=source,
                                       row_index=number, soft_label_key=soft_label_key))
    if not unpaired:
        return pairs
    n, out = len(singles), []
    for i, (prompt_ids, completion_ids, desirable, group, where) in enumerate(singles):
        other = singles[(i + max(1, n // 2)) % n][1]  # another example's completion
        kw = {"max_length": cfg.max_length, "truncation": cfg.truncation, "where": where}
        out.append(UnpairedExample(join(prompt_ids, completion_ids, field="completion", **kw),
                                   join(prompt_ids, other, field="completion", **kw),
                                   desirable, group))
    return out


def load_preference_data(cfg: DataConfig, tokenizer, *, unpaired: bool = False,
                         rows: list[dict] | None = None, source: str | None = None,
                         soft_label_key: str | None = None) -> tuple[list, list, str]:
    """(train items, eval items, content hash) from cfg.path (or `rows`); eval from cfg.eval_path
    or a seeded `eval_fraction` hold-out of whole rows. The hash covers the train rows then the
    eval rows in order, so it identifies the items' order too (the reference cache relies on it).
    With `soft_label_key` every pair carries that field's P(chosen is better) (`.p`; batches get
    `label_smoothing` = 1 - p)."""
    if cfg.pad_to_multiple_of < 0:
        raise ConfigError(f"data.pad_to_multiple_of must be >= 0 (0: off), got "
                          f"{cfg.pad_to_multiple_of}")
    if rows is None:
        if cfg.path is None:
            raise DataError("no data: set data.path")
        numbered = read_rows(cfg.path, split=cfg.split)
        source = source or str(cfg.path)
    else:
        numbered = list(enumerate(rows, start=1))
        source = source or "rows"
    if not numbered:
        raise DataError("holds no rows", source=source)
    numbered = drop_identical_pairs(numbered, tokenizer, source)
    tok = lambda rs, src: tokenize_preference_rows(rs, tokenizer, cfg, src,  # noqa: E731
                                                  unpaired=unpaired,
                                                  soft_label_key=soft_label_key)
    if cfg.eval_path is not None:
        held_rows = drop_identical_pairs(read_rows(cfg.eval_path, split=cfg.split), tokenizer,
                                         str(cfg.eval_path))
        digest = hashlib.sha256(f"{rows_hash(numbered)} {rows_hash(held_rows)}".encode())
        return tok(numbered, source), tok(held_rows, str(cfg.eval_path)), digest.hexdigest()
    order = list(range(len(numbered)))
    random.Random(0).shuffle(order)
    n_eval = math.ceil(cfg.eval_fraction * len(numbered)) if cfg.eval_fraction > 0 else 0
    n_eval = min(n_eval, len(numbered) - 1)
    eval_idx = set(order[len(order) - n_eval:])
    train_rows = [r for i, r in enumerate(numbered) if i not in eval_idx]
    held_rows = [r for i, r in enumerate(numbered) if i in eval_idx]
    digest = hashlib.sha256(f"{rows_hash(train_rows)} {rows_hash(held_rows)}".encode())
    return tok(train_rows, source), tok(held_rows, source) if held_rows else [], digest.hexdigest()


# ------------------------------------------------------------------------------ built-in set


def builtin_sentiment_rows() -> list[dict]:
    """The built-in preference set of `tether dpo` (tether/data/tasks/sentiment.py): one pair per
    training prompt, completions sampled from the default model, chosen = the more positive one by
    VADER's compound sentiment. Rows: {"prompt", "chosen", "rejected" (chat messages), "group"
    (review / note / message), "score_chosen", "score_rejected" (the VADER scores)}."""
    return sentiment.preference_rows()


def builtin_preference_rows(n: int = 200, seed: int = 0) -> list[dict]:
    """A stand-in preference set from easy arithmetic: chosen = the correct demonstration,
    rejected = the same format with a wrong answer (off by 1-10). Group = the operation
    ("addition" / "subtraction"), so per-group metrics and group-robust weighting have groups."""
    rng = random.Random(f"arithmetic-preference-{seed}")
    rows = []
    for p in arithmetic.arithmetic_problems(n, seed=seed, difficulty="easy"):
        text = p["completion"][0]["content"]
        expr = text.split(" = ")[0]
        wrong = p["answer"] + rng.choice([d for d in range(-10, 11) if d])
        rows.append({
            "prompt": p["prompt"],
            "chosen": p["completion"],
            "rejected": [{"role": "assistant", "content": f"{expr} = {wrong}\nAnswer: {wrong}"}],
            "group": "addition" if "+" in expr else "subtraction",
        })
    return rows


# ------------------------------------------------------------------------------ built pairs


def pairs_by_score(prompt_row: dict, completions: list[str], scores: list[float], *,
                   min_gap: float) -> list[dict]:
    """Every pair of distinct, non-empty completions of one prompt whose gold scores differ by at
    least `min_gap`, the higher one chosen (the DPO paper's IMDb set: all pairs of a prompt's
    samples, ordered by a classifier). Pairs closer than min_gap are ties, dropped. Rows carry
    the prompt row's other fields (e.g. "group") and the two scores, rounded to 4 places.
    Conversational prompts (message lists) give conversational completions."""
    chat = isinstance(prompt_row["prompt"], list)
    wrap = (lambda t: [{"role": "assistant", "content": t}]) if chat else (lambda t: t)
    extra = {k: v for k, v in prompt_row.items() if k != "prompt"}
    seen, kept = set(), []
    for text, score in zip(completions, scores):
        if text.strip() and text not in seen:
            seen.add(text)
            kept.append((text, float(score)))
    rows = []
    for i in range(len(kept)):
        for j in range(i + 1, len(kept)):
            (a, sa), (b, sb) = kept[i], kept[j]
            if abs(sa - sb) < min_gap:
                continue
            (hi, s_hi), (lo, s_lo) = ((a, sa), (b, sb)) if sa > sb else ((b, sb), (a, sa))
            rows.append({"prompt": prompt_row["prompt"], "chosen": wrap(hi), "rejected": wrap(lo),
                         **extra, "score_chosen": round(s_hi, 4), "score_rejected": round(s_lo, 4)})
    return rows
