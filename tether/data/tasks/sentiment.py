"""Positive tone: a built-in preference set and a ground-truth scorer that need no download.

Prompts (written here) ask for a short review, note or message about an everyday thing ("Write
a short review of the bus ride to work."). The completions in the shipped preference set were
sampled from the default model (SmolLM2-135M-Instruct) by `build_sentiment_prefs.py`; for each
prompt the sample with the highest VADER compound sentiment is `chosen` and the one with the
lowest `rejected`. The target is a positive tone; the ground truth is VADER's lexicon
(Hutto & Gilbert 2014, the `vaderSentiment` package, which ships its lexicon: no network).

The prompts are split once (seeded) into training prompts, whose pairs are shipped, and
held-out prompts, on which `tether dpo` scores the policy's own completions before and after
training. `group` is the kind of text asked for: review, note or message.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

from tether.errors import ConfigError

DATA_FILE = Path(__file__).parent / "data" / "sentiment_prefs.jsonl"
N_HELDOUT = 48  # prompts kept out of the shipped pairs, for the generation eval
MAX_NEW_TOKENS = 48  # completion length limit, when building the set and in the held-out eval

# (group, template): every template takes one everyday subject.
TEMPLATES = [
    ("review", "Write a short review of {}."),
    ("review", "Give your honest opinion of {} in two sentences."),
    ("review", "Write a quick comment for an online forum about {}."),
    ("note", "Write a brief note to your coworker about {}."),
    ("note", "Write a short diary entry about {}."),
    ("message", "In two sentences, tell a friend what you thought of {}."),
    ("message", "Write a text message to your sister about {}."),
    ("message", "Reply in one or two sentences to a neighbour who asks about {}."),
]
SUBJECTS = [
    "the new bakery on your street", "the bus ride to work this morning", "a rainy Monday",
    "the hotel you stayed at last weekend", "your old laptop", "the local library",
    "a cheap umbrella you bought", "the neighbourhood park", "your morning coffee",
    "the last film you watched", "a crowded supermarket on Saturday", "your dentist appointment",
    "the office printer", "a new pair of running shoes", "the weather this week",
    "a long train journey", "the school canteen food", "the update on your phone",
    "a noisy apartment building", "a family dinner", "a delayed flight", "the gym near your home",
    "a second-hand bicycle", "the queue at the post office", "a cooking class",
    "the traffic on the way home", "a hotel breakfast", "a camping trip in the rain",
    "your new desk chair", "the self-checkout machines", "the city swimming pool",
    "a job interview", "a group project at school", "the wifi at a cafe",
    "a pizza delivery that arrived late", "moving to a new flat",
]


def sentiment_prompts() -> list[dict]:
    """Every prompt once, in a fixed order: {"prompt": [user message], "group": kind}."""
    return [{"prompt": [{"role": "user", "content": template.format(subject)}], "group": group}
            for subject in SUBJECTS for group, template in TEMPLATES]


def split_prompts(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training prompts, held-out prompts): a seeded shuffle, the last N_HELDOUT held out."""
    prompts = sentiment_prompts()
    order = list(range(len(prompts)))
    random.Random(f"sentiment-split-{seed}").shuffle(order)
    cut = len(order) - N_HELDOUT
    return [prompts[i] for i in sorted(order[:cut])], [prompts[i] for i in sorted(order[cut:])]


def heldout_prompts(n: int | None = None) -> list[dict]:
    """The first n held-out prompts (all 48 when n is None); none of them is in the shipped set."""
    held = split_prompts()[1]
    return held if n is None else held[:n]


@lru_cache(maxsize=1)
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ConfigError("the sentiment score needs the package vaderSentiment: run "
                          "`pip install --no-deps vaderSentiment` (make install does this)") from None
    return SentimentIntensityAnalyzer()


def sentiment_score(text: str) -> float:
    """VADER compound sentiment of `text` in [-1, 1] (positive tone is high)."""
    return float(_analyzer().polarity_scores(text)["compound"])


def preference_rows(path: Path = DATA_FILE) -> list[dict]:
    """The shipped pairs: {"prompt", "chosen", "rejected" (messages), "group", "score_chosen",
    "score_rejected"}, one per training prompt whose samples differed in sentiment."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
