"""Positive tone: a built-in preference set and a ground-truth scorer that need no download.

Prompts (written here) ask for a short review, note or message about an everyday thing ("Write
a short review of the bus ride to work."). The completions in the shipped preference set were
sampled from the default model (SmolLM2-135M-Instruct) by scripts/build_sentiment_prefs.py (a
maintainer's script outside the package); for each prompt the sample with the highest VADER
compound sentiment is `chosen` and the one with the lowest `rejected`. The target is a positive
tone; the ground truth is VADER's lexicon (Hutto & Gilbert 2014, the `vaderSentiment` package,
which ships its lexicon: no network).

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
    """The first n held-out prompts (all 48 when n is None; cycled when n > 48); none of them is
    in the shipped set."""
    held = split_prompts()[1]
    return held if n is None else [held[i % len(held)] for i in range(n)]


# The larger pool of `tether prefs` (the built preference set of `tether rm` and `tether rlhf`):
# more kinds of text and more subjects. Its prompts are every (template, subject) pair of both
# lists, less the N_HELDOUT prompts of the generation eval, so no eval prompt is ever a pair.
MORE_TEMPLATES = [
    ("review", "Write a two-sentence product review of {}."),
    ("review", "Rate {} out of five stars and explain why in one sentence."),
    ("review", "Describe your experience with {} for a review website."),
    ("review", "What did you think of {}? Answer in a few words."),
    ("note", "Write a sticky note to yourself about {}."),
    ("note", "Write a short email to your manager about {}."),
    ("note", "Write one line for your journal about {}."),
    ("message", "Send a short text to your best friend about {}."),
    ("message", "Write a social media post about {}."),
    ("message", "Tell your parents about {} in a short message."),
    ("message", "Write a quick voicemail transcript to a colleague about {}."),
    ("message", "Reply to a group chat that asks how {} went."),
]
MORE_SUBJECTS = [
    "the new coffee machine at work", "a weekend at the beach", "your first day at a new job",
    "the concert you went to", "a museum visit", "your neighbour's barking dog",
    "the taxi ride from the airport", "a birthday party", "the restaurant on the corner",
    "a phone call with customer service", "the new season of your favourite show",
    "a hike in the mountains", "the parking garage downtown", "a library book you borrowed",
    "your commute by bike", "a visit to the doctor", "a package that arrived damaged",
    "the farmers market", "a wedding you attended", "your garden this spring",
    "a haircut at a new salon", "the heating in your flat", "a video game you played",
    "the ice cream shop by the river", "a yoga class", "your new headphones",
    "a snowstorm", "the local football match", "an online course you took",
    "a weekend with your cousins", "the bakery's new sourdough", "a tram that broke down",
    "a street festival", "your electricity bill", "a picnic in the park", "the airport lounge",
    "a rental car", "a broken washing machine", "a surprise visit from an old friend",
    "the new shopping centre", "a meeting that ran long", "your kitchen renovation",
    "a podcast you listened to", "a holiday in the countryside", "the hospital waiting room",
    "a board game night", "a rooftop bar", "the morning run along the canal",
    "a bookshop you discovered", "the school play", "a thunderstorm at night",
    "a new recipe you tried", "the hotel pool", "your car's service at the garage",
    "a volunteer day at the shelter", "the local bus timetable", "a charity run",
    "a tax form you had to fill in", "a vegetable box delivery", "the town's new bike lanes",
    "a ferry crossing", "your new phone case", "the fireworks on New Year's Eve",
    "a power cut", "the zoo", "a tour of an old castle", "a late-night study session",
    "the smell of fresh bread", "a long queue at the bank", "a sunny afternoon",
    "a pottery class", "the playground near school", "a broken escalator",
    "a karaoke night", "the cinema snacks", "a visit to your grandparents",
    "a cold shower", "your noisy upstairs neighbours", "a market stall selling spices",
    "a flat tyre on the motorway", "the new manager", "an evening walk by the sea",
]


def prompt_pool() -> list[dict]:
    """The prompts `tether prefs` samples from, in a fixed order (same shape as
    sentiment_prompts()): every template of TEMPLATES + MORE_TEMPLATES with every subject of
    SUBJECTS + MORE_SUBJECTS, except the held-out prompts of the generation eval."""
    held = {p["prompt"][0]["content"] for p in heldout_prompts()}
    return [{"prompt": [{"role": "user", "content": template.format(subject)}], "group": group}
            for subject in SUBJECTS + MORE_SUBJECTS for group, template in TEMPLATES + MORE_TEMPLATES
            if template.format(subject) not in held]


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
